"""Weighted row lookup: the gather-and-weighted-sum of value rows, and its dual, the gather-dot.

Two ops, each with a readable reference and a fast CPU path held to it by tests:

- `weighted_lookup(table [N, D], rows [T, m], weights [T, m] or [T, m, c]) -> [T, D]`
  out[t] = sum_s weights[t, s] * table[rows[t, s]]. With c column slices (multi-core scoring),
  slice k of the output uses weights[..., k] on slice k of each row.
- `gather_dot(table [N, D], rows [T, m], x [T, D]) -> [T, m]`
  out[t, s] = <table[rows[t, s]], x[t]> (the pre-value activations a_s = <p_s, W_pre x>).

The fast paths use `embedding_bag` with per-sample weights for sums and aten's per-sample-weight
kernel for dots, so neither forward nor backward materialises a [T, m, D] tensor. Table gradients
are built per touched row (sorted unique rows, then a segment sum), returned dense or, with
`sparse_grad=True`, as a coalesced sparse COO tensor holding only the rows that were read.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def _as_slices(weights: Tensor) -> Tensor:
    return weights if weights.dim() == 3 else weights.unsqueeze(-1)


# ----------------------------------------------------------------------------- reference


def weighted_lookup_reference(table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """Plain PyTorch: gather [T, m, D], weight per slice, sum over m."""
    w = _as_slices(weights)  # [T, m, c]
    t, m, c = w.shape
    gathered = table[rows].view(t, m, c, -1)  # [T, m, c, D/c]
    return (gathered * w.unsqueeze(-1).to(table.dtype)).sum(1).reshape(t, -1)  # [T, D]


def gather_dot_reference(table: Tensor, rows: Tensor, x: Tensor) -> Tensor:
    """Plain PyTorch: gather [T, m, D] and dot each row with x[t]."""
    return (table[rows] * x.to(table.dtype).unsqueeze(1)).sum(-1)  # [T, m]


# ----------------------------------------------------------------------------- fast CPU path


def _dot_rows(table: Tensor, idx: Tensor, x: Tensor) -> Tensor:
    """out[b, s] = <table[idx[b, s]], x[b]> without gathering: aten's per-sample-weight kernel."""
    b, m = idx.shape
    flat = idx.reshape(-1)
    offsets = torch.arange(0, b * m, m, device=idx.device)
    bag_of = torch.arange(b, device=idx.device).repeat_interleave(m)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x.to(table.dtype).contiguous(), table, flat, offsets, bag_of, 0, -1
    )
    return out.view(b, m)


def _slice_index(rows: Tensor, c: int) -> Tensor:
    """Bag (t, k) of the [N*c, D/c] view holds rows[t, :] * c + k: returns [T*c, m]."""
    k = torch.arange(c, device=rows.device)
    return (rows.unsqueeze(1) * c + k.view(1, c, 1)).reshape(-1, rows.shape[1])


def _row_grad(rows: Tensor, w: Tensor, g: Tensor, n_rows: int, sparse: bool) -> Tensor:
    """grad[r, slice k] = sum over (t, s) with rows[t, s] = r of w[t, s, k] * g[t, slice k].

    Segment-sums per unique row with embedding_bag over g, so no [T*m, D] tensor is built.
    """
    t, m, c = w.shape
    d = g.shape[1]
    flat = rows.reshape(-1)
    order = torch.argsort(flat, stable=True)
    uniq, counts = torch.unique_consecutive(flat[order], return_counts=True)
    offsets = torch.cumsum(counts, 0) - counts
    token = torch.div(order, m, rounding_mode="floor")  # token of each sorted entry
    w_sorted = w.reshape(t * m, c)[order]  # [T*m, c]
    g = g.to(w.dtype)
    parts = []
    for k in range(c):
        g_k = g[:, k * (d // c) : (k + 1) * (d // c)].contiguous()  # [T, D/c]
        w_k = w_sorted[:, k].contiguous()
        parts.append(F.embedding_bag(token, g_k, offsets, mode="sum", per_sample_weights=w_k))
    vals = torch.cat(parts, dim=1) if c > 1 else parts[0]  # [U, D]
    if sparse:
        return torch.sparse_coo_tensor(
            uniq.unsqueeze(0), vals, (n_rows, d), is_coalesced=True, check_invariants=False
        )
    return torch.zeros(n_rows, d, dtype=vals.dtype, device=vals.device).index_copy_(0, uniq, vals)


def _lookup_forward(table: Tensor, rows: Tensor, w: Tensor) -> Tensor:
    """embedding_bag over the [N*c, D/c] view, one bag per (token, slice): -> [T, D]."""
    t, m, c = w.shape
    n, d = table.shape
    if c == 1:
        return F.embedding_bag(rows, table, mode="sum", per_sample_weights=w.view(t, m))
    idx = _slice_index(rows, c)  # [T*c, m]
    bag_w = w.permute(0, 2, 1).reshape(t * c, m)  # [T*c, m]
    out = F.embedding_bag(idx, table.view(n * c, d // c), mode="sum", per_sample_weights=bag_w)
    return out.view(t, d)


class _WeightedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, weights: Tensor, sparse: bool) -> Tensor:
        w = _as_slices(weights).to(table.dtype)  # [T, m, c]
        out = _lookup_forward(table, rows, w)  # [T, D]
        ctx.save_for_backward(table, rows, w)
        ctx.sparse = sparse
        ctx.squeeze = weights.dim() == 2
        ctx.w_dtype = weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        table, rows, w = ctx.saved_tensors
        t, m, c = w.shape
        n, d = table.shape
        grad_table = grad_w = None
        g = grad_out.contiguous()
        if ctx.needs_input_grad[2]:
            idx = _slice_index(rows, c)
            dots = _dot_rows(table.view(n * c, d // c), idx, g.view(t * c, d // c))  # [T*c, m]
            grad_w = dots.view(t, c, m).permute(0, 2, 1)  # [T, m, c]
            grad_w = (grad_w.squeeze(-1) if ctx.squeeze else grad_w).to(ctx.w_dtype)
        if ctx.needs_input_grad[0]:
            grad_table = _row_grad(rows, w, g, n, ctx.sparse)
        return grad_table, None, grad_w, None


class _GatherDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, x: Tensor, sparse: bool) -> Tensor:
        xt = x.to(table.dtype)
        ctx.save_for_backward(table, rows, xt)
        ctx.sparse = sparse
        ctx.x_dtype = x.dtype
        return _dot_rows(table, rows, xt)  # [T, m]

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        table, rows, x = ctx.saved_tensors
        grad_table = grad_x = None
        g = grad_out.to(table.dtype).contiguous()  # [T, m]
        if ctx.needs_input_grad[2]:
            grad_x = F.embedding_bag(rows, table, mode="sum", per_sample_weights=g).to(ctx.x_dtype)
        if ctx.needs_input_grad[0]:
            grad_table = _row_grad(rows, g.unsqueeze(-1), x, table.shape[0], ctx.sparse)
        return grad_table, None, grad_x, None


# ----------------------------------------------------------------------------- public API


def _check(table: Tensor, rows: Tensor, lead: Tensor, name: str) -> None:
    if table.dim() != 2:
        raise ValueError(f"table must be [N, D], got shape {tuple(table.shape)}")
    if rows.dim() != 2 or rows.dtype != torch.long:
        raise ValueError(
            f"rows must be an int64 [T, m] tensor, got {rows.dtype} {tuple(rows.shape)}"
        )
    if lead.shape[0] != rows.shape[0]:
        raise ValueError(f"{name} has {lead.shape[0]} tokens but rows has {rows.shape[0]}")


def weighted_lookup(
    table: Tensor, rows: Tensor, weights: Tensor, *, sparse_grad: bool = False,
    impl: str = "fast",
) -> Tensor:
    """sum_s weights[t, s(, k)] * table[rows[t, s]] (per column slice k) -> [T, D]."""
    _check(table, rows, weights, "weights")
    c = weights.shape[-1] if weights.dim() == 3 else 1
    if table.shape[1] % c:
        raise ValueError(f"table width {table.shape[1]} is not divisible by {c} weight slices")
    if impl == "reference":
        return weighted_lookup_reference(table, rows, weights)
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    if not torch.is_grad_enabled():  # decoding: skip the autograd wrapper
        return _lookup_forward(table, rows, _as_slices(weights).to(table.dtype))
    return _WeightedLookup.apply(table, rows, weights, sparse_grad)


def gather_dot(
    table: Tensor, rows: Tensor, x: Tensor, *, sparse_grad: bool = False, impl: str = "fast"
) -> Tensor:
    """<table[rows[t, s]], x[t]> -> [T, m]."""
    _check(table, rows, x, "x")
    if x.shape[-1] != table.shape[1]:
        raise ValueError(f"x width {x.shape[-1]} != table width {table.shape[1]}")
    if impl == "reference":
        return gather_dot_reference(table, rows, x)
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    if not torch.is_grad_enabled():  # decoding: skip the autograd wrapper
        return _dot_rows(table, rows, x.to(table.dtype))
    return _GatherDot.apply(table, rows, x, sparse_grad)


def memory_read(values: Tensor, pre_values: Tensor | None, rows: Tensor, scores: Tensor,
                xp: Tensor | None, *, sparse_grad: bool = False, impl: str = "auto") -> Tensor:
    """The memory layer's read: a = gather_dot(pre_values, rows, xp), then
    weighted_lookup(values, rows, a * scores) -> [T, Dv]. pre_values None: plain values, a = 1.

    impl: "reference" (plain PyTorch), "fast" (embedding_bag), "triton" (fused kernels in
    `ultramem.ops.triton_lookup`), or "auto": triton for CUDA tables when triton is installed and
    dense gradients are wanted, else fast.
    """
    if impl == "auto":
        impl = "triton" if values.is_cuda and not sparse_grad and _has_triton() else "fast"
    if pre_values is None:  # plain values: the fused kernel needs pre-values, embedding_bag not
        return weighted_lookup(values, rows, scores, sparse_grad=sparse_grad,
                               impl="reference" if impl == "reference" else "fast")
    if impl == "triton":
        from ultramem.ops.triton_lookup import fused_memory_read

        return fused_memory_read(values, pre_values, rows, scores, xp)
    a = gather_dot(pre_values, rows, xp, sparse_grad=sparse_grad, impl=impl)  # [T, m]
    return weighted_lookup(values, rows, a.unsqueeze(-1) * scores, sparse_grad=sparse_grad,
                           impl=impl)  # [T, Dv]


@functools.cache
def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
