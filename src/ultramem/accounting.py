"""Parameter accounting from a config alone, without allocating weights (REFERENCE.md section 7).

`total` counts every parameter; `active` counts what one token reads: everything dense plus the
top_m value and pre-value rows each memory layer actually reads, not the whole tables.
"""

from __future__ import annotations

from ultramem.config import MemoryConfig, ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    qk_norm = 2 * cfg.head_dim if cfg.qk_norm else 0
    return 4 * cfg.d_model * cfg.d_model + qk_norm


def ffn_params(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.ffn_hidden


def memory_dense_params(mem: MemoryConfig, d_model: int) -> int:
    """Parameters of one memory layer outside its value tables (all read every step)."""
    r, dk = mem.tucker_rank, mem.key_dim
    query = d_model * (2 * dk if mem.shared_rank_query else 2 * r * dk)
    keys = 2 * r * mem.n_keys * dk
    cores = mem.n_cores * r * r
    gains = 2 * dk
    return query + keys + cores + gains + d_model * mem.pre_value_dim + mem.value_dim * d_model


def memory_table_params(cfg: ModelConfig) -> int:
    """All value and pre-value table parameters of the model (a shared store counted once)."""
    mem = cfg.memory
    if mem is None:
        return 0
    rows = len(cfg.memory_blocks) * (mem.rows_per_table if mem.share_group > 1 else mem.n_values)
    return rows * (mem.value_dim + mem.pre_value_dim)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "active"} parameter counts of `LM(cfg)`, exact, without building it."""
    h, L = cfg.d_model, cfg.n_layers
    dense = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2) + h  # embeddings, final norm
    dense += L * (attention_params(cfg) + ffn_params(cfg) + 2 * h)  # blocks and their norms
    read_rows = 0
    mem = cfg.memory
    if mem is not None:
        n_mem = len(cfg.memory_blocks)
        dense += n_mem * memory_dense_params(mem, h)
        read_rows = n_mem * mem.top_m * (mem.value_dim + mem.pre_value_dim)
    return {"total": dense + memory_table_params(cfg), "active": dense + read_rows}
