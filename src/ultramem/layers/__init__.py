"""Sparse layers, one per file, all with the calling convention `layer(u [..., h]) -> [..., h]`.

`build_memory_layer` picks the layer class from `cfg.memory.kind`; baselines register here.
"""

from __future__ import annotations

from torch import nn

from ultramem.config import ModelConfig
from ultramem.layers.ultramem_v2 import UltraMemV2Layer, ValueStore


def build_value_store(cfg: ModelConfig) -> ValueStore | None:
    """The S_g-Ring store shared by all memory layers, or None when layers own their tables."""
    mem = cfg.memory
    if mem is None or mem.share_group == 1:
        return None
    return ValueStore(len(cfg.memory_blocks), mem.rows_per_table, mem.value_dim,
                      mem.pre_value_dim, mem.share_group)


def build_memory_layer(cfg: ModelConfig, *, slot: int, store: ValueStore | None) -> nn.Module:
    """The sparse layer of memory slot `slot` (its index among the memory layers)."""
    mem = cfg.memory
    if mem.kind == "ultramem_v2":
        return UltraMemV2Layer(mem, cfg.d_model, slot=slot, store=store)
    raise ValueError(f"memory.kind: no layer registered for {mem.kind!r}")


__all__ = ["UltraMemV2Layer", "ValueStore", "build_memory_layer", "build_value_store"]
