"""Training step time against total value-table size, dense vs row-sparse table updates.

Grows the tables of the tiny UltraMemV2 model 1x, 4x and 16x (n_keys x1, x2, x4; everything
else fixed, so each token still reads top_m rows per layer) and times the trainer's real step
(forward, backward, clipping, optimizer) with `value_update=dense` (AdamW over whole tables,
dense table gradients) and `value_update=sparse` (row-sparse gradients + lazy Adam). Then
compares training throughput of the matched `tiny/*` architectures (UltraMemV2, MoE, dense...)
and, with --quality, the loss each value update reaches after a short run on built-in data.

  python benchmarks/train_step.py                   # runs/benchmarks/train_step.{md,json}
  python benchmarks/train_step.py --out docs        # the committed docs/train_step.md
  python benchmarks/train_step.py --steps 5 --out /tmp/x   # quick look

Numbers are milliseconds per optimizer step (median of the timed steps) on whatever machine runs
it; the table records the machine, torch version and thread count.
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

from ultramem.config import ModelConfig
from ultramem.train.config import TrainConfig
from ultramem.train.trainer import Trainer

SIZES = (1, 4, 16)  # table-size multipliers: n_keys * sqrt(multiplier)


def time_steps(model_cfg: ModelConfig, train_cfg: TrainConfig, warmup: int, steps: int,
               workdir: Path) -> dict[str, float]:
    trainer = Trainer(model_cfg, train_cfg, workdir, show_progress=False)
    update_time = [0.0]
    clock = time.perf_counter if trainer.device.type == "cuda" else time.process_time
    for opt in trainer.opts.values():  # time the optimizer updates on their own
        opt.step = _timed(opt.step, update_time, clock)
    # On a GPU, wall time. On a CPU, process CPU time: with one torch thread it is the work the
    # step does, unaffected by other processes competing for the cores (wall time is kept too).
    times, updates, walls = [], [], []
    for step in range(warmup + steps):
        update_time[0] = 0.0
        t0, w0 = clock(), time.perf_counter()
        trainer.train_step(step)
        trainer._zero_grad()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(clock() - t0)
            walls.append(time.perf_counter() - w0)
            updates.append(update_time[0])
    n_params = sum(p.numel() for p in trainer.model.parameters())
    tables = sum(p.numel() for p in trainer.table_params)
    ms = 1000 * statistics.median(times)
    tokens = train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum
    return {"ms_per_step": ms, "update_ms": 1000 * statistics.median(updates),
            "wall_ms_per_step": 1000 * statistics.median(walls),
            "clock": "wall" if clock is time.perf_counter else "process_cpu",
            "tokens_per_s": tokens / (ms / 1000), "params": n_params, "table_params": tables}


def _timed(fn, acc: list[float], clock):
    def wrapper(*args, **kwargs):
        t0 = clock()
        out = fn(*args, **kwargs)
        acc[0] += clock() - t0
        return out

    return wrapper


def table_size_sweep(args, workdir: Path) -> list[dict]:
    rows = []
    for width in args.widths:
        base = ModelConfig.preset(args.preset)
        if width != base.d_model:
            base = base.replace(d_model=width, ffn_hidden=3 * width)
        for mult in SIZES:
            n_keys = int(round(base.memory.n_keys * mult ** 0.5))
            cfg = base.replace(memory={"n_keys": n_keys, "init_samples": 512})
            for update in ("dense", "sparse"):
                tcfg = TrainConfig(steps=10_000, batch_size=args.batch_size, seq_len=args.seq_len,
                                   value_update=update, device=args.device, tensorboard=False,
                                   plot=False, eval_every=0, ckpt_every=0, log_every=10_000)
                res = time_steps(cfg, tcfg, args.warmup, args.steps,
                                 workdir / f"{update}{mult}_{width}")
                rows.append({"d_model": width, "table_mult": mult, "n_keys": n_keys,
                             "update": update, **res})
                print(f"h={width:<4} tables x{mult:<2} n_keys={n_keys:<4} {update:<6} "
                      f"{res['ms_per_step']:8.1f} ms/step (update {res['update_ms']:6.1f} ms)"
                      f"  {res['table_params'] / 1e6:6.2f}M table")
    return rows


def arch_sweep(args, workdir: Path) -> list[dict]:
    from ultramem.config import ARCHS

    rows = []
    for arch in ARCHS:
        name = f"tiny/{arch}"
        cfg = ModelConfig.preset(name)
        tcfg = TrainConfig(steps=10_000, batch_size=args.batch_size, seq_len=args.seq_len,
                           device=args.device, tensorboard=False, plot=False, eval_every=0,
                           ckpt_every=0, log_every=10_000)
        res = time_steps(cfg, tcfg, args.warmup, args.steps, workdir / arch.replace("/", "_"))
        rows.append({"preset": name, **res})
        print(f"{name:<20} {res['ms_per_step']:8.1f} ms/step {res['tokens_per_s']:9.0f} tok/s")
    return rows


def quality(args, workdir: Path) -> list[dict]:
    rows = []
    cfg = ModelConfig.preset(args.preset)
    for update, opt, lr_scale in (("dense", "adam", 1.0), ("sparse", "adam", 1.0),
                                  ("dense", "adam", 10.0), ("sparse", "adam", 10.0),
                                  ("sparse", "adagrad", 10.0)):
        tcfg = TrainConfig(steps=args.quality_steps, batch_size=args.batch_size,
                           seq_len=args.seq_len, value_update=update, value_optimizer=opt,
                           value_lr_scale=lr_scale, device=args.device, tensorboard=False,
                           plot=False, eval_every=args.quality_steps, eval_batches=16,
                           ckpt_every=0, log_every=10_000)
        summary = Trainer(cfg, tcfg, workdir / f"q_{update}_{opt}", show_progress=False).fit()
        rows.append({"update": update, "value_optimizer": opt, "value_lr_scale": lr_scale,
                     "steps": args.quality_steps, "train_loss": summary["final_loss"],
                     "eval_loss": summary["eval_loss"]})
        print(f"quality {update:<6} {opt:<8} eval loss {summary['eval_loss']:.4f}")
    return rows


def write_table(result: dict, out: Path) -> None:
    lines = [
        "# Training step time against value-table size",
        "",
        "Written by `benchmarks/train_step.py`. Machine: "
        f"{result['machine']}; torch {result['torch']}, {result['threads']} threads, "
        f"device {result['device']}; batch {result['batch_size']} x {result['seq_len']} tokens; "
        f"median of {result['steps']} steps after {result['warmup']} warm-up steps.",
        "",
        "Tables grow 1x, 4x, 16x (n_keys x1, x2, x4) while each token still reads top_m rows per "
        "layer. `dense`: AdamW over whole tables; `sparse`: row-sparse gradients and lazy Adam "
        "(`ultramem.train.sparse`).",
        "",
        "Step: forward + backward + clipping + optimizer, milliseconds, median over the timed "
        "steps; on a CPU measured as process CPU time with one torch thread, so that other "
        "processes sharing the machine do not inflate it (wall times are in the JSON). Update: "
        "the optimizer steps alone. Growth: step time relative to the same width's 1x tables.",
        "",
        "| h | tables | n_keys | table params | dense step | dense update | sparse step | "
        "sparse update | dense growth | sparse growth |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r.get("d_model"), r["table_mult"], r["update"]): r for r in result.get("sizes", [])}
    for width in sorted({k[0] for k in by}):
        d1 = by[(width, 1, "dense")]["ms_per_step"]
        s1 = by[(width, 1, "sparse")]["ms_per_step"]
        for mult in SIZES:
            d, s = by[(width, mult, "dense")], by[(width, mult, "sparse")]
            lines.append(
                f"| {width} | {mult}x | {d['n_keys']} | {d['table_params'] / 1e6:.2f}M | "
                f"{d['ms_per_step']:.1f} | {d['update_ms']:.1f} | {s['ms_per_step']:.1f} | "
                f"{s['update_ms']:.1f} | {d['ms_per_step'] / d1:.2f}x | "
                f"{s['ms_per_step'] / s1:.2f}x |")
    if result.get("archs"):
        lines += ["", "## Throughput of the matched tiny architectures", "",
                  "Same activated and total parameters within each family (`tiny/*` presets; the "
                  "dense model has the activated size only); sparse tables use the row-sparse "
                  "update. Time and tokens/s as above (per CPU second of one thread on a CPU).",
                  "", "| preset | params | ms/step | tokens/s |", "|---|---|---|---|"]
        for r in result["archs"]:
            lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['ms_per_step']:.1f} | "
                         f"{r['tokens_per_s']:.0f} |")
    if result.get("quality"):
        lines += ["", "## Does the sparse update train as well?", "",
                  f"`{result['preset']}` on the built-in corpora, {result['quality'][0]['steps']} "
                  "steps, same seed and data order; eval loss in nats per byte.", "",
                  "| value update | optimizer | value lr scale | train loss | eval loss |",
                  "|---|---|---|---|---|"]
        for r in result["quality"]:
            lines.append(f"| {r['update']} | {r['value_optimizer']} | {r['value_lr_scale']} | "
                         f"{r['train_loss']:.4f} | {r['eval_loss']:.4f} |")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 512],
                   help="d_model values of the table-size sweep (ffn_hidden = 3 d_model)")
    p.add_argument("--parts", default="sizes,archs",
                   help="comma list of sizes, archs, quality; results merge into the JSON")
    p.add_argument("--quality-steps", type=int, default=300)
    p.add_argument("--out", default="runs/benchmarks",
                   help="folder for train_step.md / .json (committed results: name docs)")
    p.add_argument("--table-only", action="store_true",
                   help="rewrite train_step.md from the JSON in --out without measuring")
    args = p.parse_args()
    if args.table_only:
        out = Path(args.out)
        write_table(json.loads((out / "train_step.json").read_text()), out / "train_step.md")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    old = out / "train_step.json"
    result = json.loads(old.read_text()) if old.is_file() and parts != {"sizes", "archs",
                                                                          "quality"} else {}
    result.update({
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, "
                   f"{os.cpu_count()} cores",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": args.device, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "steps": args.steps, "warmup": args.warmup, "preset": args.preset,
    })
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "sizes" in parts:
            result["sizes"] = table_size_sweep(args, work)
        if "archs" in parts:
            result["archs"] = arch_sweep(args, work)
        if "quality" in parts:
            result["quality"] = quality(args, work)
    (out / "train_step.json").write_text(json.dumps(result, indent=2))
    write_table(result, out / "train_step.md")
    print(f"wrote {out / 'train_step.md'}")


if __name__ == "__main__":
    main()
