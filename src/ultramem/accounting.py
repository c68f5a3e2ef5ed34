"""The cost model, from a config alone, without allocating weights (REFERENCE.md section 7).

One home for parameter counts, FLOPs and decode bytes of every architecture. A model is its
dense weights (read in full at every step) plus sparse tables, each described by a `Table`: rows
of `width` parameters of which a token reads `picks` per layer that reads the table. MoE experts
are tables too (rows = experts, width = one expert's parameters, picks = top_k). Each sparse kind
states its own part through the static cost hooks of its layer class (`dense_params`,
`sparse_tables`, `retrieval_flops`; `ultramem.layers.common.SparseLayer`), found through the
registry `ultramem.layers.LAYER_CLASSES`; this module adds them up.

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
from typing import Any

from ultramem.config import ModelConfig
from ultramem.layers import Table, layer_class


def expected_rows(table: Table, tokens: int) -> float:
    """Expected distinct rows of one of `table`'s copies touched by `tokens` tokens (uniform,
    independent picks)."""
    p = min(table.picks / table.rows, 1.0)
    return table.rows * (1.0 - (1.0 - p) ** (tokens * table.readers))


# ----------------------------------------------------------------------------- dense parts


def attention_params(cfg: ModelConfig) -> int:
    qk_norm = 2 * cfg.head_dim if cfg.qk_norm else 0
    return 4 * cfg.d_model * cfg.d_model + qk_norm


def ffn_params(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.ffn_hidden


def sparse_dense_params(cfg: ModelConfig) -> int:
    """Parameters of one sparse layer outside its tables (read in full at every step)."""
    if cfg.memory is None:
        return 0
    return layer_class(cfg.memory.kind).dense_params(cfg.memory, cfg.d_model)


def sparse_tables(cfg: ModelConfig) -> list[Table]:
    """The sparse tables of `LM(cfg)` (see `Table`)."""
    if cfg.memory is None:
        return []
    return layer_class(cfg.memory.kind).sparse_tables(cfg.memory, cfg.d_model,
                                                      len(cfg.memory_blocks))


def dense_params(cfg: ModelConfig) -> int:
    """Every parameter outside the sparse tables."""
    h, L = cfg.d_model, cfg.n_layers
    dense = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2) + h  # embeddings, final norm
    dense += L * (attention_params(cfg) + 2 * h)  # attention and the two norms of each block
    dense += len(cfg.ffn_blocks) * ffn_params(cfg)
    return dense + len(cfg.memory_blocks) * sparse_dense_params(cfg)


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
    if cfg.memory is None:
        return 0
    return len(cfg.memory_blocks) * layer_class(cfg.memory.kind).retrieval_flops(cfg.memory)


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
    sparse = sum(t.copies * expected_rows(t, batch) * t.width for t in sparse_tables(cfg))
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


