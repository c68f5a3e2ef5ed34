"""The early life of a model's sparse layers under a training recipe: do they stay alive?

Trains a preset (default `small/ultramem_v2`) on a prepared data directory with the corpus
study's batch (8 x 256 tokens), seed and schedule length (9,766 steps, cosine; the schedule is
that of the whole run, so lr at step k is the study's), stops after `--steps` steps, and after
every 10th step measures each sparse layer's output RMS over its block's FFN output RMS
(`ultramem.diagnostics.output_shares`, on the first two sequences of the validation split) and
Adam's gradient RMS over eps per layer (`adam_grad_over_eps`). It prints one JSON line per
measurement (step, training loss, lr, shares, grad_over_eps, seconds). `--set key=value` changes
a `TrainConfig` field, `--set memory.key=value` the preset's sparse-layer config.

`--table LOG ...` prints, for such logs and for `metrics.jsonl` files of runs trained on the same
batches (a study run of the same seed), the mean training loss over windows of 200 steps (`-`
where a log stops inside one) and the smallest and median layer share at each log's last step.

    python benchmarks/memory_collapse.py --data runs/study/small-english/data --steps 1200 \\
        --set lr=1e-3 --set warmup=500 --set eps=1e-15 > runs/collapse/lr1e-3.jsonl
    python benchmarks/memory_collapse.py --table runs/collapse/*.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def probe(data: str, out: str, steps: int, preset: str, changes: list[str]) -> None:
    import dataclasses

    import torch

    from ultramem.config import ModelConfig
    from ultramem.diagnostics import adam_grad_over_eps, output_shares
    from ultramem.train.config import TrainConfig
    from ultramem.train.trainer import Trainer

    torch.set_num_threads(1)
    train: dict = dict(steps=9766, batch_size=8, seq_len=256, lr=3e-3, warmup=20, eval_every=0,
                       log_every=10, ckpt_every=0, keep_last=1, seed=0, tensorboard=False,
                       plot=False)
    memory: dict = {}
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for change in changes:
        key, _, value = change.partition("=")
        if key.startswith("memory."):
            memory[key[len("memory."):]] = value
        elif key in fields:
            train[key] = type(getattr(TrainConfig(), key))(value)
        else:
            raise SystemExit(f"--set {change}: no TrainConfig field {key!r}")
    model_cfg = ModelConfig.preset(preset)
    if memory:
        model_cfg = model_cfg.replace(memory=memory)
    trainer = Trainer(model_cfg, TrainConfig(**train), out, data, show_progress=False)
    x, _ = trainer.val_order.batch(0)
    x = x[:2]
    t0 = time.time()
    for step in range(steps):
        row = trainer.train_step(step)
        trainer._zero_grad()
        if (step + 1) % 10 == 0:
            shares = output_shares(trainer.model, x)
            ratios = adam_grad_over_eps(trainer.model, trainer.opts["main"])
            print(json.dumps({"step": step + 1, "loss": round(row["loss"], 3), "lr": row["lr"],
                              "shares": [None if s is None else float(f"{s:.3g}") for s in shares],
                              "grad_over_eps": [None if r is None else float(f"{r:.3g}")
                                                for r in ratios],
                              "t": round(time.time() - t0)}), flush=True)


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def table(paths: list[str], window: int = 200) -> None:
    logs = {p: {r["step"]: r for r in _rows(Path(p)) if "loss" in r and r["step"] % 10 == 0}
            for p in paths}
    last = max(max(rows) for rows in logs.values())
    wins = [(a, a + window) for a in range(0, last - window + 1, window)]
    print(f"{'log':<44}" + "".join(f"{a}-{b}".rjust(10) for a, b in wins)
          + f"{'at step':>9}{'min share':>11}{'median':>8}")
    for path, rows in logs.items():
        cells = []
        for a, b in wins:
            got = [rows[s]["loss"] for s in range(a + 10, b + 1, 10) if s in rows]
            cells.append(f"{statistics.mean(got):.3f}" if len(got) == window // 10 else "-")
        end = max(s for s, r in rows.items() if "shares" in r) if any(
            "shares" in r for r in rows.values()) else None
        shares = [] if end is None else [s for s in rows[end]["shares"] if s is not None]
        tail = (f"{end:>9}{min(shares):>11.2g}{statistics.median(shares):>8.2g}" if shares
                else f"{'-':>9}{'-':>11}{'-':>8}")
        name = Path(path).name if Path(path).name != "metrics.jsonl" else Path(path).parent.name
        print(f"{name:<44}" + "".join(c.rjust(10) for c in cells) + tail)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="prepared data directory (the study's <work>/small-english/data)")
    p.add_argument("--out", default="runs/collapse/run", help="the trainer's run directory")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--preset", default="small/ultramem_v2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--table", nargs="+", metavar="LOG", help="tabulate logs instead")
    args = p.parse_args()
    if args.table:
        table(args.table)
        return 0
    if not args.data:
        p.error("--data is required to train")
    probe(args.data, args.out, args.steps, args.preset, args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
