"""Checkpoints: a directory per saved step, written under a temporary name and renamed.

Layout of `RUN/checkpoints/step_00000100/`:
  config.json         {"format", "version", "step", "model": ModelConfig.to_dict(),
                       "train": TrainConfig.to_dict(), "tokenizer": spec}
  model.safetensors   the model's state_dict (shared tensors stored once, safetensors' save_model)
  tokenizer.json      the BPE tokenizer, when the run used one
  optimizer.pt        optimizer state dicts (tensors and numbers only: torch.load weights_only)
  trainer_state.json  step, data position, skipped-step counters
  rng.pt              torch RNG state (weights_only)
  checksums.json      {"sha256": {file: digest}} of every file above, written last

Everything is written and fsynced into `.tmp-step_...-PID`, then renamed: a rename is atomic, so
a directory named `step_*` is complete, and a writer killed midway leaves only a `.tmp-*`
directory that loaders ignore and the next save removes. The last `keep_last` are kept.

Loading checks what it reads and raises `CheckpointError` naming the file: a missing or
unparsable file, one whose checksum differs from the one saved (truncated, flipped bytes),
weights holding NaN or inf, a shuffle buffer (`*.perm`) that is not a permutation. A run
directory resolves to its newest checkpoint that passes (`latest_good_checkpoint`), with a
warning naming each newer damaged one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ultramem.config import ModelConfig

FORMAT = "ultramem-checkpoint"
VERSION = 1
REQUIRED = ("config.json", "model.safetensors", "trainer_state.json")
CHECKSUMS = "checksums.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing file, damaged, not ours); names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


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
    sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=2))
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


def check_files(ckpt: str | Path, required: Iterable[str] = ("config.json", "model.safetensors"),
                ) -> None:
    """CheckpointError naming the first file of ckpt that is missing or differs from what was
    saved (checksums.json; checkpoints written before it existed are checked for presence)."""
    ckpt = Path(ckpt)
    for name in required:
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name}: missing")
    if not (ckpt / CHECKSUMS).is_file():
        return
    sums = _read_json(ckpt / CHECKSUMS)
    if not isinstance(sums, dict) or not isinstance(sums.get("sha256"), dict):
        raise CheckpointError(f"{ckpt / CHECKSUMS}: no 'sha256' mapping")
    for name in sums["sha256"]:
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name}: missing (listed in {CHECKSUMS})")
    stamp = _stamp(ckpt, sums["sha256"])
    if _HASHED.get(ckpt.resolve()) == stamp:  # hashed already, e.g. by `resolve` a moment ago
        return
    for name, digest in sums["sha256"].items():
        if _sha256(ckpt / name) != digest:
            raise CheckpointError(f"{ckpt / name}: checksum mismatch: the file is damaged or "
                                  f"was changed after it was saved")
    _HASHED[ckpt.resolve()] = stamp


# checkpoint directory -> stamp of the files whose checksums last matched: loading a run directory
# verifies the newest checkpoint (`resolve`) and then loads it; the files are hashed once, not
# twice, unless they changed in between (size or modification time)
_HASHED: dict[Path, tuple] = {}


def _stamp(ckpt: Path, names: Iterable[str]) -> tuple:
    return tuple((name, (st := (ckpt / name).stat()).st_size, st.st_mtime_ns)
                 for name in sorted(names))


def check_tensors(named: Iterable[tuple[str, torch.Tensor]], file: str | Path) -> None:
    """CheckpointError if a weight holds NaN/inf or a shuffle buffer (`*.perm`, each row a
    permutation of its indices) is not one: both load fine and then decode garbage."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{file}: {name} holds NaN or inf values")
        if name.rsplit(".", 1)[-1] == "perm" and t.numel():
            ref = torch.arange(t.shape[-1], dtype=t.dtype).expand_as(t)
            if not torch.equal(t.sort(dim=-1).values, ref):
                raise CheckpointError(f"{file}: {name} is not a permutation (damaged shuffle "
                                      f"buffer)")


def verify_checkpoint(ckpt: str | Path) -> None:
    """Everything `load_model` and a resume read from ckpt, checked without building the model:
    files and checksums, config.json, trainer_state.json, every tensor. CheckpointError if not."""
    from safetensors import SafetensorError, safe_open

    ckpt = Path(ckpt)
    check_files(ckpt, REQUIRED)
    read_config(ckpt)
    _read_json(ckpt / "trainer_state.json")
    file = ckpt / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as fh:
            check_tensors(((k, fh.get_tensor(k)) for k in fh.keys()), file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


def latest_good_checkpoint(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint under root that verifies, [(step directory, CheckpointError message)]
    of the newer ones that do not, newest first); (None, [...]) when none verifies."""
    root = Path(root)
    steps = sorted((int(m.group(1)), d) for d in (root.iterdir() if root.is_dir() else [])
                   if (m := _STEP_DIR.match(d.name)) and d.is_dir())
    damaged: list[tuple[Path, str]] = []
    for _, d in reversed(steps):
        try:
            verify_checkpoint(d)
        except CheckpointError as err:
            damaged.append((d, str(err)))
            continue
        return d, damaged
    return None, damaged


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to `step_N.damaged[-k]`, out of the loaders' sight."""
    k, target = 1, ckpt.with_name(ckpt.name + ".damaged")
    while target.exists():
        k += 1
        target = ckpt.with_name(f"{ckpt.name}.damaged-{k}")
    os.rename(ckpt, target)
    return target


def _is_checkpoint_dir(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) or any(
        (path / name).is_file() for name in ("model.safetensors", CHECKSUMS, "trainer_state.json"))


def resolve(path: str | Path, warn: Callable[[str], None] | None = None) -> Path:
    """A checkpoint directory: path itself, or the newest good one under path/checkpoints/ or
    path/ (a run directory). Newer damaged ones are skipped with a warning (`warn(message)`,
    default `warnings.warn`); if none is good, the newest one's CheckpointError is raised."""
    path = Path(path)
    if _is_checkpoint_dir(path) and not (path / "checkpoints").is_dir():
        return path
    for root in (path / "checkpoints", path):
        found, damaged = latest_good_checkpoint(root)
        if found is None and damaged:
            raise CheckpointError(damaged[0][1])
        if found is not None:
            for _, message in damaged:
                text = f"skipping a damaged checkpoint: {message}; using {found}"
                if warn is None:
                    warnings.warn(text, stacklevel=2)
                else:
                    warn(text)
            return found
    where = "" if path.is_dir() else " (no such directory)"
    raise FileNotFoundError(f"no complete checkpoint at {path}{where}")


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint (see `resolve` for what path may be), its model config
    checked; CheckpointError naming the file if it is missing, unparsable or not ours."""
    file = resolve(path) / "config.json"
    data = _read_json(file)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{file}: not an ultramem checkpoint (format={fmt!r})")
    try:
        ModelConfig.from_dict(data["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: invalid model config ({err})") from None
    return data


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """The `LM` saved in a checkpoint, weights loaded with safetensors only (no pickle), after
    `check_files`; after loading, `check_tensors`. CheckpointError naming the file if not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load_model

    from ultramem.model import LM

    ckpt = resolve(path)
    check_files(ckpt)
    cfg = ModelConfig.from_dict(read_config(ckpt)["model"])
    model = LM(cfg, init=False)
    file = ckpt / "model.safetensors"
    try:
        st_load_model(model, str(file), strict=True, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as err:  # damaged, or not config.json's
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{file}: cannot be loaded into the model config.json describes "
                              f"({first})") from None
    check_tensors(model.state_dict().items(), file)
    return model.to(device)


def load_tokenizer(path: str | Path):
    """The tokenizer recorded in a checkpoint's config.json."""
    from ultramem.data.tokenizer import load_tokenizer as _load

    ckpt = resolve(path)
    spec = read_config(ckpt).get("tokenizer", {"kind": "bytes"})
    try:
        return _load(spec, ckpt)
    except FileNotFoundError as err:
        raise CheckpointError(f"{ckpt / 'config.json'} names a tokenizer file that is missing: "
                              f"{err}") from None
    except Exception as err:  # tokenizers raises its parse errors as plain Exception
        raise CheckpointError(f"{ckpt}: tokenizer {spec!r} is not readable ({err})") from None


def load_training_state(path: str | Path) -> dict[str, Any]:
    """{'trainer': trainer_state.json, 'optimizer': ..., 'rng': ...} (weights_only loads)."""
    ckpt = resolve(path)
    out: dict[str, Any] = {"trainer": json.loads((ckpt / "trainer_state.json").read_text())}
    for name in ("optimizer", "rng"):
        f = ckpt / f"{name}.pt"
        out[name] = torch.load(f, weights_only=True, map_location="cpu") if f.is_file() else None
    return out
