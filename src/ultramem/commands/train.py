"""`ultramem train`: train a preset (or a YAML config) on prepared or built-in data.

Examples:
  ultramem train --preset tiny --steps 200 --out runs/x
  ultramem train --config run.yaml --lr 1e-3 --model.memory.top-m 32 --out runs/y
  ultramem train --config run.yaml --set lr=1e-3 --set model.memory.top_m=32 --out runs/y
  ultramem train --out runs/x --resume            # continue from the latest checkpoint
  ultramem train --preset tiny --out runs/x --overwrite   # delete the run in runs/x, start over

  ultramem train --out runs/x --resume --steps 400 --set lr=1e-3   # train longer, lower lr
  torchrun --nproc_per_node 2 -m ultramem.cli train --preset tiny --out runs/ddp

A fresh run (no --resume) refuses an --out directory that is not empty, so it never mixes its
metrics and checkpoints with another run's; --overwrite deletes a previous run there first.
--resume continues from the newest checkpoint that verifies (a damaged newer one is renamed
step_N.damaged, with a warning); train fields may change and are printed, the model and the
tokenizer may not. Ctrl-C stops training and prints the command that resumes it (exit code 130).

Every config field is a flag, listed below: --FIELD or --train.FIELD (TrainConfig),
--model.FIELD (ModelConfig), --model.memory.FIELD (the memory kind's config). A flag is the
same as --set KEY=VALUE (values read as YAML, checked against the field's type). Precedence:
the preset, then the --config file, then flags and --set in command-line order (--steps and
--threads last). A memory field of another kind than the model's is an error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ultramem.config import ModelConfig
    from ultramem.train.config import TrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultramem.cli import DEFAULT_THREADS, add_threads_argument

    p = sub.add_parser("train", help="train a model; checkpoints, metrics and plots go to --out",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model preset (default: the config's, or tiny)")
    p.add_argument("--config", default=None, help="YAML file: preset, model, train, data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field: lr=1e-3, train.steps=50, model.memory.top_m=8")
    p.add_argument("--data", default=None,
                   help="prepared data directory (`ultramem prepare`); default: built-in corpora")
    p.add_argument("--steps", type=int, default=None, help="shortcut for --set steps=N")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest good checkpoint; train fields (lr, steps, ...) "
                        "may change, the model may not")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (its checkpoints, metrics, config) first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_argument(p, default=None,
                         note=f"; shortcut for --set threads=N (default {DEFAULT_THREADS}, or the "
                              f"config's; on --resume the run's)")
    usage = p.format_usage().removeprefix("usage: ").rstrip()
    p.usage = f"{usage}\n{' ' * len('usage: ultramem train ')}[--FIELD VALUE ...]"
    from ultramem.commands.config_flags import add_field_flags

    add_field_flags(p)
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


# Train fields a resume cannot change: the saved optimizer state has their layout.
FIXED_ON_RESUME = ("value_update", "value_optimizer")


@dataclass
class ResumePlan:
    """What `train --resume` will do, worked out before anything is written."""

    checkpoint: Path  # the newest good checkpoint
    step: int
    damaged: list[tuple[Path, str]]  # newer checkpoints that failed verification, and why
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    changes: dict[str, Any]  # train fields that differ from the saved run
    summary: str  # the line printed before training
    data_dir: str | None  # None: the saved run's
    preset: str | None

    @property
    def complete(self) -> bool:
        return self.step >= self.train_cfg.steps


def run(args: argparse.Namespace) -> int:
    from ultramem.cli import UsageError, check_device
    from ultramem.train.trainer import NonFiniteError, Trainer

    out = Path(args.out)
    plan = None
    if args.resume:
        plan = _resume_plan(args, out, overrides_of(args))
        model_cfg, train_cfg, preset, data_dir = (plan.model_cfg, plan.train_cfg, plan.preset,
                                                  plan.data_dir)
    else:
        model_cfg, train_cfg, extra = configs_of(args)
        preset, data_dir = extra["preset"], args.data or extra.get("data")
        if data_dir is not None:
            _check_data(Path(data_dir), train_cfg.seq_len, train_cfg.batch_size)
    if train_cfg.device != "auto":
        check_device(train_cfg.device, f"device={train_cfg.device}")
    # Under torchrun only rank 0 writes (and may delete); the others follow it or are stopped.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    problem = check_out_dir(out, resume=args.resume, overwrite=args.overwrite) if rank0 else None
    if problem is not None:
        raise UsageError(problem)
    if plan is not None:
        if plan.complete:
            print(f"the run in {out} is already complete ({plan.step} of {train_cfg.steps} "
                  f"steps); to train longer: ultramem train --resume --out {out} --steps N")
            return 0
        if rank0:
            _set_aside_damaged(plan)
        print(plan.summary)
    trainer = None
    try:
        trainer = Trainer(model_cfg, train_cfg, out, data_dir, resume=args.resume,
                          show_progress=not args.quiet, extra_config={"preset": preset},
                          train_overrides=plan.changes if plan else None)
        summary = trainer.fit()
    except NonFiniteError as err:
        print(f"ultramem train: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"ultramem train: {_interrupted(out, trainer)}", file=sys.stderr)
        return 130
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


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The `KEY=VALUE` changes asked for: --set and field flags in command-line order, then the
    --steps and --threads shortcuts."""
    overrides = list(args.overrides)
    for flag, value in (("steps", args.steps), ("threads", args.threads)):
        if value is not None:
            overrides.append(f"{flag}={value}")
    return overrides


def configs_of(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, dict]:
    """(model config, train config, extra) of a fresh run: the preset, then the --config file,
    then the flags (`build_configs`); ConfigError names a bad field."""
    from ultramem.commands.config_flags import cli_train_defaults
    from ultramem.train.config import build_configs

    return build_configs(args.preset, args.config, overrides_of(args),
                         train_defaults=cli_train_defaults())


def _check_data(data_dir: Path, seq_len: int, batch_size: int) -> None:
    """DataError now, before the model is built, if data_dir cannot give one window of seq_len."""
    from ultramem.data.shards import BatchOrder, TokenShards

    BatchOrder(TokenShards(data_dir, "train"), seq_len, batch_size)


def _resume_plan(args: argparse.Namespace, out: Path, overrides: list[str]) -> ResumePlan:
    """The newest good checkpoint and the changes asked for, or a UsageError for a change a
    resume cannot make: the model (--preset, --set model.*, the config's model section), the
    tokenizer (--data), FIXED_ON_RESUME. Train fields (lr, steps, ...) may change."""
    from ultramem.cli import UsageError
    from ultramem.config import ModelConfig
    from ultramem.train import checkpoint as ckpt
    from ultramem.train.config import (
        TrainConfig,
        apply_overrides,
        merge_model_changes,
        read_config_file,
    )

    good, damaged = ckpt.latest_good_checkpoint(out / "checkpoints")
    if good is None:
        if damaged:
            raise ckpt.CheckpointError(damaged[0][1])
        raise UsageError(f"--resume: no checkpoint in {out / 'checkpoints'} to continue from")
    saved = ckpt.read_config(good)
    step = int(ckpt.load_training_state(good)["trainer"]["step"])
    if args.preset is not None and args.preset != saved.get("preset"):
        raise UsageError(f"--resume: the run in {out} trains preset {saved.get('preset')!r}, not "
                         f"{args.preset!r}; the model cannot change on resume (use a new --out)")
    file_cfg = read_config_file(args.config) if args.config is not None else {}
    model_changes, train_changes = dict(file_cfg.get("model") or {}), dict(
        file_cfg.get("train") or {})
    apply_overrides(model_changes, train_changes, overrides)

    model_cfg = ModelConfig.from_dict(saved["model"])
    asked = ModelConfig.from_dict(merge_model_changes(saved["model"], model_changes))
    for key, old, new in _differences(model_cfg.to_dict(), asked.to_dict(), "model."):
        if key == "model.vocab_size" or (key == "model.max_seq_len" and new < old):
            continue  # the trainer sets these from the data and seq_len, as it did at the start
        raise UsageError(f"--resume: {key} cannot change on resume (the run has {old!r}, asked "
                         f"{new!r}); the model is fixed once trained (use a new --out)")

    train_cfg = TrainConfig.from_dict({**saved["train"], **train_changes})
    changed = list(_differences(saved["train"], train_cfg.to_dict()))
    for key, old, new in changed:
        if key in FIXED_ON_RESUME:
            raise UsageError(f"--resume: {key} cannot change on resume (the run has {old!r}, "
                             f"asked {new!r}): the saved optimizer state depends on it")
    data_dir = args.data or file_cfg.get("data")
    old_data = saved.get("data_dir")
    if data_dir is not None and (old_data is None
                                 or Path(data_dir).resolve() != Path(old_data).resolve()):
        _check_resume_data(Path(data_dir), good, saved, train_cfg.seq_len, train_cfg.batch_size)
        changed.append(("data", old_data, str(data_dir)))
    what = ", ".join(f"{k} {old} -> {new}" for k, old, new in changed)
    return ResumePlan(
        checkpoint=good, step=step, damaged=damaged, model_cfg=model_cfg, train_cfg=train_cfg,
        changes={k: new for k, _, new in changed if k != "data"},
        summary=f"resuming from {good} (step {step} of {train_cfg.steps})"
                + (f"; changed: {what}" if what else ""),
        data_dir=data_dir, preset=saved.get("preset"))


def _differences(before: dict, after: dict, prefix: str = ""):
    """(key, old, new) of every field (nested dicts flattened as a.b) that differs."""
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            yield from _differences(old, new, f"{prefix}{key}.")
        elif old != new and not (isinstance(old, list | tuple) and isinstance(new, list | tuple)
                                 and list(old) == list(new)):
            yield f"{prefix}{key}", old, new


def _check_resume_data(data_dir: Path, good: Path, saved: dict, seq_len: int,
                       batch_size: int) -> None:
    """--data on resume may point at moved data, not at data of another tokenizer."""
    from ultramem.cli import UsageError
    from ultramem.data.shards import read_meta

    meta = read_meta(data_dir)
    new_file, old_file = data_dir / "tokenizer.json", good / "tokenizer.json"
    same = (meta["vocab_size"] == saved["model"]["vocab_size"]
            and meta["tokenizer"] == saved.get("tokenizer", meta["tokenizer"])
            and not (new_file.is_file() and old_file.is_file()
                     and new_file.read_bytes() != old_file.read_bytes()))
    if not same:
        raise UsageError(f"--resume: --data {data_dir} has tokenizer {meta['tokenizer']}, the run "
                         f"was trained with {saved.get('tokenizer')}; the tokenizer cannot change "
                         f"on resume")
    _check_data(data_dir, seq_len, batch_size)


def _set_aside_damaged(plan: ResumePlan) -> None:
    """Rename the damaged checkpoints newer than the one resumed from, so the trainer (which
    resumes from the newest) does not read them; warn naming both. Nothing is deleted."""
    from ultramem.cli import warn
    from ultramem.train import checkpoint as ckpt

    for path, message in plan.damaged:
        kept = ckpt.set_aside(path)
        warn("train", f"skipping a damaged checkpoint: {message}; resuming from "
                      f"{plan.checkpoint} (the damaged one is kept as {kept.name})")


def _interrupted(out: Path, trainer) -> str:
    """The line Ctrl-C prints: where training stopped and how to continue."""
    from ultramem.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(out / "checkpoints")
    if trainer is None:
        where = "before training started"
    else:
        where = f"at step {getattr(trainer, '_last_row', {}).get('step', trainer.start_step)}"
    if last is None:
        return (f"interrupted {where}, before any checkpoint was saved; start over with: "
                f"ultramem train ... --out {out} --overwrite")
    return (f"interrupted {where}; resume with: ultramem train --resume --out {out} "
            f"(continues from {last.name})")
