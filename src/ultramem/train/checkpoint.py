"""Checkpoints: a directory per saved step, written under a temporary name and renamed.

Layout of `RUN/checkpoints/step_00000100/` (format `full`: rank 0 holds and writes everything):
  config.json         {"format", "version", "step", "model": ModelConfig.to_dict(),
                       "train": TrainConfig.to_dict(), "tokenizer": spec}
  model.safetensors   the model's state_dict (shared tensors stored once, safetensors' save_model)
  tokenizer.json      the BPE tokenizer, when the run used one
  optimizer.pt        optimizer state dicts (tensors and numbers only: torch.load weights_only)
  trainer_state.json  step, data position, skipped-step counters
  rng.pt              torch RNG state (weights_only)
  checksums.json      {"sha256": {file: digest}} of every file above, written last

Format `sharded` (`save_sharded_checkpoint`, torch.distributed.checkpoint): every rank writes its
own shards, nothing is gathered. optimizer.pt and rng.pt are replaced by
  dcp/shard-000NN-model-00001-of-00001.safetensors   rank NN-1's shards (DCP's Hugging Face
                      safetensors storage: each tensor's offset in the global tensor is in the
                      file's header, so no pickled metadata file), under global names:
                      `model.NAME`, `optim.OPT.NAME.KEY`, `rng.torch` [ranks, state]
and trainer_state.json also holds the optimizers' hyperparameters and the world size.
model.safetensors is written only into the run's last checkpoint (rank 0 reads the model's
shards back from disk) or on demand (`export_model`); `load_model` reads the shards directly.

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

import contextlib
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
REQUIRED_SHARDED = ("config.json", "trainer_state.json", "checksums.json")
CHECKSUMS = "checksums.json"
SHARDS = "dcp"  # a sharded checkpoint's subdirectory of DCP safetensors files
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


def is_sharded(ckpt: str | Path) -> bool:
    """True for a checkpoint written by `save_sharded_checkpoint`."""
    return (Path(ckpt) / SHARDS).is_dir()


def _required(ckpt: Path) -> tuple[str, ...]:
    return REQUIRED_SHARDED if is_sharded(ckpt) else REQUIRED


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and all((d / f).is_file() for f in _required(d)):
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
    return _publish(tmp, final, keep_last)


def _publish(tmp: Path, final: Path, keep_last: int) -> Path:
    """Rename the finished tmp directory to final (atomically), then prune to keep_last."""
    root = final.parent
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


# -- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------


def _dist() -> tuple[bool, int, int]:
    """(a process group is active, rank, world size)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


@contextlib.contextmanager
def _dcp_quiet():
    """DCP warns each time it runs without a process group; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() without the second name of a tied tensor, so each is stored once."""
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def save_sharded_checkpoint(
    root: str | Path, step: int, *, state: dict[str, Any], config: dict[str, Any],
    trainer_state: dict[str, Any] | None = None, tokenizer_dir: str | Path | None = None,
    keep_last: int = 3, export: bool = False,
) -> Path:
    """Write checkpoint `step` with torch.distributed.checkpoint; every rank calls it, with its
    own `state` (nested dicts of tensors: DTensors for shards, plain tensors for what every rank
    holds alike, written once). Each rank writes and hashes its share; rank 0 adds the JSON files
    (and, with export, model.safetensors read back from the shards), checksums.json, and renames
    the directory into place. Every rank returns the path once it is there. Works without a
    process group too (one process writes one shard file)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    active, rank, world = _dist()
    root = Path(root)
    final = root / step_dir_name(step)
    # The same name on every rank: torchrun's run id is shared by a job's ranks.
    job = os.environ.get("TORCHELASTIC_RUN_ID", "job") if active else str(os.getpid())
    tmp = root / f".tmp-{final.name}-{job}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / SHARDS).mkdir(parents=True)
    if active:
        dist.barrier()
    with _dcp_quiet():  # the writer fsyncs each file
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS),
                                                                save_distributed=True),
                 no_dist=not active)
    # Each rank hashes a share of the shard files (DCP returns once every rank has written).
    files = sorted(f for f in (tmp / SHARDS).iterdir() if f.is_file())
    mine = {f"{SHARDS}/{f.name}": _sha256(f) for i, f in enumerate(files) if i % world == rank}
    (tmp / f".sums-{rank}.json").write_text(json.dumps(mine))
    if active:
        dist.barrier()
    if rank == 0:
        sums: dict[str, str] = {}
        for r in range(world):
            part = tmp / f".sums-{r}.json"
            sums.update(json.loads(part.read_text()))
            part.unlink()
        meta = {"format": FORMAT, "version": VERSION, "step": step, **config}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
            shutil.copyfile(Path(tokenizer_dir) / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step,
                                                            **(trainer_state or {})}))
        if export:
            from safetensors.torch import save_model

            model = _model_from_shards(tmp / SHARDS, ModelConfig.from_dict(config["model"]))
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            del model
        sums.update({f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()})
        (tmp / CHECKSUMS).write_text(json.dumps({"sha256": dict(sorted(sums.items()))},
                                                indent=2))
        _fsync_tree(tmp)
        _fsync_dir(tmp / SHARDS)
        _publish(tmp, final, keep_last)
    if active:
        dist.barrier()
    return final


def shard_metadata(ckpt: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{global name: (global shape, dtype)} of what a sharded checkpoint holds, from the
    safetensors headers of its shard files (JSON: nothing is unpickled)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    md = HuggingFaceStorageReader(str(Path(ckpt) / SHARDS)).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()}


def load_shards(ckpt: str | Path, state: dict[str, Any]) -> None:
    """Fill `state` (nested dicts of tensors or DTensors, the names `save_sharded_checkpoint`
    was given) in place from a sharded checkpoint; each rank reads only the parts of the shard
    files its tensors cover, whatever the world size that wrote them. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    active, _, _ = _dist()
    with _dcp_quiet():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(Path(ckpt) / SHARDS)),
                 no_dist=not active)


def _model_from_shards(shards: Path, cfg: ModelConfig) -> nn.Module:
    """LM(cfg) with its weights read from DCP shard files in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from ultramem.model import LM

    model = LM(cfg, init=False)
    with _dcp_quiet():
        dcp.load({"model": unique_state(model)},
                 storage_reader=HuggingFaceStorageReader(str(shards)), no_dist=True)
    return model


def export_model(path: str | Path) -> Path:
    """The checkpoint's model.safetensors, first written from its shards if it has none (a
    sharded checkpoint other than a run's last): one process, the whole model in memory. The
    file is renamed into place, then added to checksums.json."""
    from safetensors.torch import save_model

    from ultramem.files import atomic_write_text

    ckpt = resolve(path)
    file = ckpt / "model.safetensors"
    if file.is_file():
        return file
    model = load_model(ckpt)
    tmp = ckpt / f".model.safetensors.tmp-{os.getpid()}"
    save_model(model, str(tmp), metadata={"format": "pt"})
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    sums = _read_json(ckpt / CHECKSUMS)
    sums["sha256"]["model.safetensors"] = _sha256(tmp)
    os.replace(tmp, file)  # a kill before the next line leaves a complete file, not yet listed
    atomic_write_text(ckpt / CHECKSUMS, json.dumps(sums, indent=2))
    _HASHED.pop(ckpt.resolve(), None)
    return file


def check_files(ckpt: str | Path, required: Iterable[str] | None = None) -> None:
    """CheckpointError naming the first file of ckpt that is missing or differs from what was
    saved (checksums.json; checkpoints written before it existed are checked for presence).
    required: the files that must exist (default: config.json and the weights, i.e.
    model.safetensors, or checksums.json listing the shards of a sharded checkpoint)."""
    ckpt = Path(ckpt)
    sharded = is_sharded(ckpt)
    if required is None:
        required = ("config.json", CHECKSUMS) if sharded else ("config.json", "model.safetensors")
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
    if sharded:  # the reader takes every file in dcp/: one not saved with the rest is foreign
        for f in sorted((ckpt / SHARDS).iterdir()):
            if f"{SHARDS}/{f.name}" not in sums["sha256"]:
                raise CheckpointError(f"{f}: not listed in {ckpt / CHECKSUMS}: not part of "
                                      f"this checkpoint")
        if not any(name.startswith(f"{SHARDS}/") for name in sums["sha256"]):
            raise CheckpointError(f"{ckpt / SHARDS}: no shard files listed in {CHECKSUMS}")
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
    check_files(ckpt, _required(ckpt))
    read_config(ckpt)
    _read_json(ckpt / "trainer_state.json")
    files = [ckpt / "model.safetensors"] if (ckpt / "model.safetensors").is_file() else []
    if is_sharded(ckpt):
        files += sorted((ckpt / SHARDS).iterdir())
    for file in files:
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
    return bool(_STEP_DIR.match(path.name)) or is_sharded(path) or any(
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
    file = ckpt / "model.safetensors"
    errors: tuple[type[BaseException], ...] = (SafetensorError, OSError, RuntimeError)
    try:
        if file.is_file() or not is_sharded(ckpt):
            model = LM(cfg, init=False)
            st_load_model(model, str(file), strict=True, device=str(device))
        else:  # a sharded checkpoint without the export: read the shards in this process
            from torch.distributed.checkpoint.api import CheckpointException

            errors += (CheckpointException,)
            file = ckpt / SHARDS
            model = _model_from_shards(file, cfg)
    except errors as err:
        # damaged, or not config.json's model
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
    """{'trainer': trainer_state.json, 'optimizer': ..., 'rng': ...} (weights_only loads). A
    sharded checkpoint has neither file (None): its optimizer and RNG state are in the shards
    (`train.distributed.load_sharded_state`)."""
    ckpt = resolve(path)
    out: dict[str, Any] = {"trainer": json.loads((ckpt / "trainer_state.json").read_text())}
    for name in ("optimizer", "rng"):
        f = ckpt / f"{name}.pt"
        out[name] = torch.load(f, weights_only=True, map_location="cpu") if f.is_file() else None
    return out
