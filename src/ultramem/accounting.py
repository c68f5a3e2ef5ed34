"""The cost model, from a config alone, without allocating weights (REFERENCE.md section 7).

One home for parameter counts, FLOPs and decode bytes of every architecture. A model is its
dense weights (read in full at every step) plus sparse tables, each described by a `Table`: rows
of `width` parameters of which a token reads `picks` per layer that reads the table. MoE experts
are tables too (rows = experts, width = one expert's parameters, picks = top_k).

- total params  = dense + sum copies * rows * width
- active params = dense + sum copies * readers * picks * width   (what one token reads)
- decode bytes at batch B, b bytes per weight: dense * b plus, per table, the expected distinct
  rows that B tokens touch, rows * (1 - (1 - picks/rows)^(B * readers)), times width * b. This
  assumes uniform, independent picks across tokens (tests measure it against real retrieval).
- FLOPs per token (forward): 2 per active matmul weight, attention scores 2 L ctx h (Kaplan et
  al.), plus the retrieval's candidate scoring, which has no weights of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ultramem.config import (
    MemoryConfig,
    MemoryPlusConfig,
    ModelConfig,
    MoEConfig,
    PEERConfig,
    PKMConfig,
    UltraMemV1Config,
)


@dataclass(frozen=True)
class Table:
    """Sparse rows: `copies` tables of `rows` x `width` parameters; each is read by `readers`
    layers, each of which reads `picks` rows per token."""

    rows: int
    width: int
    picks: int
    copies: int = 1
    readers: int = 1

    @property
    def params(self) -> int:
        return self.copies * self.rows * self.width

    @property
    def active(self) -> int:
        return self.copies * self.readers * self.picks * self.width

    def expected_rows(self, tokens: int) -> float:
        """Expected distinct rows of one table touched by `tokens` tokens (uniform picks)."""
        p = min(self.picks / self.rows, 1.0)
        return self.rows * (1.0 - (1.0 - p) ** (tokens * self.readers))


# ----------------------------------------------------------------------------- dense parts


def attention_params(cfg: ModelConfig) -> int:
    qk_norm = 2 * cfg.head_dim if cfg.qk_norm else 0
    return 4 * cfg.d_model * cfg.d_model + qk_norm


def ffn_params(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.ffn_hidden


def memory_dense_params(mem: MemoryConfig, d_model: int) -> int:
    """Parameters of one UltraMemV2 layer outside its value tables (all read every step)."""
    r, dk = mem.tucker_rank, mem.key_dim
    query = d_model * (2 * dk if mem.shared_rank_query else 2 * r * dk)
    keys = 2 * r * mem.n_keys * dk
    cores = mem.n_cores * r * r
    gains = 2 * dk
    return query + keys + cores + gains + d_model * mem.pre_value_dim + mem.value_dim * d_model


def _product_key_params(cfg: PKMConfig | PEERConfig | MemoryPlusConfig, d_model: int,
                        query_norm: str, key_norm: bool) -> int:
    hk = cfg.n_heads * cfg.key_dim
    norm = {"batch": 2 * hk, "layer": 2 * cfg.key_dim, "rms": cfg.key_dim // 2}[query_norm]
    return d_model * hk + norm + cfg.n_heads * cfg.n_keys * cfg.key_dim + (
        cfg.key_dim // 2 if key_norm else 0)


def sparse_dense_params(cfg: ModelConfig) -> int:
    """Parameters of one sparse layer outside its tables (read in full at every step)."""
    mem, h = cfg.memory, cfg.d_model
    if mem is None:
        return 0
    if isinstance(mem, MemoryConfig):
        return memory_dense_params(mem, h)
    if isinstance(mem, MoEConfig):
        return h * mem.n_experts  # router
    if isinstance(mem, PKMConfig):
        dv = mem.value_dim or h
        return _product_key_params(mem, h, mem.query_norm, False) + (dv * h if dv != h else 0)
    if isinstance(mem, PEERConfig):
        return _product_key_params(mem, h, mem.query_norm, False)
    if isinstance(mem, MemoryPlusConfig):
        dv = mem.value_dim or h
        return _product_key_params(mem, h, "rms", True) + 2 * h * dv
    if isinstance(mem, UltraMemV1Config):
        r, dk = mem.tucker_rank, mem.key_dim
        per_head = 2 * r * mem.key_rows * dk + mem.n_cores * r * r + 2 * dk
        return h * 2 * r * dk + mem.n_heads * per_head + mem.virtual_blocks * mem.value_dim * h
    raise TypeError(f"no cost model for {type(mem).__name__}")


def sparse_tables(cfg: ModelConfig) -> list[Table]:
    """The sparse tables of `LM(cfg)` (see `Table`)."""
    mem, h = cfg.memory, cfg.d_model
    if mem is None:
        return []
    n_layers = len(cfg.memory_blocks)
    if isinstance(mem, MemoryConfig):
        g = mem.share_group
        return [Table(mem.rows_per_table, mem.value_dim + mem.pre_value_dim, mem.top_m // g
                      if mem.top_m % g == 0 else mem.top_m / g, n_layers, g)]
    if isinstance(mem, MoEConfig):
        return [Table(mem.n_experts, 3 * h * mem.expert_hidden, mem.top_k, n_layers)]
    if isinstance(mem, PKMConfig):
        return [Table(mem.n_values, mem.value_dim or h, mem.n_heads * mem.top_k, n_layers)]
    if isinstance(mem, PEERConfig):
        return [Table(mem.n_values, 2 * h, mem.n_heads * mem.top_k, n_layers)]
    if isinstance(mem, MemoryPlusConfig):
        return [Table(mem.n_values, mem.value_dim or h, mem.n_heads * mem.top_k, 1, n_layers)]
    if isinstance(mem, UltraMemV1Config):
        return [Table(mem.n_values, mem.value_dim, mem.n_heads * mem.top_m, n_layers)]
    raise TypeError(f"no cost model for {type(mem).__name__}")


def dense_params(cfg: ModelConfig) -> int:
    """Every parameter outside the sparse tables."""
    h, L = cfg.d_model, cfg.n_layers
    dense = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2) + h  # embeddings, final norm
    dense += L * (attention_params(cfg) + 2 * h)  # attention and the two norms of each block
    dense += len(cfg.ffn_blocks) * ffn_params(cfg)
    return dense + len(cfg.memory_blocks) * sparse_dense_params(cfg)


def memory_table_params(cfg: ModelConfig) -> int:
    """All sparse table parameters of the model (a shared store counted once)."""
    return sum(t.params for t in sparse_tables(cfg))


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "active"} parameter counts of `LM(cfg)`, exact, without building it."""
    dense, tables = dense_params(cfg), sparse_tables(cfg)
    return {
        "total": dense + sum(t.params for t in tables),
        "active": dense + round(sum(t.active for t in tables)),
    }


# ----------------------------------------------------------------------------- FLOPs and bytes


def retrieval_flops(cfg: ModelConfig) -> int:
    """Per-token forward FLOPs of candidate scoring, which has no weights of its own."""
    mem = cfg.memory
    n = len(cfg.memory_blocks)
    if isinstance(mem, MemoryConfig):
        kr, r, c = mem.topk, mem.tucker_rank, mem.n_cores
        return n * 2 * c * (kr * r * r + kr * kr * r)
    if isinstance(mem, UltraMemV1Config):
        kr, r, c = mem.topk, mem.tucker_rank, mem.n_cores
        return n * mem.n_heads * 2 * c * (kr * r * r + kr * kr * r)
    if isinstance(mem, PKMConfig | PEERConfig | MemoryPlusConfig):
        return n * mem.n_heads * mem.top_k * mem.top_k
    return 0


def flops_per_token(cfg: ModelConfig, context: int | None = None) -> int:
    """Forward FLOPs for one token attending to `context` tokens (default max_seq_len)."""
    ctx = cfg.max_seq_len if context is None else context
    matmul = count_params(cfg)["active"]
    if not cfg.tie_embeddings:
        matmul -= cfg.vocab_size * cfg.d_model  # the input embedding is a lookup
    attention = 2 * cfg.n_layers * ctx * cfg.d_model
    return 2 * matmul + attention + retrieval_flops(cfg)


def decode_bytes(cfg: ModelConfig, batch: int, bytes_per_weight: int = 2) -> dict[str, float]:
    """Expected weight bytes read by one decode step of `batch` tokens: sparse, dense, total."""
    dense = dense_params(cfg)
    if not cfg.tie_embeddings:  # the input embedding reads only the batch's rows
        dense -= (cfg.vocab_size - min(batch, cfg.vocab_size)) * cfg.d_model
    sparse = sum(t.copies * t.expected_rows(batch) * t.width for t in sparse_tables(cfg))
    return {
        "sparse": sparse * bytes_per_weight,
        "dense": float(dense * bytes_per_weight),
        "total": (sparse + dense) * bytes_per_weight,
    }


def summarize(cfg: ModelConfig) -> dict[str, Any]:
    """total_params, active_params, flops_per_token (forward, context max_seq_len) and
    decode_bytes(batch, bytes_per_weight=2) -> {"sparse", "dense", "total"}."""
    counts = count_params(cfg)

    def _decode(batch: int, bytes_per_weight: int = 2) -> dict[str, float]:
        return decode_bytes(cfg, batch, bytes_per_weight)

    decode: Callable[..., dict[str, float]] = _decode
    return {
        "total_params": counts["total"],
        "active_params": counts["active"],
        "flops_per_token": flops_per_token(cfg),
        "decode_bytes": decode,
    }


