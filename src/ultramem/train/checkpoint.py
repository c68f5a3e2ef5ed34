"""Checkpoints: a directory per saved step, written under a temporary name and renamed.

Layout of `RUN/checkpoints/step_00000100/`:
  config.json         {"format", "version", "step", "model": ModelConfig.to_dict(),
                       "train": TrainConfig.to_dict(), "tokenizer": spec}
  model.safetensors   the model's state_dict (shared tensors stored once, safetensors' save_model)
  tokenizer.json      the BPE tokenizer, when the run used one
  optimizer.pt        optimizer state dicts (tensors and numbers only: torch.load weights_only)
  trainer_state.json  step, data position, skipped-step counters
  rng.pt              torch RNG state (weights_only)

Everything is written and fsynced into `.tmp-step_...-PID`, then renamed: a rename is atomic, so
a directory named `step_*` is complete, and a writer killed midway leaves only a `.tmp-*`
directory that loaders ignore and the next save removes. The last `keep_last` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ultramem.config import ModelConfig

FORMAT = "ultramem-checkpoint"
VERSION = 1
REQUIRED = ("config.json", "model.safetensors", "trainer_state.json")
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and all((d / f).is_file() for f in REQUIRED):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: str | Path, step: int, *, model: nn.Module, config: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None, trainer_state: dict[str, Any] | None = None,
    rng_state: dict[str, Any] | None = None, tokenizer_dir: str | Path | None = None,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` under root atomically; prune to the last keep_last."""
    from safetensors.torch import save_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    meta = {"format": FORMAT, "version": VERSION, "step": step, **config}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        shutil.copyfile(Path(tokenizer_dir) / "tokenizer.json", tmp / "tokenizer.json")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    if rng_state is not None:
        torch.save(rng_state, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(trainer_state or {})}))
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): swap out the old one
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        doomed = root / f".tmp-del-{old.name}-{os.getpid()}"  # rename first: never half-deleted
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint directory: path itself, or the latest under path/ or path/checkpoints/."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint at {path}")


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint (see `resolve` for what path may be)."""
    data = json.loads((resolve(path) / "config.json").read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not an ultramem checkpoint (format={data.get('format')!r})")
    return data


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """The `LM` saved in a checkpoint, weights loaded with safetensors only (no pickle)."""
    from safetensors.torch import load_model as st_load_model

    from ultramem.model import LM

    ckpt = resolve(path)
    cfg = ModelConfig.from_dict(read_config(ckpt)["model"])
    model = LM(cfg, init=False)
    st_load_model(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
    return model.to(device)


def load_tokenizer(path: str | Path):
    """The tokenizer recorded in a checkpoint's config.json."""
    from ultramem.data.tokenizer import load_tokenizer as _load

    ckpt = resolve(path)
    return _load(read_config(ckpt).get("tokenizer", {"kind": "bytes"}), ckpt)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """{'trainer': trainer_state.json, 'optimizer': ..., 'rng': ...} (weights_only loads)."""
    ckpt = resolve(path)
    out: dict[str, Any] = {"trainer": json.loads((ckpt / "trainer_state.json").read_text())}
    for name in ("optimizer", "rng"):
        f = ckpt / f"{name}.pt"
        out[name] = torch.load(f, weights_only=True, map_location="cpu") if f.is_file() else None
    return out
