"""Parameter groups, learning-rate schedules and the optimizers of a run.

Groups (each named, so a checkpoint or a reader can tell them apart):
- `decay`: matrices and higher (linear maps, embeddings, product keys): AdamW weight decay.
- `no_decay`: vectors and Tucker cores (norm weights, query/key gains, biases, cores): none.
- `values`: value and pre-value tables: their own lr multiplier schedule, and either AdamW
  (value_update=dense) or a row-sparse optimizer (value_update=sparse, see `train.sparse`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ultramem.train.config import TrainConfig
from ultramem.train.sparse import RowAdagrad, RowSparseAdam

TABLE_NAMES = ("values", "pre_values")


def is_table(name: str) -> bool:
    """True for value and pre-value tables by name (a layer's own or a shared store's)."""
    return name.rsplit(".", 1)[-1] in TABLE_NAMES


def table_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the sparse tables: named values / pre_values, plus whatever a
    sparse layer lists in `value_parameters()` (e.g. PEER's expert tables)."""
    listed: set[int] = set()
    layers = model.memory_layers() if hasattr(model, "memory_layers") else []
    for layer in layers:
        if hasattr(layer, "value_parameters"):
            listed.update(id(p) for p in layer.value_parameters())
    return {name: p for name, p in model.named_parameters()
            if is_table(name) or id(p) in listed}


def is_no_decay(name: str, p: nn.Parameter) -> bool:
    return p.dim() < 2 or name.endswith(".cores")


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{'decay': [...], 'no_decay': [...], 'values': [...]} over trainable parameters."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "values": []}
    tables = {id(p) for p in table_parameters(model).values()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in tables:
            groups["values"].append(p)
        elif is_no_decay(name, p):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    return groups


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Base learning rate at (0-based) step: warmup, then cosine / wsd / constant."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    floor = cfg.lr * cfg.min_lr_ratio
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    if cfg.schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.schedule == "wsd":
        decay_start = 1.0 - cfg.decay_frac
        if frac <= decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - floor) * (frac - decay_start) / cfg.decay_frac
    return cfg.lr


def value_lr_multiplier(cfg: TrainConfig, step: int, memory: Any = None) -> float:
    """Value-table lr multiplier: 1 (paper), or v1's linear decay (4x -> 1x) over the run.

    memory: the model's sparse-layer config; the v1 schedule's endpoints live in
    `UltraMemV1Config.value_lr_scale`, and `auto` picks v1 only for UltraMem v1 models.
    """
    from ultramem.config import UltraMemV1Config

    schedule = cfg.value_lr_schedule
    if schedule == "auto":
        schedule = "v1" if isinstance(memory, UltraMemV1Config) else "constant"
    if schedule == "v1":
        v1 = memory if isinstance(memory, UltraMemV1Config) else UltraMemV1Config()
        return cfg.value_lr_scale * v1.value_lr_scale(step, cfg.steps - 1)
    return cfg.value_lr_scale


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """{'main': AdamW over decay/no_decay (and values when dense), 'values': sparse (if any)}."""
    groups = param_groups(model)
    betas = (cfg.beta1, cfg.beta2)
    main = [
        {"name": "decay", "params": groups["decay"], "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "weight_decay": 0.0},
    ]
    opts: dict[str, torch.optim.Optimizer] = {}
    if groups["values"] and cfg.value_update == "dense":
        main.append({"name": "values", "params": groups["values"],
                     "weight_decay": cfg.value_weight_decay})
    opts["main"] = torch.optim.AdamW([g for g in main if g["params"]], lr=cfg.lr, betas=betas,
                                     eps=cfg.eps)
    if groups["values"] and cfg.value_update == "sparse":
        if cfg.value_optimizer == "adam":
            opts["values"] = RowSparseAdam(groups["values"], lr=cfg.lr, betas=betas, eps=cfg.eps,
                                           weight_decay=cfg.value_weight_decay)
        else:
            opts["values"] = RowAdagrad(groups["values"], lr=cfg.lr, eps=cfg.eps,
                                        weight_decay=cfg.value_weight_decay)
        opts["values"].param_groups[0]["name"] = "values"
    return opts


def set_lrs(opts: dict[str, torch.optim.Optimizer], cfg: TrainConfig,
            step: int, memory: Any = None) -> tuple[float, float]:
    """Set every group's lr for step; returns (base lr, value-table lr)."""
    lr = lr_at(cfg, step)
    value_lr = lr * value_lr_multiplier(cfg, step, memory)
    for opt in opts.values():
        for group in opt.param_groups:
            group["lr"] = value_lr if group.get("name") == "values" else lr
    return lr, value_lr
