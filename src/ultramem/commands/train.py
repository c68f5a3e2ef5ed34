"""`ultramem train`: train a preset (or a YAML config) on prepared or built-in data.

Examples:
  ultramem train --preset tiny --steps 200 --out runs/x
  ultramem train --config run.yaml --set lr=1e-3 --set model.memory.top_m=32 --out runs/y
  ultramem train --out runs/x --resume            # continue from the latest checkpoint
  ultramem train --preset tiny --out runs/x --overwrite   # delete the run in runs/x, start over

A fresh run (no --resume) refuses an --out directory that is not empty, so it never mixes its
metrics and checkpoints with another run's; --overwrite deletes a previous run there first.
  torchrun --nproc_per_node 2 -m ultramem.cli train --preset tiny --out runs/ddp
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model; checkpoints, metrics and plots go to --out",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model preset (default tiny)")
    p.add_argument("--config", default=None, help="YAML file: preset, model, train, data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field: lr=1e-3, train.steps=50, model.memory.top_m=8")
    p.add_argument("--data", default=None,
                   help="prepared data directory (`ultramem prepare`); default: built-in corpora")
    p.add_argument("--steps", type=int, default=None, help="shortcut for --set steps=N")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (its checkpoints, metrics, config) first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# What a run directory holds (`Trainer`): --overwrite deletes a directory only if it has one.
RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints")


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> str | None:
    """Why a run may not start in `out`, or None; with overwrite, clear a previous run there."""
    if resume and overwrite:
        return "--resume and --overwrite exclude each other"
    if resume or not out.exists():
        return None
    if not out.is_dir():
        return f"--out {out} is a file, not a run directory"
    if not any(out.iterdir()):
        return None
    is_run = any((out / name).exists() for name in RUN_MARKERS)
    if not overwrite:
        what = "a previous run" if is_run else "files"
        return (f"--out {out} already holds {what}; use --resume to continue it, --overwrite to "
                f"delete it and start over, or a new --out")
    if not is_run:
        return (f"--out {out} is not empty and holds no run ({', '.join(RUN_MARKERS)}): "
                f"--overwrite deletes only run directories; choose a new --out")
    shutil.rmtree(out)
    return None


def run(args: argparse.Namespace) -> int:
    from ultramem.config import ConfigError
    from ultramem.data.shards import DataError
    from ultramem.train.config import build_configs
    from ultramem.train.trainer import NonFiniteError, Trainer

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    try:
        model_cfg, train_cfg, extra = build_configs(args.preset, args.config, overrides)
    except ConfigError as err:
        print(f"ultramem train: config error: {err}")
        return 2
    train_overrides: dict = {}
    if args.resume:  # only the train fields named on the command line change a saved run
        from ultramem.train.config import TrainConfig, apply_overrides

        apply_overrides({}, train_overrides, overrides)
        try:
            TrainConfig.from_dict(train_overrides)
        except (ConfigError, TypeError) as err:
            print(f"ultramem train: config error: {err}")
            return 2
    # Under torchrun only rank 0 writes (and may delete); the others follow it or are stopped.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    problem = (check_out_dir(Path(args.out), resume=args.resume, overwrite=args.overwrite)
               if rank0 else None)
    if problem is not None:
        print(f"ultramem train: {problem}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(model_cfg, train_cfg, args.out, args.data or extra.get("data"),
                          resume=args.resume, show_progress=not args.quiet,
                          extra_config={"preset": extra["preset"]},
                          train_overrides=train_overrides)
        summary = trainer.fit()
    except NonFiniteError as err:
        print(f"ultramem train: {err}")
        return 3
    except (FileNotFoundError, DataError) as err:
        print(f"ultramem train: {err}", file=sys.stderr)
        return 2
    if trainer.rank0:
        from ultramem.train.checkpoint import latest_checkpoint

        ev = summary["eval_loss"]
        print(f"done: {summary['steps']} steps, train loss {summary['final_loss']:.4f}"
              + (f", eval loss {ev:.4f}" if ev is not None else "")
              + f", {summary['skipped_steps']} skipped; outputs in {summary['out']}")
        last = latest_checkpoint(Path(summary["out"]) / "checkpoints")
        if last is not None:
            print(f"checkpoint: {last}")
    return 0
