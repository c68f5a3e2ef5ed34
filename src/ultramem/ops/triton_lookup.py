"""Triton kernels for the fused memory read: pre-value dot, score weighting and value sum.

One op, `ultramem::fused_lookup(values, pre_values, rows, scores, xp) -> (y, a)`:

    a[t, s]        = <pre_values[rows[t, s]], xp[t]>
    y[t, slice k]  = sum_s a[t, s] * scores[t, s, k] * values[rows[t, s], slice k]

the same computation as `gather_dot` then `weighted_lookup` in `ultramem.ops.lookup` (the
reference the tests hold it to). Forward: one program per (token, Dv tile of up to 1024 columns,
run of slots), FWD_ROWS rows read per step, fp32 accumulation; with few tokens the slots are split
over several programs whose partial sums are added afterwards in a fixed order.
Backward: a per-token kernel for the gradients of scores, a and xp, then the table gradients by
sorting the (token, slot) entries by row and segment-summing each row's entries in one program
(deterministic); `atomic=True` scatters with atomic adds instead (faster, not bitwise
reproducible). Registered with `torch.library.triton_op`, so autograd and `torch.compile` see it.

Import this module only where triton is installed. To test on a CPU, set TRITON_INTERPRET=1
before the import (the kernels are defined at import time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton


@triton.jit
def _fwd_kernel(V, P, XP, ROWS, SC, Y, A, T, m, Dv, Dp, per_split,
                C: tl.constexpr, SLICE: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_P: tl.constexpr, R: tl.constexpr):
    t = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)  # which run of slots; its partial sum goes to Y[split]
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < Dp
    offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv
    core = offs_v // SLICE  # which core's score weights each column
    offs_r = tl.arange(0, R)
    xp = tl.load(XP + t * Dp + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, m)
    for s0 in range(lo, hi, R):  # R rows in flight per step
        slot = s0 + offs_r
        mask_r = slot < hi
        row = tl.load(ROWS + t * m + slot, mask=mask_r, other=0).to(tl.int64)
        p = tl.load(P + row[:, None] * Dp + offs_p[None, :],
                    mask=mask_r[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        a = tl.sum(p * xp[None, :], axis=1)  # [R]
        tl.store(A + t * m + slot, a, mask=slot < tl.where(tile == 0, hi, 0))  # first tile only
        mask_rv = mask_r[:, None] & mask_v[None, :]
        sc = tl.load(SC + (t * m + slot)[:, None] * C + core[None, :], mask=mask_rv,
                     other=0.0).to(tl.float32)
        v = tl.load(V + row[:, None] * Dv + offs_v[None, :], mask=mask_rv,
                    other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None] * sc * v, axis=0)
    tl.store(Y + (split * T + t) * Dv + offs_v, acc, mask=mask_v)


@triton.jit
def _bwd_token_kernel(V, P, XP, ROWS, SC, A, GY, GSC, GA, GXP, m, Dv, Dp,
                      C: tl.constexpr, CB: tl.constexpr, SLICE: tl.constexpr,
                      BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < Dp
    offs_c = tl.arange(0, CB)
    mask_c = offs_c < C
    gxp = tl.zeros([BLOCK_P], dtype=tl.float32)
    for s in range(0, m):
        row = tl.load(ROWS + t * m + s).to(tl.int64)
        gw = tl.zeros([CB], dtype=tl.float32)  # <value slice k, gy slice k>
        for d0 in range(0, Dv, BLOCK_V):
            offs_v = d0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < Dv
            v = tl.load(V + row * Dv + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            g = tl.load(GY + t * Dv + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            onehot = (offs_v // SLICE)[None, :] == offs_c[:, None]  # [CB, BLOCK_V]
            gw += tl.sum(tl.where(onehot, (v * g)[None, :], 0.0), axis=1)
        a = tl.load(A + t * m + s)
        sc = tl.load(SC + (t * m + s) * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        tl.store(GSC + (t * m + s) * C + offs_c, gw * a, mask=mask_c)
        ga = tl.sum(gw * sc, axis=0)
        tl.store(GA + t * m + s, ga)
        p = tl.load(P + row * Dp + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        gxp += ga * p
    tl.store(GXP + t * Dp + offs_p, gxp, mask=mask_p)


@triton.jit
def _bwd_rows_kernel(ORDER, STARTS, UNIQ, W, GA, GY, XP, GV, GP, m, Dv, Dp,
                     C: tl.constexpr, SLICE: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    u = tl.program_id(0)
    tile = tl.program_id(1)
    row = tl.load(UNIQ + u).to(tl.int64)
    start = tl.load(STARTS + u)
    end = tl.load(STARTS + u + 1)
    offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv
    core = offs_v // SLICE
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < tl.where(tile == 0, Dp, 0)  # only the first Dv tile writes pre-values
    acc_v = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_P], dtype=tl.float32)
    for i in range(start, end):
        e = tl.load(ORDER + i).to(tl.int64)  # flat (token, slot) entry
        t = e // m
        w = tl.load(W + e * C + core, mask=mask_v, other=0.0)
        g = tl.load(GY + t * Dv + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc_v += w * g
        ga = tl.load(GA + e)
        xp = tl.load(XP + t * Dp + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        acc_p += ga * xp
    tl.store(GV + row * Dv + offs_v, acc_v, mask=mask_v)
    tl.store(GP + row * Dp + offs_p, acc_p, mask=mask_p)


@triton.jit
def _bwd_atomic_kernel(ROWS, W, GA, GY, XP, GV, GP, m, Dv, Dp,
                       C: tl.constexpr, SLICE: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    t = e // m
    row = tl.load(ROWS + e).to(tl.int64)
    offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < Dv
    w = tl.load(W + e * C + offs_v // SLICE, mask=mask_v, other=0.0)
    g = tl.load(GY + t * Dv + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    tl.atomic_add(GV + row * Dv + offs_v, w * g, mask=mask_v)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < tl.where(tile == 0, Dp, 0)  # only the first Dv tile writes pre-values
    xp = tl.load(XP + t * Dp + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    tl.atomic_add(GP + row * Dp + offs_p, tl.load(GA + e) * xp, mask=mask_p)


def _blocks(dv: int, dp: int, c: int, max_block_v: int = 256) -> dict[str, int]:
    return {
        "C": c,
        "SLICE": dv // c,
        "BLOCK_V": min(triton.next_power_of_2(dv), max_block_v),
        "BLOCK_P": triton.next_power_of_2(dp),
    }


FWD_ROWS = 2  # rows each forward program reads per step (2 measured fastest on an H200, of 2, 4, 8)
FWD_MAX_BLOCK_V = 1024  # widest value tile of the forward: whole rows up to this many columns


def _split_slots(device: torch.device, programs: int, m: int) -> int:
    """How many runs to split each token's m slots into. Few tokens leave most of a GPU idle and
    each program's loop over m rows latency-bound; splitting the slots over up to two programs
    per multiprocessor (each keeping >= 2 steps of FWD_ROWS rows) fills it. 1 off CUDA."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(target, programs), m // (2 * FWD_ROWS)))


def _forward(values: Tensor, pre_values: Tensor, rows: Tensor, scores: Tensor, xp: Tensor,
             splits: int | None = None) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel; `splits` runs of slots per token (None: `_split_slots`), their
    partial sums added in a fixed order afterwards (deterministic)."""
    t, m = rows.shape
    dv = values.shape[1]
    dp = pre_values.shape[1]
    c = scores.shape[-1]
    meta = _blocks(dv, dp, c, max_block_v=FWD_MAX_BLOCK_V)
    tiles = triton.cdiv(dv, meta["BLOCK_V"])
    if splits is None:
        splits = _split_slots(values.device, t * tiles, m)
    per_split = triton.cdiv(triton.cdiv(m, splits), FWD_ROWS) * FWD_ROWS
    splits = triton.cdiv(m, per_split)
    partial = torch.empty(splits * t, dv, device=values.device, dtype=torch.float32)
    a = torch.empty(t, m, device=values.device, dtype=torch.float32)
    wrap_triton(_fwd_kernel)[(t, tiles, splits)](
        values, pre_values, xp.contiguous(), rows.contiguous(), scores.contiguous(), partial, a,
        t, m, dv, dp, per_split, R=FWD_ROWS, num_warps=8 if meta["BLOCK_V"] >= 512 else 4,
        **meta)
    return (partial if splits == 1 else partial.view(splits, t, dv).sum(0)), a


@triton_op("ultramem::fused_lookup", mutates_args={})
def fused_lookup(values: Tensor, pre_values: Tensor, rows: Tensor, scores: Tensor,
                 xp: Tensor, atomic: bool = False) -> tuple[Tensor, Tensor]:
    """y [T, Dv] and pre-value activations a [T, m]; see the module docstring.

    `atomic` only chooses the backward's table-gradient scatter (see module docstring).
    """
    return _forward(values, pre_values, rows, scores, xp)


@triton_op("ultramem::fused_lookup_backward", mutates_args={})
def fused_lookup_backward(grad_y: Tensor, values: Tensor, pre_values: Tensor, rows: Tensor,
                          scores: Tensor, xp: Tensor, a: Tensor,
                          atomic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (values, pre_values, scores, xp)."""
    t, m = rows.shape
    n, dv = values.shape
    dp = pre_values.shape[1]
    c = scores.shape[-1]
    meta = _blocks(dv, dp, c)
    dev = values.device
    rows, scores, xp = rows.contiguous(), scores.contiguous(), xp.contiguous()
    gy = grad_y.contiguous()
    g_scores = torch.empty(t, m, c, device=dev, dtype=torch.float32)
    g_a = torch.empty(t, m, device=dev, dtype=torch.float32)
    g_xp = torch.empty(t, dp, device=dev, dtype=torch.float32)
    wrap_triton(_bwd_token_kernel)[(t,)](
        values, pre_values, xp, rows, scores, a, gy, g_scores, g_a, g_xp, m, dv, dp,
        CB=triton.next_power_of_2(c), **meta)
    w = (a.unsqueeze(-1) * scores.float()).contiguous()  # [T, m, c]
    g_values = torch.zeros(n, dv, device=dev, dtype=torch.float32)
    g_pre = torch.zeros(n, dp, device=dev, dtype=torch.float32)
    tiles = triton.cdiv(dv, meta["BLOCK_V"])
    flat = rows.reshape(-1)
    if atomic:
        wrap_triton(_bwd_atomic_kernel)[(t * m, tiles)](
            flat, w, g_a, gy, xp, g_values, g_pre, m, dv, dp, **meta)
    else:
        order = torch.argsort(flat, stable=True)
        uniq, counts = torch.unique_consecutive(flat[order], return_counts=True)
        starts = torch.zeros(uniq.numel() + 1, device=dev, dtype=torch.int64)
        starts[1:] = torch.cumsum(counts, 0)
        wrap_triton(_bwd_rows_kernel)[(uniq.numel(), tiles)](
            order, starts, uniq, w, g_a, gy, xp, g_values, g_pre, m, dv, dp, **meta)
    return (g_values.to(values.dtype), g_pre.to(pre_values.dtype), g_scores.to(scores.dtype),
            g_xp.to(xp.dtype))


def _setup_context(ctx, inputs, output) -> None:
    values, pre_values, rows, scores, xp, atomic = inputs
    _, a = output
    ctx.save_for_backward(values, pre_values, rows, scores, xp, a)
    ctx.atomic = atomic


def _backward(ctx, grad_y: Tensor, grad_a: Tensor):
    # `a` is returned for inspection only: gradients flowing into it are not propagated.
    values, pre_values, rows, scores, xp, a = ctx.saved_tensors
    g_v, g_p, g_s, g_x = fused_lookup_backward(grad_y, values, pre_values, rows, scores, xp, a,
                                               ctx.atomic)
    return g_v, g_p, None, g_s, g_x, None


fused_lookup.register_autograd(_backward, setup_context=_setup_context)


def fused_memory_read(values: Tensor, pre_values: Tensor, rows: Tensor, scores: Tensor,
                      xp: Tensor, atomic: bool = False) -> Tensor:
    """The memory read y [T, Dv] through the Triton kernels (scores [T, m, c], xp [T, Dp])."""
    y, _ = fused_lookup(values, pre_values, rows, scores, xp, atomic)
    return y
