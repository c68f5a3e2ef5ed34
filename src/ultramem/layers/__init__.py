"""Sparse layers, one per file, all with the calling convention `layer(u [..., h]) -> [..., h]`.

`build_memory_layer` picks the layer class from `cfg.memory.kind`; `build_ffn` gives a block its
dense FFN unless the sparse layer placed there replaces it (MoE; PKM, PEER and Memory+ by
default).
"""

from __future__ import annotations

from torch import nn

from ultramem.config import MemoryPlusConfig, ModelConfig
from ultramem.layers.ffn import SwiGLU
from ultramem.layers.memory_plus import MemoryPlusLayer, SharedValues
from ultramem.layers.moe import MoELayer
from ultramem.layers.peer import PEERLayer
from ultramem.layers.pkm import PKMLayer, ProductKeyQuery
from ultramem.layers.ultramem_v1 import UltraMemV1Layer
from ultramem.layers.ultramem_v2 import UltraMemV2Layer, ValueStore

LAYER_CLASSES: dict[str, type[nn.Module]] = {
    "ultramem_v2": UltraMemV2Layer,
    "moe": MoELayer,
    "pkm": PKMLayer,
    "peer": PEERLayer,
    "memory_plus": MemoryPlusLayer,
    "ultramem_v1": UltraMemV1Layer,
}


def build_value_store(cfg: ModelConfig) -> nn.Module | None:
    """A value store shared by all memory layers (S_g-Ring for UltraMemV2, the single table of
    Memory+), or None when layers own their tables."""
    mem = cfg.memory
    if isinstance(mem, MemoryPlusConfig):
        return SharedValues(mem.n_values, mem.value_dim or cfg.d_model)
    if mem is None or mem.kind != "ultramem_v2" or mem.share_group == 1:
        return None
    return ValueStore(len(cfg.memory_blocks), mem.rows_per_table, mem.value_dim,
                      mem.pre_value_dim, mem.share_group)


def build_memory_layer(cfg: ModelConfig, *, slot: int, store: nn.Module | None) -> nn.Module:
    """The sparse layer of memory slot `slot` (its index among the memory layers)."""
    mem = cfg.memory
    cls = LAYER_CLASSES.get(mem.kind)
    if cls is None:
        raise ValueError(f"memory.kind: no layer registered for {mem.kind!r}")
    return cls(mem, cfg.d_model, slot=slot, store=store)


def build_ffn(cfg: ModelConfig, block: int) -> nn.Module | None:
    """Block `block`'s dense SwiGLU FFN, or None where its sparse layer replaces the FFN."""
    if block not in cfg.ffn_blocks:
        return None
    return SwiGLU(cfg.d_model, cfg.ffn_hidden)


__all__ = [
    "LAYER_CLASSES", "MemoryPlusLayer", "MoELayer", "PEERLayer", "PKMLayer", "ProductKeyQuery",
    "SharedValues", "SwiGLU", "UltraMemV1Layer", "UltraMemV2Layer", "ValueStore", "build_ffn",
    "build_memory_layer", "build_value_store",
]
