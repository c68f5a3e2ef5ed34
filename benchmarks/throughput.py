"""Training throughput: the fast path (bf16 mixed precision) against float32, side by side.

Part 1, speed: one `Trainer` per (architecture, precision) of a matched family (default
`small/{dense,moe,ultramem_v2}`), all on the same built-in data; the trainers' real steps
(forward, backward, clipping, optimizer) run round-robin, one step each per round, so every
configuration sees the same machine noise. Repeated at each `--threads` value. Reported: median
tokens/s (wall clock) and the fast/fp32 ratio per architecture.

Part 2, quality (`--loss-steps N`, 0 skips it): `--loss-preset` trained N steps per
`--loss-runs` entry (default float32 on seeds 0, 1, 2 for the seed spread, and the fast path on
seed 0), same data; reported: train loss (mean of the last 10% of steps) and held-out loss at the
end, and whether the fast path's falls inside the float32 seeds' range.

    python benchmarks/throughput.py                           # -> runs/benchmarks/throughput.json
    python benchmarks/throughput.py --loss-steps 300 --out docs/benchmarks/throughput.json
    python benchmarks/throughput.py --quick                   # tiny family, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from decode import _commit  # the sibling benchmark script (benchmarks/ is on sys.path)

from ultramem.config import ModelConfig
from ultramem.precision import cpu_has_fast_bf16, resolve_precision
from ultramem.train.config import TrainConfig
from ultramem.train.trainer import Trainer, prepare_builtin


def _train_cfg(args, precision: str, **changes) -> TrainConfig:
    base = dict(steps=10_000, batch_size=args.batch_size, seq_len=args.seq_len,
                precision=precision, device="cpu", tensorboard=False, plot=False,
                eval_every=0, ckpt_every=0, log_every=10_000)
    return TrainConfig(**{**base, **changes})


def speed(args, data: Path, work: Path) -> list[dict]:
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs = {}
        for arch in args.archs:
            cfg = ModelConfig.preset(f"{args.family}/{arch}")
            for precision in args.precisions:
                trainer = Trainer(cfg, _train_cfg(args, precision), work / f"{arch}_{precision}",
                                  data, show_progress=False)
                runs[(arch, precision)] = (trainer, [])
        tokens = args.batch_size * args.seq_len
        for step in range(args.warmup + args.steps):
            for trainer, times in runs.values():
                start = time.perf_counter()
                trainer.train_step(step)
                trainer._zero_grad()
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
        for (arch, precision), (trainer, times) in runs.items():
            ms = 1000 * statistics.median(times)
            rows.append({"threads": threads, "arch": arch, "precision": precision,
                         "resolved": trainer.precision, "ms_per_step": ms,
                         "tokens_per_s": tokens / (ms / 1000),
                         "ms_all": [1000 * t for t in times]})
        del runs
    return rows


def quality(args, data: Path, work: Path) -> list[dict]:
    torch.set_num_threads(args.threads[0])
    cfg = ModelConfig.preset(args.loss_preset)
    plan = [tuple(item.split(":")) for item in args.loss_runs.split(",")]
    rows = []
    for precision, seed in plan:
        seed = int(seed)
        tcfg = _train_cfg(args, precision, steps=args.loss_steps, seed=seed,
                          eval_every=args.loss_steps, eval_batches=16,
                          log_every=1)
        out = work / f"loss_{precision}_{seed}"
        start = time.perf_counter()
        trainer = Trainer(cfg, tcfg, out, data, show_progress=True)
        summary = trainer.fit()
        seconds = time.perf_counter() - start
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()
                  if "loss" in json.loads(line)]
        tail = losses[-max(1, len(losses) // 10):]
        rows.append({"preset": args.loss_preset, "precision": precision,
                     "resolved": trainer.precision, "seed": seed, "steps": args.loss_steps,
                     "train_loss_tail": sum(tail) / len(tail), "eval_loss": summary["eval_loss"],
                     "seconds": seconds})
        print(f"loss {precision:<5} seed {seed}: train {rows[-1]['train_loss_tail']:.4f} "
              f"eval {summary['eval_loss']:.4f} ({seconds:.0f} s)")
    return rows


def print_tables(result: dict) -> None:
    fast = result["precisions"][-1]
    print(f"\n{'threads':>7} {'arch':<12} {'fp32 tok/s':>11} {fast + ' tok/s':>11} {'ratio':>7}")
    by = {(r["threads"], r["arch"], r["precision"]): r for r in result["speed"]}
    for threads in result["threads"]:
        for arch in result["archs"]:
            base, new = by.get((threads, arch, "fp32")), by.get((threads, arch, fast))
            if base is None or new is None:
                continue
            ratio = new["tokens_per_s"] / base["tokens_per_s"]
            print(f"{threads:>7} {arch:<12} {base['tokens_per_s']:>11.0f} "
                  f"{new['tokens_per_s']:>11.0f} {ratio:>6.2f}x")
    rows = result.get("quality") or []
    ref = [r for r in rows if r["precision"] == "fp32"]
    if rows and ref:
        lo = min(r["eval_loss"] for r in ref)
        hi = max(r["eval_loss"] for r in ref)
        print(f"\nfp32 eval loss over seeds {[r['seed'] for r in ref]}: {lo:.4f} .. {hi:.4f}")
        for r in rows:
            if r["precision"] != "fp32":
                inside = lo <= r["eval_loss"] <= hi
                print(f"{r['precision']} seed {r['seed']}: eval {r['eval_loss']:.4f} "
                      f"({'inside' if inside else 'outside'} the fp32 seed range)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="small")
    p.add_argument("--archs", default="dense,moe,ultramem_v2")
    p.add_argument("--precisions", default="fp32,auto",
                   help="comma list; the last one is the fast path compared with fp32")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=7, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loss-steps", type=int, default=0)
    p.add_argument("--loss-preset", default="small/ultramem_v2")
    p.add_argument("--loss-runs", default="fp32:0,fp32:1,fp32:2,auto:0",
                   help="precision:seed runs of the loss comparison")
    p.add_argument("--skip-speed", action="store_true", help="only the loss comparison")
    p.add_argument("--quick", action="store_true", help="tiny family, 3 rounds, no loss run")
    p.add_argument("--out", default="runs/benchmarks/throughput.json")
    args = p.parse_args()
    if args.quick:
        args.family, args.steps, args.warmup, args.seq_len, args.loss_steps = "tiny", 3, 1, 64, 0
    args.archs = args.archs.split(",")
    args.precisions = args.precisions.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"fast bf16 on CPU: {cpu_has_fast_bf16()}",
        "torch": torch.__version__, "commit": _commit(), "family": args.family, "archs": args.archs,
        "precisions": args.precisions,
        "resolved": {p: resolve_precision(p, "cpu") for p in args.precisions},
        "threads": args.threads, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "steps": args.steps, "warmup": args.warmup,
    }
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_builtin(work / "data")
        result["speed"] = [] if args.skip_speed else speed(args, data, work)
        if args.loss_steps:
            result["quality"] = quality(args, data, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_tables(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
