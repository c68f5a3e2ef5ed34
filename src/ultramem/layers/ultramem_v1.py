"""UltraMem v1 (arXiv 2411.12364), REFERENCE.md section 5: the baseline UltraMemV2 improves on.

Per token x [h] (the FFN input of the block it reads; its output joins a later block):
  q           = W_q x                       -> one row/column query per Tucker rank, shared by heads
  per head    : Tucker retrieval over a (sqrt(E) n) x (sqrt(E) n) virtual grid (own keys, cores)
                -> top_m cells with per-core scores G_k
  virtual     = perm_head[cell]             -> index into E * N virtual slots
  block, row  = virtual // N, virtual % N   -> implicit value expansion over N physical rows
  y_e         = sum_{s in block e} G_k(s) * value[row_s][slice k]   (raw scores, no softmax)
  out         = W_out [y_0, ..., y_{E-1}]   -> one E*Dv -> h map
The Tucker-core penalty is on by default. The values' learning rate follows
`UltraMemV1Config.value_lr_scale` (4x decaying linearly to 1x), applied by the trainer to
`value_parameters()`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ultramem.config import UltraMemV1Config
from ultramem.layers.common import flatten_tokens
from ultramem.ops import weighted_lookup
from ultramem.retrieval import TuckerProductKeys


class UltraMemV1Layer(nn.Module):
    """`forward(u [..., h]) -> [..., h]`; placement (read/write blocks) is the model's business."""

    def __init__(self, cfg: UltraMemV1Config, d_model: int, *, slot: int = 0, store: None = None):
        super().__init__()
        self.cfg, self.d_model, self.slot = cfg, d_model, slot
        r, dk, c = cfg.tucker_rank, cfg.key_dim, cfg.n_cores
        self.query = nn.Linear(d_model, 2 * r * dk, bias=False)  # shared by the heads
        self.heads = nn.ModuleList(
            TuckerProductKeys(cfg.key_rows, dk, r, c) for _ in range(cfg.n_heads)
        )
        self.values = nn.Parameter(torch.empty(cfg.n_values, cfg.value_dim))
        self.out_proj = nn.Linear(cfg.virtual_blocks * cfg.value_dim, d_model, bias=False)
        gen = torch.Generator().manual_seed(cfg.seed + 7919 * (slot + 1))
        perms = [torch.randperm(cfg.n_virtual, generator=gen) for _ in range(cfg.n_heads)]
        self.register_buffer("perm", torch.stack(perms))  # [H, E*N]
        self._aux_loss: Tensor | None = None
        self.init_stats: dict[str, float] = {}

    def _flat(self, u: Tensor) -> Tensor:
        return flatten_tokens(self, u)

    def queries(self, x: Tensor) -> Tensor:
        return self.query(x).view(-1, 2, self.cfg.tucker_rank, self.cfg.key_dim)  # [T, 2, r, Dk]

    def retrieve_virtual(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Per-core scores [T, H*m, c] and virtual slots [T, H*m] in [0, E*N)."""
        q = self.queries(self._flat(u))
        scores, slots = [], []
        for h, keys in enumerate(self.heads):
            s_row, s_col = keys.row_col_scores(q)  # [T, r, 2n] each
            sc, cells = keys.select(s_row, s_col, self.cfg.top_m, self.cfg.topk)  # [T, m, c]
            scores.append(sc)
            slots.append(self.perm[h][cells])
        return torch.cat(scores, 1), torch.cat(slots, 1)

    def retrieve(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Summed scores [T, H*m] and physical value rows [T, H*m]."""
        scores, slots = self.retrieve_virtual(u)
        return scores.sum(-1), slots % self.cfg.n_values

    def forward(self, u: Tensor) -> Tensor:
        lead = u.shape[:-1]
        cfg = self.cfg
        e, n = cfg.virtual_blocks, cfg.n_values
        scores, slots = self.retrieve_virtual(u)  # [T, M, c], [T, M] with M = H*m
        t, m_all, c = scores.shape
        block = torch.div(slots, n, rounding_mode="floor")  # [T, M]
        rows = slots % n  # [T, M]
        # Pool per virtual block: bag (t, e) keeps the weights of the selections in block e.
        mask = block.unsqueeze(1) == torch.arange(e, device=block.device).view(1, e, 1)  # [T,E,M]
        weights = scores.unsqueeze(1) * mask.unsqueeze(-1)  # [T, E, M, c]
        y = weighted_lookup(
            self.values,
            rows.unsqueeze(1).expand(t, e, m_all).reshape(t * e, m_all),
            weights.reshape(t * e, m_all, c),
            sparse_grad=cfg.sparse_grad,
        )  # [T*E, Dv]
        out = self.out_proj(y.view(t, e * cfg.value_dim).to(self.out_proj.weight.dtype))  # [T, h]
        if torch.is_grad_enabled() and cfg.tucker_penalty > 0:
            self._aux_loss = sum(k.tucker_penalty(cfg.tucker_penalty, cfg.tucker_tau)
                                 for k in self.heads)
        else:
            self._aux_loss = None
        return out.view(*lead, self.d_model)

    def pop_aux_loss(self) -> Tensor | None:
        loss, self._aux_loss = self._aux_loss, None
        return loss

    def value_parameters(self) -> list[nn.Parameter]:
        """The tables the 4x -> 1x learning-rate schedule applies to."""
        return [self.values]

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"n_keys={c.n_keys} (virtual {c.key_rows}), N={c.n_values}, E={c.virtual_blocks}, "
                f"heads={c.n_heads}, top_m={c.top_m}, Dk={c.key_dim}, Dv={c.value_dim}")
