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

from typing import Any

import torch
from torch import Tensor, nn

from ultramem.config import UltraMemV1Config
from ultramem.init import init_tucker_keys, linear_std, ultramem_v1_value_std
from ultramem.layers.common import SparseLayer, Table
from ultramem.layers.ultramem_v2 import tucker_scoring_flops
from ultramem.ops import weighted_lookup
from ultramem.retrieval import TuckerProductKeys


class UltraMemV1Layer(SparseLayer):
    """`forward(u [..., h]) -> [..., h]`; placement (read/write blocks) is the model's business
    (contract: `SparseLayer`)."""

    def __init__(self, cfg: UltraMemV1Config, d_model: int, *, slot: int = 0, n_slots: int = 1,
                 store: None = None):
        super().__init__(cfg, d_model, slot=slot, n_slots=n_slots)
        r, dk, c = cfg.tucker_rank, cfg.key_dim, cfg.n_cores
        self.query = nn.Linear(d_model, 2 * r * dk, bias=False)  # shared by the heads
        self.heads = nn.ModuleList(
            TuckerProductKeys(cfg.key_rows, dk, r, c) for _ in range(cfg.n_heads)
        )
        self.values = nn.Parameter(torch.empty(cfg.n_values, cfg.value_dim))
        self.out_proj = nn.Linear(cfg.virtual_blocks * cfg.value_dim, d_model, bias=False)
        self.register_buffer("perm", self._shuffles())  # [H, E*N], saved with the model

    def _shuffles(self, device: torch.device | str | None = None) -> Tensor:
        """Each head's fixed shuffle of grid cells to virtual slots, [H, E*N]."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed + 7919 * (self.slot + 1))
        return torch.stack([torch.randperm(cfg.n_virtual, generator=gen, device=device)
                            for _ in range(cfg.n_heads)])

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.perm.copy_(self._shuffles("cpu"))

    def queries(self, x: Tensor) -> Tensor:
        return self.query(x).view(-1, 2, self.cfg.tucker_rank, self.cfg.key_dim)  # [T, 2, r, Dk]

    def retrieve_virtual(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Per-core scores [T, H*m, c] and virtual slots [T, H*m] in [0, E*N)."""
        q = self.queries(self._flat(u))
        scores, slots = [], []
        for h, keys in enumerate(self.heads):
            s_row, s_col = keys.row_col_scores(q)  # [T, r, 2n] each
            sc, cells = keys.select(s_row, s_col, self.cfg.top_m, self.cfg.preselect_k)  # [T, m, c]
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

    def value_parameters(self) -> list[nn.Parameter]:
        """The tables the 4x -> 1x learning-rate schedule applies to."""
        return [self.values]

    # -- init and diagnostics ---------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, target_var: float, n_layers: int, generator: torch.Generator, *,
                     init_tables: bool = True) -> dict[str, float]:
        """Query and output maps std sqrt(2/(5h)); each head's keys calibrated as UltraMemV2's;
        values N(0, E / (2 m H L)) (v1's own rule: target_var is not used)."""
        cfg, h = self.cfg, self.d_model
        self.query.weight.normal_(std=linear_std(h), generator=generator)
        self.out_proj.weight.normal_(std=linear_std(h), generator=generator)
        stats: dict[str, float] = {}
        for keys in self.heads:
            def score_fn(x: Tensor, keys: nn.Module = keys) -> Tensor:
                s_row, s_col = keys.row_col_scores(self.queries(x))
                return keys.select(s_row, s_col, cfg.top_m, cfg.preselect_k)[0]

            stats = init_tucker_keys(keys, score_fn, cfg.init_samples, h, generator)
        std = ultramem_v1_value_std(cfg.virtual_blocks, cfg.top_m, cfg.n_heads, n_layers)
        self.values.normal_(std=std, generator=generator)
        stats["value_std"] = std
        self.init_stats = stats
        return stats

    @torch.no_grad()
    def diagnostics(self, u: Tensor) -> dict[str, Any]:
        """Row usage and score statistics and every head's Tucker singular values [H, c, r]."""
        stats = super().diagnostics(u)
        stats["tucker_singular_values"] = torch.stack(
            [torch.linalg.svdvals(k.cores.detach().float()) for k in self.heads]).tolist()
        return stats

    # -- cost model (`ultramem.accounting`) ----------------------------------------------------

    @staticmethod
    def dense_params(cfg: UltraMemV1Config, d_model: int) -> int:
        r, dk = cfg.tucker_rank, cfg.key_dim
        per_head = 2 * r * cfg.key_rows * dk + cfg.n_cores * r * r + 2 * dk  # keys, cores, gains
        return (d_model * 2 * r * dk + cfg.n_heads * per_head
                + cfg.virtual_blocks * cfg.value_dim * d_model)  # query, heads, W_out

    @staticmethod
    def sparse_tables(cfg: UltraMemV1Config, d_model: int, n_layers: int) -> list[Table]:
        return [Table(cfg.n_values, cfg.value_dim, cfg.n_heads * cfg.top_m, n_layers)]

    @staticmethod
    def retrieval_flops(cfg: UltraMemV1Config) -> int:
        return cfg.n_heads * tucker_scoring_flops(cfg.preselect_k, cfg.tucker_rank, cfg.n_cores)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"n_keys={c.n_keys} (virtual {c.key_rows}), N={c.n_values}, E={c.virtual_blocks}, "
                f"heads={c.n_heads}, top_m={c.top_m}, Dk={c.key_dim}, Dv={c.value_dim}")
