"""`TrainConfig`: every knob of a training run, a frozen dataclass validated field by field.

Also: building a (ModelConfig, TrainConfig) pair from a preset, a YAML file and `key=value`
overrides, the way `ultramem train` does. Override keys: `model.FIELD`, `model.memory.FIELD`,
and `FIELD` or `train.FIELD` for this dataclass. Values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ultramem.config import SPARSE_CONFIGS, ConfigError, ModelConfig, check_types
from ultramem.precision import PRECISIONS

SCHEDULES = ("cosine", "wsd", "constant")
VALUE_LR_SCHEDULES = ("auto", "constant", "v1")
VALUE_UPDATES = ("sparse", "dense")
VALUE_OPTIMIZERS = ("adam", "adagrad")
PARALLEL = ("ddp", "fsdp")
CKPT_FORMATS = ("auto", "full", "sharded")


def _require(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {reason}")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. lr schedule: linear warmup, then cosine to min_lr_ratio * lr, or
    warmup-stable-decay (`wsd`: flat, then linear decay over the last decay_frac of steps).

    Value and pre-value tables form their own group: lr = schedule(step) * value_lr_scale *
    multiplier, the multiplier constant 1 (`constant`, the paper's choice) or UltraMem v1's linear
    4x -> 1x decay (`v1`, its endpoints from an `UltraMemV1Config` model's value_lr_start/end);
    `auto` (default) is `v1` for UltraMem v1 models and `constant` for every other.
    value_update `sparse` gives them row-sparse gradients and a lazy row update
    (`value_optimizer`: `adam` or row-wise `adagrad`); `dense` puts them in AdamW.
    grad_clip clips all other gradients by global norm, value_grad_clip the tables' (0 = off).
    A non-finite loss or gradient skips the step; max_bad_steps in a row stop the run.
    precision: `auto` (default: bf16 mixed precision where the device runs bf16 matmuls fast,
    i.e. CUDA or a CPU with AVX-512 BF16 / AMX, else fp32), `bf16` or `fp32`; bf16 keeps float32
    master weights and optimizer state and float32 retrieval (`ultramem.precision`).
    activation_checkpointing: recompute each block's activations in the backward instead of keeping
    them (`LM.activation_checkpointing`): same gradients, less memory, one more forward per step.
    device: `auto` (CUDA when available, else CPU), `cpu` or `cuda`. threads: CPU threads for
    torch (0 = torch's default; 1 avoids OpenMP stalls on a machine shared with other jobs).
    Under torchrun: parallel `ddp` or `fsdp` (FSDP2) for dense weights; shard_tables splits
    UltraMemV2 value tables by columns across ranks (`train.sharded_tables`), else they are
    replicated.
    ckpt_format: `full` (rank 0 gathers everything and writes model.safetensors + optimizer.pt),
    `sharded` (torch.distributed.checkpoint: each rank writes its own shards), `auto` (default:
    sharded under torchrun with more than one rank, full otherwise); `train.checkpoint`.
    data_workers: DataLoader worker processes preparing batches ahead of the step (0 = in the
    training process); the batches are the same whatever the number (`data.shards`).
    """

    steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128  # tokens per training sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # cosine and wsd end at min_lr_ratio * lr
    warmup: int = 20  # steps of linear warmup
    schedule: str = "cosine"  # cosine, wsd (warmup-stable-decay) or constant
    decay_frac: float = 0.2  # wsd: the fraction of steps spent decaying
    weight_decay: float = 0.1  # AdamW decay of matrices (linear maps, embeddings, keys)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    value_lr_schedule: str = "auto"  # value tables' multiplier: auto, constant or v1
    value_lr_scale: float = 1.0  # value tables' lr = schedule(step) * value_lr_scale * multiplier
    value_weight_decay: float = 0.0  # weight decay of the value tables
    value_update: str = "sparse"  # sparse (lazy row update) or dense (AdamW) value tables
    value_optimizer: str = "adam"  # sparse value update: adam or row-wise adagrad
    grad_clip: float = 1.0  # global-norm clip of all but the tables' gradients (0 = off)
    value_grad_clip: float = 1.0  # global-norm clip of the tables' gradients (0 = off)
    precision: str = "auto"
    activation_checkpointing: bool = False
    eval_every: int = 100  # steps between evaluations (0 = none)
    eval_batches: int = 8  # batches per evaluation
    log_every: int = 10  # steps between metrics.jsonl rows
    ckpt_every: int = 100  # steps between checkpoints (0 = only at the end)
    # Also checkpoint at the first logged step this many minutes after the last checkpoint
    # (0 = off): bounds the work a kill or a session's end loses, whatever a step costs.
    ckpt_minutes: float = 0.0
    keep_last: int = 3  # checkpoints kept
    max_bad_steps: int = 5  # non-finite steps in a row that stop the run
    seed: int = 0  # seeds the model init and the batch order
    device: str = "auto"
    threads: int = 0
    tensorboard: bool = True  # write TensorBoard logs to tb/
    plot: bool = True  # draw loss.png at the end
    parallel: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2) for dense weights
    shard_tables: bool = False
    ckpt_format: str = "auto"
    data_workers: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches",
                     "log_every", "keep_last", "max_bad_steps"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, name,
                     f"must be a positive integer, got {v!r}")
        for name in ("warmup", "eval_every", "ckpt_every", "seed", "threads", "data_workers"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 0, name, f"must be an integer >= 0, got {v!r}")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.ckpt_minutes >= 0, "ckpt_minutes", "must be >= 0 (0 = off)")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must lie in [0, 1]")
        _require(0 < self.decay_frac <= 1, "decay_frac", "must lie in (0, 1]")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must lie in [0, 1)")
        for name in ("weight_decay", "value_weight_decay", "grad_clip", "value_grad_clip", "eps"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(self.value_lr_scale > 0, "value_lr_scale", "must be > 0")
        for name, allowed in (("schedule", SCHEDULES), ("value_lr_schedule", VALUE_LR_SCHEDULES),
                              ("value_update", VALUE_UPDATES),
                              ("value_optimizer", VALUE_OPTIMIZERS),
                              ("precision", PRECISIONS), ("parallel", PARALLEL),
                              ("ckpt_format", CKPT_FORMATS)):
            _require(getattr(self, name) in allowed, name,
                     f"must be one of {allowed}, got {getattr(self, name)!r}")
        _require(not (self.value_update == "dense" and self.value_optimizer == "adagrad"),
                 "value_optimizer", "adagrad is the sparse path's option; dense uses AdamW")
        kind, _, index = self.device.partition(":")
        _require(self.device in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()),
                 "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(not (self.shard_tables and self.value_optimizer == "adagrad"),
                 "shard_tables", "column-sharded tables support value_optimizer=adam only "
                 "(row-wise Adagrad would need its row statistics summed across ranks)")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - known)
        _require(not bad, bad[0] if bad else "", "unknown TrainConfig field")
        return cls(**check_types(cls, data))


def parse_value(text: str) -> Any:
    """A YAML scalar or list: '3e-4' -> 0.0003, 'true' -> True, '[0, 2]' -> [0, 2].
    Without PyYAML (the `train` extra), JSON syntax is understood and anything else is a string."""
    try:
        import yaml

        value = yaml.safe_load(text)
    except ImportError:
        import json

        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
    if isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(model: dict[str, Any], train: dict[str, Any],
                    overrides: list[str]) -> None:
    """Apply `key=value` strings to the model and train dicts in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected key=value, got {item!r}")
        value = parse_value(text)
        parts = key.split(".")
        if parts[0] == "model":
            target, parts = model, parts[1:]
        else:
            target, parts = train, parts[1:] if parts[0] == "train" else parts
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set: {key}: {p} is not a section")
        if not parts:
            raise ConfigError(f"--set: {key}: names a section, not a field")
        target[parts[-1]] = value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML run file: a mapping with the sections `preset`, `model`, `train`, `data`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where} "
                          f"({getattr(err, 'problem', None) or err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    bad = sorted(set(data) - {"preset", "model", "train", "data"})
    _require(not bad, bad[0] if bad else "", f"unknown section in {path}")
    for name in ("model", "train"):
        _require(isinstance(data.get(name) or {}, dict), f"{path}: {name}",
                 "must be a mapping of fields")
    return data


def build_configs(preset: str | None = None, config_file: str | Path | None = None,
                  overrides: list[str] | None = None,
                  train_defaults: dict[str, Any] | None = None,
                  ) -> tuple[ModelConfig, TrainConfig, dict]:
    """(model config, train config, extra) from a preset, a YAML file and overrides.

    The YAML file may hold `preset`, `model` (field changes; `memory` as a nested mapping),
    `train` (TrainConfig fields) and `data` (a prepared data directory), returned in extra.
    train_defaults replace TrainConfig defaults (the file and overrides still win).
    """
    file_cfg = read_config_file(config_file) if config_file is not None else {}
    preset = preset or file_cfg.get("preset") or "tiny"
    model_changes = dict(file_cfg.get("model") or {})
    train_changes = {**(train_defaults or {}), **(file_cfg.get("train") or {})}
    apply_overrides(model_changes, train_changes, overrides or [])
    model_cfg = ModelConfig.from_dict(merge_model_changes(ModelConfig.preset(preset).to_dict(),
                                                          model_changes))
    train_cfg = TrainConfig.from_dict(train_changes)
    return model_cfg, train_cfg, {"preset": preset, "data": file_cfg.get("data")}


def merge_model_changes(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """base (a ModelConfig dict) with changes applied; `memory` changes merge into base's memory
    (false: the dense model; another `kind`: that kind's defaults, not base's fields). A memory
    field the kind does not have is a ConfigError naming it."""
    changes = dict(changes)
    mem_changes = changes.pop("memory", None)
    _require(mem_changes is None or mem_changes is False or isinstance(mem_changes, dict),
             "model.memory", f"must be a mapping of memory-layer fields, or null/false for the "
             f"dense model, got {mem_changes!r}")
    out = {**base, **changes}
    if mem_changes is not None:
        old = out.get("memory")
        if mem_changes is False:
            out["memory"] = None
        elif old is None or mem_changes.get("kind", old.get("kind")) != old.get("kind"):
            out["memory"] = mem_changes  # a new kind starts from its own class's defaults
        else:
            out["memory"] = {**old, **mem_changes}
        if out["memory"] is not None:
            _check_memory_fields(out["memory"].get("kind", "ultramem_v2"), mem_changes)
    return out


def _check_memory_fields(kind: Any, changes: dict[str, Any]) -> None:
    """ConfigError naming a changed memory field that memory kind `kind` does not have."""
    if not isinstance(kind, str) or kind not in SPARSE_CONFIGS:
        return  # sparse_config_from_dict names the bad kind
    owners = {k: {f.name for f in dataclasses.fields(c)} for k, c in SPARSE_CONFIGS.items()}
    for name in changes:
        if name not in owners[kind]:
            others = [k for k, names in owners.items() if name in names]
            where = f"a field of {', '.join(others)}" if others else "no memory kind has it"
            raise ConfigError(f"model.memory.{name}: not a field of memory kind {kind!r} "
                              f"({SPARSE_CONFIGS[kind].__name__}; {where})")
