"""Sparse layers, one kind per file, each a `SparseLayer` (the contract, in `common.py`):
`layer(u [..., h]) -> [..., h]`.

`LAYER_CLASSES` is the registry: `cfg.memory.kind` -> layer class. The model builds layers
through it, and `ultramem.accounting` reads each kind's cost model from it. A new kind is its
config in `ultramem.config`, its file here and one line below.
"""

from __future__ import annotations

from torch import nn

from ultramem.config import ModelConfig
from ultramem.layers.common import SparseLayer, Table
from ultramem.layers.ffn import SwiGLU
from ultramem.layers.memory_plus import MemoryPlusLayer, SharedValues
from ultramem.layers.moe import MoELayer
from ultramem.layers.peer import PEERLayer
from ultramem.layers.pkm import PKMLayer, ProductKeyQuery
from ultramem.layers.ultramem_v1 import UltraMemV1Layer
from ultramem.layers.ultramem_v2 import UltraMemV2Layer, ValueStore

LAYER_CLASSES: dict[str, type[SparseLayer]] = {
    "ultramem_v2": UltraMemV2Layer,
    "moe": MoELayer,
    "pkm": PKMLayer,
    "peer": PEERLayer,
    "memory_plus": MemoryPlusLayer,
    "ultramem_v1": UltraMemV1Layer,
}


def layer_class(kind: str) -> type[SparseLayer]:
    """The `SparseLayer` subclass registered for `kind`."""
    cls = LAYER_CLASSES.get(kind)
    if cls is None:
        raise ValueError(f"memory.kind: no layer registered for {kind!r}")
    return cls


def build_value_store(cfg: ModelConfig) -> nn.Module | None:
    """Tables shared by all sparse layers of `LM(cfg)` (S_g-Ring for UltraMemV2, the single table
    of Memory+: the kind's `build_store`), or None when layers own their tables."""
    return None if cfg.memory is None else layer_class(cfg.memory.kind).build_store(cfg)


def build_memory_layer(cfg: ModelConfig, *, slot: int, store: nn.Module | None) -> SparseLayer:
    """The sparse layer of memory slot `slot` (its index among the memory layers)."""
    cls = layer_class(cfg.memory.kind)
    return cls(cfg.memory, cfg.d_model, slot=slot, n_slots=len(cfg.memory_blocks), store=store)


__all__ = [
    "LAYER_CLASSES", "MemoryPlusLayer", "MoELayer", "PEERLayer", "PKMLayer", "ProductKeyQuery",
    "SharedValues", "SparseLayer", "SwiGLU", "Table", "UltraMemV1Layer", "UltraMemV2Layer",
    "ValueStore", "build_memory_layer", "build_value_store", "layer_class",
]
