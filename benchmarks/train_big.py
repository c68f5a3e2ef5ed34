"""Train UltraMemV2-227M/1.2B on this machine, kill it, resume it (issue 18 part 1).

One command: byte-tokenize the English corpus (docs/corpus.md; the built-in facts + Python text
when its export is absent) once, print the memory breakdown
(`ultramem.memory_budget`) of the run next to dense AdamW on the tables, then train in a child
process and SIGKILL it once the checkpoint at step --kill-after is written and --check-steps
more steps are logged; resume it from that checkpoint in a fresh child and train to --steps.
The resume check: the resumed run's losses (and gradient norms) at steps kill_after+1 ...
kill_after+check_steps must equal, bit for bit, the ones the killed run logged for the same
steps before it died (the trainer promises this on CPU; a resume that restored any state
wrongly, e.g. the data position, RNG or a table's row steps, shows here).

Recorded: loss, tokens/s and value-gradient norm of every step, peak RSS of each child
(ru_maxrss from wait4, and VmHWM from /proc: read by the child at its end, or polled by this
process for the killed one), wall times, the breakdown. Printed as a table and written as JSON
(runs/benchmarks/train_big-<preset>.json, or --out).

The full run (another session's, with the whole machine; defaults are the chosen run):

  nice -n 10 python benchmarks/train_big.py --out docs/benchmarks/train_big.json

Smoke test at a small size (under a minute, 0.8 GiB):

  python benchmarks/train_big.py --set model.n_layers=2 --set model.memory.n_keys=32 \
      --steps 6 --kill-after 3 --check-steps 2 --threads 1 --batch-size 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
CORPUS = REPO / "data/corpus/export/english/train.jsonl"  # docs/corpus.md, gitignored


def vmhwm_bytes(pid: int | str = "self") -> int:
    """Peak resident set (VmHWM) of a process, from /proc; 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ----------------------------------------------------------------------------- the child


def child(spec_path: str) -> None:
    """Train as `spec` says (a fresh run or --resume), then write peak RSS next to the spec."""
    import torch

    from ultramem.config import ModelConfig
    from ultramem.train.config import TrainConfig
    from ultramem.train.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    trainer = Trainer(ModelConfig.from_dict(spec["model"]), TrainConfig.from_dict(spec["train"]),
                      spec["run_dir"], spec["data_dir"], resume=spec["resume"],
                      show_progress=False)
    built = time.perf_counter() - t0
    summary = trainer.fit()
    stats = {"vmhwm_bytes": vmhwm_bytes(),
             "ru_maxrss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             "setup_s": built, "wall_s": time.perf_counter() - t0, "summary": summary}
    Path(spec["stats"]).write_text(json.dumps(stats))


# ----------------------------------------------------------------------------- the parent


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
    return rows


def run_child(spec: dict[str, Any], work: Path, name: str,
              kill_when=None) -> dict[str, Any]:
    """Run one child; kill_when(rows) -> True sends SIGKILL. Returns its peak RSS and times."""
    spec_path = work / f"{name}.spec.json"
    spec = {**spec, "stats": str(work / f"{name}.stats.json")}
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], env=env)
    metrics = Path(spec["run_dir"]) / "metrics.jsonl"
    hwm, killed = 0, False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        hwm = max(hwm, vmhwm_bytes(proc.pid))
        if kill_when is not None and not killed and kill_when(read_rows(metrics)):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    rc = proc.returncode = os.waitstatus_to_exitcode(status)
    out: dict[str, Any] = {"returncode": rc, "killed": killed,
                           "wall_s": time.perf_counter() - t0,
                           "ru_maxrss_bytes": usage.ru_maxrss * 1024}  # wait4: this child's peak
    stats = Path(spec["stats"])
    if stats.is_file():
        out.update(json.loads(stats.read_text()))
    else:
        out["vmhwm_bytes"] = hwm  # polled every 0.2 s: a lower bound
    if not killed and rc != 0:
        raise SystemExit(f"train_big: the {name} run failed (exit code {rc})")
    if kill_when is not None and not killed:
        raise SystemExit(f"train_big: the {name} run ended before it could be killed")
    return out


def time_table_update(preset: str, tokens: int, repeats: int = 6) -> float:
    """Median seconds of clip + `RowSparseAdam.step` on one full-size layer's two tables, with
    the gradient rows `tokens` tokens touch (expected_rows, random rows). One layer's worth of
    memory, whatever the model's size."""
    import torch

    from ultramem import accounting
    from ultramem.config import ModelConfig
    from ultramem.train.sparse import RowSparseAdam, clip_grads

    cfg = ModelConfig.preset(preset)
    table, mem = accounting.sparse_tables(cfg)[0], cfg.memory
    rows = int(accounting.expected_rows(table, tokens))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(table.rows, d, generator=gen))
              for d in (mem.value_dim, mem.pre_value_dim)]
    opt = RowSparseAdam(params, lr=1e-3)
    times = []
    for _ in range(repeats):
        picked = torch.randperm(table.rows, generator=gen)[:rows].sort().values
        for p in params:
            p.grad = torch.sparse_coo_tensor(picked[None], torch.randn(rows, p.shape[1]),
                                             p.shape, is_coalesced=True,
                                             check_invariants=False)
        t0 = time.perf_counter()
        clip_grads(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    print(f"{preset}: clip + RowSparseAdam step on one layer ({rows:,} of {table.rows:,} rows "
          f"of widths {mem.value_dim} + {mem.pre_value_dim}): "
          f"{statistics.median(times[1:]):.3f} s (median of {repeats - 1}, "
          f"{torch.get_num_threads()} threads)")
    return statistics.median(times[1:])


def prepare_data(corpus: Path, work: Path) -> Path:
    """Byte-tokenize `corpus` (or, when it is absent, the built-in sources) under work, once."""
    from ultramem.data.prepare import prepare
    from ultramem.train.trainer import prepare_builtin

    if not corpus.is_file():
        print(f"{corpus}: absent, training on the built-in facts + Python text")
        return prepare_builtin(work / "data-builtin")
    out = work / f"data-{corpus.parent.name}-bytes"
    if not (out / "meta.json").is_file():
        prepare([str(corpus)], out, tokenizer="bytes")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="umv2-227m-1.2b")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override as for `ultramem train` (model.memory.n_keys=32, lr=...)")
    p.add_argument("--data", help="a prepared data directory (`ultramem prepare`)")
    p.add_argument("--corpus", default=str(CORPUS),
                   help="without --data: this JSONL corpus, byte-tokenized under --work once; "
                        "the built-in facts + Python text when the file is absent")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--value-optimizer", default="adam", choices=("adam", "adagrad"))
    p.add_argument("--no-checkpointing", action="store_true",
                   help="keep activations instead of recomputing each block in the backward")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--kill-after", type=int, default=50,
                   help="checkpoint at this step, SIGKILL after --check-steps more, resume")
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rss-budget-gib", type=float, default=20.0)
    p.add_argument("--work", default="runs/train_big", help="run and data directory")
    p.add_argument("--keep", action="store_true", help="keep the run's checkpoints")
    p.add_argument("--out", help="JSON path (default runs/benchmarks/train_big-<preset>.json)")
    p.add_argument("--time-table-update", action="store_true",
                   help="only time one layer's table update at the preset's full size")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.kill_after < args.steps:
        p.error(f"--kill-after: must lie in (0, --steps={args.steps}), got {args.kill_after}")
    if not 0 < args.check_steps < min(args.kill_after, args.steps - args.kill_after):
        p.error("--check-steps: must be >= 1 and put the kill before the next checkpoint "
                "and the end of the run (< --kill-after and < --steps - --kill-after)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.time_table_update:
        import torch

        torch.set_num_threads(args.threads)
        time_table_update(args.preset, args.batch_size * args.seq_len * args.grad_accum)
        return 0
    from ultramem import memory_budget as mb
    from ultramem.data.shards import read_meta
    from ultramem.eval.study import git_commit
    from ultramem.train.config import build_configs

    work = Path(args.work)
    run_dir = work / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data) if args.data else prepare_data(Path(args.corpus), work)
    meta = read_meta(data_dir)
    train_defaults = dict(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        grad_accum=args.grad_accum, value_optimizer=args.value_optimizer, value_update="sparse",
        activation_checkpointing=not args.no_checkpointing, lr=args.lr, warmup=args.warmup,
        precision="bf16", threads=args.threads, data_workers=0, log_every=1,
        eval_every=args.steps, eval_batches=8,
        ckpt_every=args.kill_after, keep_last=1, tensorboard=False, plot=False, device="cpu")
    model_cfg, train_cfg, _ = build_configs(args.preset, overrides=args.set,
                                            train_defaults=train_defaults)
    # As the trainer does: the data's vocabulary, a context of at least seq_len.
    model_cfg = model_cfg.replace(vocab_size=int(meta["vocab_size"]),
                                  max_seq_len=max(model_cfg.max_seq_len, train_cfg.seq_len))
    from ultramem.accounting import count_params

    budget = mb.breakdown(model_cfg, train_cfg)
    print(f"{args.preset}: {count_params(model_cfg)['total']:,} parameters at vocab "
          f"{model_cfg.vocab_size} ({meta['tokenizer']}); {train_cfg.batch_size} x "
          f"{train_cfg.seq_len} tokens x {train_cfg.grad_accum} per step\n")
    print(mb.breakdown_table(model_cfg, train_cfg) + "\n", flush=True)

    spec = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "data_dir": str(data_dir),
            "run_dir": str(run_dir), "threads": args.threads, "resume": False}
    k, j = args.kill_after, args.check_steps
    ckpt_dir = run_dir / "checkpoints" / f"step_{k:08d}"

    def kill_when(rows: list[dict[str, Any]]) -> bool:
        return ckpt_dir.is_dir() and any(r.get("step", 0) >= k + j for r in rows)

    first = run_child(spec, work, "killed", kill_when)
    before = read_rows(run_dir / "metrics.jsonl")
    second = run_child({**spec, "resume": True}, work, "resumed")
    after = read_rows(run_dir / "metrics.jsonl")

    logged = {r["step"]: r for r in before}
    resumed = {r["step"]: r for r in after if r["step"] > k}
    compare = []
    for step in range(k + 1, k + j + 1):
        a, b = logged.get(step), resumed.get(step)
        compare.append({"step": step, "killed_run": a and a["loss"], "resumed": b and b["loss"],
                        "equal": bool(a and b and a["loss"] == b["loss"]
                                      and a["grad_norm"] == b["grad_norm"]
                                      and a["value_grad_norm"] == b["value_grad_norm"])})
    steps = [r for r in before if r["step"] <= k] + [resumed[s] for s in sorted(resumed)]
    losses = [r["loss"] for r in steps]
    tok_s = [r["tokens_per_s"] for r in steps[1:] if "tokens_per_s" in r]
    tenth = max(1, len(losses) // 10)
    peak = max(first["ru_maxrss_bytes"], second["ru_maxrss_bytes"])
    report = {
        "preset": args.preset, "overrides": args.set, "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(), "data": str(data_dir), "tokenizer": meta["tokenizer"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "threads": args.threads},
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": git_commit(),
        "memory_breakdown_bytes": budget,
        "runs": {"killed": first, "resumed": second},
        "resume_check": compare, "resume_exact": all(c["equal"] for c in compare),
        "loss_first": statistics.mean(losses[:tenth]),
        "loss_last": statistics.mean(losses[-tenth:]),
        "eval_loss": second.get("summary", {}).get("eval_loss"),
        "tokens_per_s_median": statistics.median(tok_s) if tok_s else None,
        "peak_rss_bytes": peak, "rss_budget_bytes": args.rss_budget_gib * GiB,
        "steps": steps,
    }
    report["loss_fell"] = report["loss_last"] < report["loss_first"]
    out = Path(args.out) if args.out else REPO / "runs/benchmarks" / f"train_big-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out)
    if not args.keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    est = budget[next(iter(budget))]
    print("| run | steps | wall s | setup s | peak RSS GiB (ru_maxrss) | VmHWM GiB |")
    print("|---|---|---|---|---|---|")
    for name, r in (("killed at", first), ("resumed", second)):
        n = k + j if name == "killed at" else args.steps - k
        rss = r["ru_maxrss_bytes"]
        print(f"| {name} | {n} | {r['wall_s']:.0f} | {r.get('setup_s', float('nan')):.0f} | "
              f"{rss / GiB:.2f} | {r['vmhwm_bytes'] / GiB:.2f} |")
    print(f"\nloss {report['loss_first']:.4f} (first tenth) -> {report['loss_last']:.4f} (last "
          f"tenth), eval loss {report['eval_loss']}; median "
          f"{report['tokens_per_s_median'] or 0:,.0f} tokens/s; estimated total "
          f"{est['total'] / GiB:.2f} GiB, measured peak {peak / GiB:.2f} GiB")
    for c in compare:
        print(f"resume step {c['step']}: killed run {c['killed_run']!r}, resumed {c['resumed']!r}"
              f" -> {'equal' if c['equal'] else 'DIFFERENT'}")
    print(f"wrote {out}")
    ok = report["resume_exact"] and peak <= report["rss_budget_bytes"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
