"""Mixture of SwiGLU experts (OLMoE style by default, Mixtral style as an option), dropless.

Per token x [h]:
  probs   = softmax(W_router x)                 -> [E], in float32 (also under autocast)
  top-k   = the k most probable experts         (weights renormalised only if `renormalize`)
  out     = sum_j w_j * down_e(silu(gate_e x) * up_e x)
Shapes: T tokens, h model width, E experts, w expert width, k experts per token, N = T*k.
Tokens are grouped by expert (a stable sort of the N assignments), then the experts run behind
one seam, `MoELayer.experts`, in one of three ways: "grouped_mm" (three `F.grouped_mm` calls over
the groups, no host sync; 16-byte aligned rows, CPU float32/bfloat16 or what the CUDA device
runs, e.g. bfloat16 on Hopper), "grouped" (one matmul chain per active expert) or "padded" (three
batched matmuls over groups padded to the largest).
"auto" takes "grouped_mm" where it runs, else "grouped" (e.g. expert_hidden 373 of 227m/moe);
"padded" is at best even with them on CPU and many times slower once loads are skewed. Each
top-k weight scales its hidden [w] before the down projection. Under autocast each expert weight
is cast once per forward, not once per expert; routing stays float32, the combine sums in the
input's dtype. No Python loop over tokens, no capacity factor, no dropped tokens.
`forward_reference` is the per-token loop the tests hold every path to.
Auxiliary losses (recorded only while gradients are enabled): load balancing
E * sum_e f_e P_e (f_e: fraction of assignments, P_e: mean router probability) and router
z-loss mean(logsumexp(logits)^2), each divided by the model's number of MoE layers (`n_slots`):
the model sums its layers' losses, so the weights apply to their average over layers, as in
OLMoE.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import MoEConfig
from ultramem.diagnostics import expert_load, usage_stats
from ultramem.init import ffn_output_std, linear_std
from ultramem.layers.common import SparseLayer, Table


class MoELayer(SparseLayer):
    """`forward(u [..., h]) -> [..., h]`; replaces the FFN of its block (contract:
    `SparseLayer`; its rows are the experts)."""

    def __init__(self, cfg: MoEConfig, d_model: int, *, slot: int = 0, n_slots: int = 1,
                 store: None = None):
        super().__init__(cfg, d_model, slot=slot, n_slots=n_slots)
        e, w = cfg.n_experts, cfg.expert_hidden
        self.router = nn.Linear(d_model, e, bias=False)
        self.gate = nn.Parameter(torch.empty(e, d_model, w))
        self.up = nn.Parameter(torch.empty(e, d_model, w))
        self.down = nn.Parameter(torch.empty(e, w, d_model))
        self.impl = "auto"  # one of IMPLS; "auto": `choose_impl` decides per call

    @property
    def n_rows(self) -> int:
        return self.cfg.n_experts

    def route(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router logits [T, E] (float32 or wider, also under autocast or with bf16 weights),
        top-k weights [T, k] and expert ids [T, k]."""
        x = self._flat(u)
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dt), self.router.weight.to(dt))  # [T, E]
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.cfg.top_k, dim=-1)  # [T, k]
        if self.cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, experts

    def retrieve(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k router weights [T, k] and expert ids [T, k]."""
        _, weights, experts = self.route(u)
        return weights, experts

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on tokens x [n, h] -> [n, h]."""
        return (F.silu(x @ self.gate[e]) * (x @ self.up[e])) @ self.down[e]

    def forward(self, u: Tensor) -> Tensor:
        lead = u.shape[:-1]
        x = self._flat(u)  # [T, h]
        logits, weights, experts = self.route(x)
        k, e = self.cfg.top_k, self.cfg.n_experts
        flat = experts.reshape(-1)  # [N]
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        token = torch.div(order, k, rounding_mode="floor")  # token of each sorted assignment
        counts = torch.bincount(flat, minlength=e)  # [E]
        dt = compute_dtype(x.device.type, self.gate.dtype)
        xs = x.index_select(0, token).to(dt)  # [N, h]; its gradient sums in x's dtype
        scale = weights.reshape(-1)[order].to(dt)  # [N], the top-k weight of each assignment
        y = self.experts(xs, scale, flat[order], counts)  # [N, h]
        out = torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))  # [T, h]
        if torch.is_grad_enabled():
            self._aux_loss = self._auxiliary(logits, counts)
        else:
            self._aux_loss = None
        return out.view(*lead, self.d_model)

    def experts(self, xs: Tensor, scale: Tensor, expert: Tensor, counts: Tensor) -> Tensor:
        """The seam: assignments xs [N, h] sorted by expert (ids `expert` [N], group sizes
        `counts` [E]) -> scale * expert(xs), [N, h] in xs's dtype. The scale multiplies the
        hidden [N, w] (w < h: cheaper than the output). Each weight is cast to xs's dtype once
        here; autocast is off inside, so no op casts again."""
        gate, up, down = (p.to(xs.dtype) for p in (self.gate, self.up, self.down))
        impl = self.choose_impl(xs, gate)
        if impl not in IMPLS[1:]:
            raise ValueError(f"MoELayer.impl must be one of {IMPLS}, got {impl!r}")
        dest = None
        if impl != "padded" and needs_row_buckets(xs, counts.shape[0]):
            xs, scale, counts, dest = pad_groups(xs, scale, expert, counts, ROW_BUCKET)
        with torch.autocast(xs.device.type, enabled=False):
            if impl == "grouped_mm":
                y = experts_grouped_mm(xs, scale, gate, up, down, counts)
            elif impl == "grouped":
                sizes = counts.tolist()  # the loop's host sync; pad_groups' buffer may be longer
                n = sum(sizes)
                y = experts_loop(xs[:n], scale[:n], gate, up, down, sizes)
            else:
                y = experts_padded(xs, scale, gate, up, down, expert, counts)
        return y if dest is None else y.index_select(0, dest)

    def choose_impl(self, xs: Tensor, gate: Tensor) -> str:
        """`impl`, or under "auto" "grouped_mm" where `F.grouped_mm` takes these tensors, else
        "grouped"."""
        if self.impl != "auto":
            return self.impl
        return "grouped_mm" if grouped_mm_supported(xs, gate) else "grouped"

    def forward_reference(self, u: Tensor) -> Tensor:
        """The per-token loop: slow, obviously right; tests only."""
        x = u.reshape(-1, self.d_model)
        _, weights, experts = self.route(x)
        rows = []
        for t in range(x.shape[0]):
            acc = x.new_zeros(self.d_model)
            for j in range(self.cfg.top_k):
                y = self.expert(int(experts[t, j]), x[t : t + 1])[0]
                acc = acc + weights[t, j].to(x.dtype) * y
            rows.append(acc)
        return torch.stack(rows).view(u.shape)

    def _auxiliary(self, logits: Tensor, counts: Tensor) -> Tensor | None:
        cfg = self.cfg
        loss = None
        if cfg.balance_loss > 0:
            frac = counts.float() / counts.sum().clamp(min=1)  # [E]
            probs = logits.softmax(-1).mean(0)  # [E]
            loss = cfg.balance_loss * cfg.n_experts * (frac * probs).sum()
        if cfg.z_loss > 0:
            z = cfg.z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean()
            loss = z if loss is None else loss + z
        return loss if loss is None else loss / self.n_slots  # the mean over layers

    # -- init and diagnostics ---------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, target_var: float, n_layers: int, generator: torch.Generator, *,
                     init_tables: bool = True) -> dict[str, float]:
        """Router and expert gate/up maps std sqrt(2/(5h)); expert down maps as the FFN's
        (target_var is not used: each expert is initialised as the FFN it replaces)."""
        h = self.d_model
        self.router.weight.normal_(std=linear_std(h), generator=generator)
        self.gate.normal_(std=linear_std(h), generator=generator)
        self.up.normal_(std=linear_std(h), generator=generator)
        self.down.normal_(std=ffn_output_std(h, n_layers), generator=generator)
        self.init_stats = {}
        return self.init_stats

    @torch.no_grad()
    def diagnostics(self, u: Tensor) -> dict[str, Any]:
        """Usage statistics of the expert load, the load of each expert and the largest load
        relative to uniform."""
        load = expert_load(self, u)
        stats = usage_stats(load)
        stats.update(kind="moe", expert_load=load.tolist(),
                     max_load=float(load.max() * self.cfg.n_experts))
        return stats

    # -- cost model (`ultramem.accounting`) ----------------------------------------------------

    @staticmethod
    def dense_params(cfg: MoEConfig, d_model: int) -> int:
        return d_model * cfg.n_experts  # the router

    @staticmethod
    def sparse_tables(cfg: MoEConfig, d_model: int, n_layers: int) -> list[Table]:
        """The experts: one row of 3 h w parameters each, top_k read per token."""
        return [Table(cfg.n_experts, 3 * d_model * cfg.expert_hidden, cfg.top_k, n_layers)]

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"experts={c.n_experts}, top_k={c.top_k}, hidden={c.expert_hidden}, "
                f"renormalize={c.renormalize}")


IMPLS = ("auto", "grouped_mm", "grouped", "padded")


def compute_dtype(device_type: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param_dtype


# On CPU, bf16 matmuls go to oneDNN, which JIT-compiles a kernel for every new shape (measured
# 1.2 ms per first-seen [M, 256] x [256, 64] against 0.08 ms once cached): expert groups whose
# sizes change every training step would pay it on almost every matmul (small/moe under bf16
# autocast was 0.87x its float32 speed). Padding each group to a multiple of ROW_BUCKET rows
# keeps the set of shapes small, for at most ROW_BUCKET - 1 zero rows per expert.
ROW_BUCKET = 32


def needs_row_buckets(xs: Tensor, n_experts: int) -> bool:
    """bf16 on CPU with groups large enough (>= ROW_BUCKET rows on average) that their sizes
    vary step to step; small decode batches keep their few exact shapes."""
    return (xs.device.type == "cpu" and xs.dtype == torch.bfloat16
            and xs.shape[0] >= ROW_BUCKET * n_experts)


def pad_groups(xs: Tensor, scale: Tensor, expert: Tensor, counts: Tensor,
               multiple: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Re-lay the expert-sorted rows xs [N, h] (ids `expert` [N], sizes `counts` [E]) so each
    group starts at a multiple of `multiple` and its size is rounded up, zero rows in between.
    Returns (rows [N + E (multiple - 1), h], scale, padded counts [E], dest [N]): row i of xs is
    row dest[i] of the result; the buffer's length is a bound, so no host sync is needed."""
    n, e = xs.shape[0], counts.shape[0]
    padded = torch.div(counts + multiple - 1, multiple, rounding_mode="floor") * multiple  # [E]
    start = torch.cumsum(padded, 0) - padded  # [E], where each padded group begins
    first = torch.cumsum(counts, 0) - counts  # [E], where each group begins in xs
    dest = start[expert] + torch.arange(n, device=xs.device) - first[expert]  # [N]
    cap = n + e * (multiple - 1)
    rows = xs.new_zeros(cap, xs.shape[1]).index_copy(0, dest, xs)
    scales = scale.new_zeros(cap).index_copy(0, dest, scale)
    return rows, scales, padded, dest


def grouped_mm_supported(xs: Tensor, gate: Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands: rows of h and of w elements (tokens, weights,
    hidden activations) each a multiple of 16 bytes, and on CPU float32 or bfloat16; on CUDA,
    whatever this device and torch build run forward and backward (probed once per device and
    dtype: bfloat16 on Hopper, for one)."""
    size = xs.element_size()
    if not (hasattr(F, "grouped_mm") and (xs.shape[-1] * size) % 16 == 0
            and (gate.shape[-1] * size) % 16 == 0):
        return False
    if xs.device.type == "cpu":
        return xs.dtype in (torch.float32, torch.bfloat16)
    return xs.device.type == "cuda" and _grouped_mm_runs(xs.device, xs.dtype)


@functools.cache
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """A tiny grouped matmul with its backward on `device` in `dtype`: True when it runs."""
    try:
        a = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        F.grouped_mm(a, b, offs=offs).sum().backward()
        return bool(torch.isfinite(b.grad).all())
    except (RuntimeError, NotImplementedError):
        return False


def experts_grouped_mm(xs: Tensor, scale: Tensor, gate: Tensor, up: Tensor, down: Tensor,
                       counts: Tensor) -> Tensor:
    """All experts in three grouped matmuls over the sorted groups, [N, h]; no host sync."""
    ends = torch.cumsum(counts, 0).to(torch.int32)  # [E], cumulative group ends
    hidden = F.silu(F.grouped_mm(xs, gate, offs=ends)) * F.grouped_mm(xs, up, offs=ends)  # [N, w]
    return F.grouped_mm(hidden * scale.unsqueeze(-1), down, offs=ends)  # [N, h]


def experts_loop(xs: Tensor, scale: Tensor, gate: Tensor, up: Tensor, down: Tensor,
                 sizes: list[int]) -> Tensor:
    """One matmul chain per active expert, [N, h]. The weights are unbound once, so the backward
    stacks the expert gradients once instead of adding a full-size zero tensor per expert."""
    gs, us, ds = gate.unbind(0), up.unbind(0), down.unbind(0)
    outs = [(F.silu(g @ gs[i]) * (g @ us[i]) * s.unsqueeze(-1)) @ ds[i]  # [n_i, h]
            for i, (g, s) in enumerate(zip(xs.split(sizes), scale.split(sizes), strict=True))
            if g.shape[0] > 0]
    return torch.cat(outs) if outs else xs.new_zeros(0, down.shape[-1])


def experts_padded(xs: Tensor, scale: Tensor, gate: Tensor, up: Tensor, down: Tensor,
                   expert: Tensor, counts: Tensor) -> Tensor:
    """All experts in three batched matmuls over groups padded to the largest, [N, h]."""
    cap = int(counts.max())
    offsets = torch.cumsum(counts, 0) - counts  # [E]
    slot = torch.arange(xs.shape[0], device=xs.device) - offsets[expert]  # place in group
    buf = xs.new_zeros(gate.shape[0], cap, xs.shape[-1])
    buf = buf.index_put((expert, slot), xs)  # [E, C, h]
    sbuf = scale.new_zeros(gate.shape[0], cap).index_put((expert, slot), scale)  # [E, C]
    hidden = F.silu(torch.bmm(buf, gate)) * torch.bmm(buf, up) * sbuf.unsqueeze(-1)  # [E, C, w]
    return torch.bmm(hidden, down)[expert, slot]  # [N, h]
