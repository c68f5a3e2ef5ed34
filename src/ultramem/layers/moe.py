"""Mixture of SwiGLU experts (OLMoE style by default, Mixtral style as an option), dropless.

Per token x [h]:
  probs   = softmax(W_router x)                 -> [E], in float32
  top-k   = the k most probable experts         (weights renormalised only if `renormalize`)
  out     = sum_j w_j * down_e(silu(gate_e x) * up_e x)
Tokens are grouped by expert (a stable sort of the T*k assignments); then either each active
expert runs one matmul chain on its group, or, when loads are even enough that padding every
group to the largest wastes little, all experts run as three batched matmuls. No Python loop
over tokens, no capacity factor, no dropped tokens.
`forward_reference` is the per-token loop the tests hold the grouped path to.
Auxiliary losses (recorded only while gradients are enabled): load balancing
E * sum_e f_e P_e (f_e: fraction of assignments, P_e: mean router probability) and router
z-loss mean(logsumexp(logits)^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import MoEConfig
from ultramem.layers.common import flatten_tokens


class MoELayer(nn.Module):
    """`forward(u [..., h]) -> [..., h]`; replaces the FFN of its block."""

    def __init__(self, cfg: MoEConfig, d_model: int, *, slot: int = 0, store: None = None):
        super().__init__()
        self.cfg, self.d_model, self.slot = cfg, d_model, slot
        e, w = cfg.n_experts, cfg.expert_hidden
        self.router = nn.Linear(d_model, e, bias=False)
        self.gate = nn.Parameter(torch.empty(e, d_model, w))
        self.up = nn.Parameter(torch.empty(e, d_model, w))
        self.down = nn.Parameter(torch.empty(e, w, d_model))
        self._aux_loss: Tensor | None = None
        # "auto" picks per call: "padded" (batched matmuls over groups padded to the largest)
        # when loads are even, else "grouped" (one matmul chain per active expert).
        self.impl = "auto"

    def _flat(self, u: Tensor) -> Tensor:
        return flatten_tokens(self, u)

    def route(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router logits [T, E] (float32 or wider), top-k weights [T, k] and expert ids [T, k]."""
        x = self._flat(u)
        logits = self.router(x)  # [T, E], at least float32
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.cfg.top_k, dim=-1)  # [T, k]
        if self.cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, experts

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on tokens x [n, h] -> [n, h]."""
        return (F.silu(x @ self.gate[e]) * (x @ self.up[e])) @ self.down[e]

    def forward(self, u: Tensor) -> Tensor:
        lead = u.shape[:-1]
        x = self._flat(u)  # [T, h]
        logits, weights, experts = self.route(x)
        k, e = self.cfg.top_k, self.cfg.n_experts
        flat = experts.reshape(-1)  # [T*k]
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        token = torch.div(order, k, rounding_mode="floor")  # token of each sorted assignment
        counts = torch.bincount(flat, minlength=e)  # [E]
        sizes = counts.tolist()  # the one host sync: group sizes decide the matmul shapes
        impl = self.choose_impl(sizes)
        xs = x[token]  # [T*k, h]
        if impl == "padded":
            y = self._experts_padded(xs, flat[order], counts, max(sizes))
        elif impl == "grouped":
            outs = [self.expert(i, g) for i, g in enumerate(xs.split(sizes)) if g.shape[0] > 0]
            y = torch.cat(outs)  # [T*k, h]
        else:
            raise ValueError(f"MoELayer.impl must be auto, grouped or padded, got {impl!r}")
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)  # [T*k, h]
        out = torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))  # [T, h]
        if torch.is_grad_enabled():
            self._aux_loss = self._auxiliary(logits, counts)
        else:
            self._aux_loss = None
        return out.view(*lead, self.d_model)

    def choose_impl(self, sizes: list[int]) -> str:
        """The expert path for these group sizes: `impl`, or under "auto" "padded" when padding
        every group to the largest adds at most half again the work, else "grouped"."""
        if self.impl != "auto":
            return self.impl
        return "padded" if len(sizes) * max(sizes) <= 1.5 * sum(sizes) else "grouped"

    def _experts_padded(self, xs: Tensor, expert: Tensor, counts: Tensor, cap: int) -> Tensor:
        """All experts in three batched matmuls over groups padded to the largest, [T*k, h]."""
        offsets = torch.cumsum(counts, 0) - counts  # [E]
        slot = torch.arange(xs.shape[0], device=xs.device) - offsets[expert]  # place in group
        buf = xs.new_zeros(self.cfg.n_experts, cap, self.d_model)
        buf = buf.index_put((expert, slot), xs)  # [E, C, h]
        hidden = F.silu(torch.bmm(buf, self.gate)) * torch.bmm(buf, self.up)  # [E, C, w]
        return torch.bmm(hidden, self.down)[expert, slot]  # [T*k, h]

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
        return loss

    def pop_aux_loss(self) -> Tensor | None:
        """The auxiliary loss of the last forward run with gradients enabled."""
        loss, self._aux_loss = self._aux_loss, None
        return loss

    def value_parameters(self) -> list[nn.Parameter]:
        """Sparse tables with a separate learning rate: none for an MoE."""
        return []

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"experts={c.n_experts}, top_k={c.top_k}, hidden={c.expert_hidden}, "
                f"renormalize={c.renormalize}")
