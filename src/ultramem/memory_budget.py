"""What a training run holds in memory, from (ModelConfig, TrainConfig) alone (issue 18 part 1).

`training_memory(model_cfg, train_cfg)` returns the parts in bytes; `breakdown_table` prints them
next to the same run with dense AdamW on the tables (value_update=dense). The run is the one
`ultramem.train.Trainer` makes: float32 master weights, tables and optimizer state; bf16
autocast for the forward (`precision`); value and pre-value tables as separate parameters.

- dense weights, tables: 4 bytes per parameter (`accounting.dense_params`, `sparse_tables`),
  plus buffers (the int64 row shuffle of each memory layer, RoPE tables, a float per Tucker
  rank).
- gradients: dense 4 B per dense parameter. Tables with value_update=sparse: a micro-batch's
  gradient is a coalesced COO tensor of the distinct rows it read (`accounting.expected_rows`,
  uniform picks), grad_accum micro-batches concatenate uncoalesced, and the clip coalesces them
  once more; each row costs 4 B x width plus an int64 index per table tensor.
  value_update=dense: a full float32 gradient, 4 B per table parameter.
- optimizer state: AdamW for dense weights, 2 float32 moments (8 B per parameter; the scalar
  step tensors are not counted). Tables: `RowSparseAdam` 2 moments + an int64 step per row of
  each tensor, `RowAdagrad` one float32 accumulator per row of each tensor, dense AdamW 8 B per
  parameter (`train.sparse`, `train.optim`).
- activations (an estimate): bytes the autograd graph keeps per token, per block, calibrated
  against `torch.autograd.graph.saved_tensors_hooks` on the UltraMemV2 227M block under bf16
  autocast on CPU (tests/test_memory_budget.py holds the two together), plus the bf16 weight
  copies autocast keeps for the backward (2 B per dense parameter), plus one block's worth of
  working memory in the backward. With activation checkpointing the graph keeps each block's
  input only, and recomputes one block (its activations and weight copies) at a time.
- resume peak: `Trainer(resume=True)` loads the optimizer state, builds the model and then
  `safetensors.load_model` reads the whole weight file before copying it in, so weights are held
  twice for a moment, next to the optimizer state.

Not counted: the Python/torch runtime (~0.3-0.5 GiB RSS), allocator slack, the data loader, and
the optimizer's per-step row gathers (a few [rows read, width] float32 temporaries per table).
"""

from __future__ import annotations

from typing import Any

from ultramem import accounting
from ultramem.config import ModelConfig
from ultramem.train.config import TrainConfig

GiB = 2**30

# Saved bytes per token under bf16 autocast (measured on CPU, see the module docstring).
NORM_BYTES_PER_H = 16  # the two RMSNorms of a block: float32 input and output, each
ATTN_BYTES_PER_H = 36  # q, k, v (bf16 and the float32 copies the CPU SDPA runs on), output
ATTN_BYTES_PER_HEAD = 12  # logsumexp and friends
FFN_BYTES_PER_H, FFN_BYTES_PER_HIDDEN = 4, 8  # SwiGLU input, gate/up/product
MEM_BYTES_PER_H = 6
MEM_BYTES_PER_KEY_DIM = 48  # queries of the row and column keys, both Tucker ranks
MEM_BYTES_PER_VALUE_DIM = 3  # pre-value projection, the read y (per Dv + Dp)
MEM_BYTES_PER_PICK = 76  # scores, rows (int64), weights of the top_m picks
MEM_BYTES_PER_KEY = 16  # row and column scores of every key, each Tucker rank (at rank 2)
HEAD_BYTES_PER_H, HEAD_BYTES_PER_VOCAB = 10, 4  # final norm, logits for the loss
CKPT_BYTES_PER_H = 4.5  # with checkpointing: each block's float32 input (and a little more)


def _tensors_per_table(model_cfg: ModelConfig) -> int:
    """Parameter tensors a table copy is stored in: values, plus pre-values when present."""
    return 2 if getattr(model_cfg.memory, "pre_value_dim", 0) else 1


def block_activation_bytes(model_cfg: ModelConfig, block: int) -> float:
    """Bytes block `block` keeps for the backward per token (bf16 autocast, no checkpointing)."""
    h = model_cfg.d_model
    out = NORM_BYTES_PER_H * h + 8 + ATTN_BYTES_PER_H * h + ATTN_BYTES_PER_HEAD * model_cfg.n_heads
    if block in model_cfg.ffn_blocks:
        out += FFN_BYTES_PER_H * h + FFN_BYTES_PER_HIDDEN * model_cfg.ffn_hidden
    mem = model_cfg.memory
    if mem is not None and block in model_cfg.memory_blocks:
        table = accounting.sparse_tables(model_cfg)[0]
        out += (MEM_BYTES_PER_H * h + MEM_BYTES_PER_VALUE_DIM * table.width
                + MEM_BYTES_PER_PICK * table.picks + 16
                + MEM_BYTES_PER_KEY_DIM * getattr(mem, "key_dim", 0)
                + MEM_BYTES_PER_KEY * getattr(mem, "n_keys", 0)
                * getattr(mem, "tucker_rank", 2) // 2)
    return float(out)


def head_activation_bytes(model_cfg: ModelConfig) -> float:
    """Bytes per token kept outside the blocks: embedding output, final norm, logits."""
    return HEAD_BYTES_PER_H * model_cfg.d_model + HEAD_BYTES_PER_VOCAB * model_cfg.vocab_size + 12


def activation_bytes(model_cfg: ModelConfig, tokens: int, checkpointing: bool) -> dict[str, float]:
    """Estimated activation memory of one micro-batch of `tokens` tokens: {"saved" (the graph's
    tensors at the end of the forward), "weight_copies" (autocast's bf16 weights), "working"
    (one block recomputed or back-propagated at a time), "total"}."""
    blocks = [block_activation_bytes(model_cfg, i) for i in range(model_cfg.n_layers)]
    head = head_activation_bytes(model_cfg)
    dense = accounting.dense_params(model_cfg)
    per_block_weights = (dense - model_cfg.vocab_size * model_cfg.d_model) / model_cfg.n_layers
    head_weights = model_cfg.vocab_size * model_cfg.d_model
    if checkpointing:
        saved = tokens * (CKPT_BYTES_PER_H * model_cfg.d_model * model_cfg.n_layers + head)
        weight_copies = 2 * (per_block_weights + head_weights)
        working = 2 * tokens * max(blocks)  # the recomputed block, and its backward
    else:
        saved = tokens * (sum(blocks) + head)
        weight_copies = 2.0 * dense
        working = tokens * max(blocks)
    return {"saved": saved, "weight_copies": weight_copies, "working": working,
            "total": saved + weight_copies + working}


def training_memory(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, float]:
    """Bytes of each part of a training run on one process (see the module docstring), with
    "total" (everything while a step runs) and "resume_peak" (loading a checkpoint)."""
    dense = accounting.dense_params(model_cfg)
    tables = accounting.sparse_tables(model_cfg)
    table_params = sum(t.params for t in tables)
    n_tensors = _tensors_per_table(model_cfg) if tables else 0
    row_tensors = sum(t.copies * t.rows for t in tables) * n_tensors  # rows of all table tensors
    tokens = train_cfg.batch_size * train_cfg.seq_len
    buffers = 8 * sum(t.copies * t.rows for t in tables)  # int64 row shuffles
    if tables:  # the Tucker cores' sign reference, a float per rank
        buffers += 4 * getattr(model_cfg.memory, "tucker_rank", 0) * len(model_cfg.memory_blocks)
    buffers += 4 * model_cfg.max_seq_len * (model_cfg.d_model // model_cfg.n_heads)  # RoPE
    out: dict[str, float] = {
        "dense_weights": 4.0 * dense,
        "tables": 4.0 * table_params,
        "buffers": float(buffers),
        "dense_grads": 4.0 * dense,
    }
    if train_cfg.value_update == "sparse":
        accum = train_cfg.grad_accum
        grad = 0.0
        for t in tables:
            micro = accounting.expected_rows(t, tokens)
            step = accounting.expected_rows(t, tokens * accum)
            rows = accum * micro + (step if accum > 1 else 0)  # + the coalesced copy
            grad += t.copies * rows * (4 * t.width + 8 * n_tensors)
        out["table_grads"] = grad
    else:
        out["table_grads"] = 4.0 * table_params
    out["dense_optimizer"] = 8.0 * dense
    if train_cfg.value_update == "dense":
        out["table_optimizer"] = 8.0 * table_params
    elif train_cfg.value_optimizer == "adam":
        out["table_optimizer"] = 8.0 * table_params + 8.0 * row_tensors
    else:
        out["table_optimizer"] = 4.0 * row_tensors
    act = activation_bytes(model_cfg, tokens, train_cfg.activation_checkpointing)
    out["activations"] = act["saved"] + act["working"]
    out["weight_copies_bf16"] = act["weight_copies"]
    out["total"] = sum(out.values())
    weights = out["dense_weights"] + out["tables"] + out["buffers"]
    out["resume_peak"] = 2 * weights + out["dense_optimizer"] + out["table_optimizer"]
    return out


ROWS = (
    ("dense_weights", "dense weights (float32)"),
    ("tables", "value tables (float32)"),
    ("buffers", "buffers (row shuffles, RoPE)"),
    ("dense_grads", "dense gradients"),
    ("table_grads", "table gradients"),
    ("dense_optimizer", "AdamW state, dense (2 moments)"),
    ("table_optimizer", "table optimizer state"),
    ("activations", "activations (estimate)"),
    ("weight_copies_bf16", "bf16 weight copies (autocast)"),
    ("total", "**total while training**"),
    ("resume_peak", "resume peak (weights twice + optimizer)"),
)


def _label(train_cfg: TrainConfig) -> str:
    if train_cfg.value_update == "dense":
        return "dense AdamW tables"
    return {"adam": "RowSparseAdam tables", "adagrad": "RowAdagrad tables"}[
        train_cfg.value_optimizer]


def breakdown(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """{label: training_memory} for this run and the same run with dense AdamW on the tables."""
    dense_run = train_cfg.replace(value_update="dense", value_optimizer="adam")
    runs = {_label(train_cfg): training_memory(model_cfg, train_cfg)}
    runs.setdefault(_label(dense_run), training_memory(model_cfg, dense_run))
    return runs


def breakdown_table(model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    """A Markdown table in GiB: each part, this run against dense AdamW on the tables."""
    runs = breakdown(model_cfg, train_cfg)
    lines = ["| part (GiB) | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{r[key] / GiB:.2f}" for r in runs.values())
                     + " |")
    return "\n".join(lines)
