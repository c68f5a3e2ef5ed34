"""The UltraMemV2 memory layer (REFERENCE.md section 2).

Per token u [h]:
  queries   = W_q u                       -> r row and r column queries of width Dk (per rank)
  S_row/col = <RMSNorm(q), RMSNorm(K)>    -> [r, n] each
  retrieval = Tucker pre-selection + exact scoring -> top m cells with per-core scores G_k
  rows      = perm[cell]                  -> the fixed shuffle maps grid cells to value rows
  a_s       = <pre_value[s], W_pre u>     -> PEER-style one-neuron expert input, no activation
                                             (pre_value_dim=0: plain values, a_s = 1)
  y         = sum_s a_s * G_k(s) * value[s][slice k]   (slice k of Dv weighted by core k)
  out       = W_out y                     -> [h], added to the residual next to the FFN
Raw scores weight the values: no softmax. `init_weights` applies the formulas of `ultramem.init`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import ModelConfig, UltraMemV2Config
from ultramem.diagnostics import preselect_recall
from ultramem.init import init_tucker_keys, linear_std, memory_output_variance, value_std_for
from ultramem.layers.common import SparseLayer, Table
from ultramem.ops import memory_read
from ultramem.precision import float32_region
from ultramem.retrieval import TuckerProductKeys


class ValueStore(nn.Module):
    """Value and pre-value tables shared by all memory layers (S_g-Ring sharing).

    Holds `n_tables` tables of `rows_per_table` rows, stacked. Layer l addresses the window of
    `group` consecutive tables starting at table l, wrapping around. Passed to layers explicitly.
    """

    def __init__(self, n_tables: int, rows_per_table: int, value_dim: int, pre_value_dim: int,
                 group: int):
        super().__init__()
        self.n_tables, self.rows_per_table, self.group = n_tables, rows_per_table, group
        self.values = nn.Parameter(torch.empty(n_tables * rows_per_table, value_dim))
        self.pre_values = _pre_value_table(n_tables * rows_per_table, pre_value_dim)

    def global_rows(self, slot: int, rows: Tensor) -> Tensor:
        """Window-local rows of layer `slot` -> rows of the stacked tables."""
        table = (slot + torch.div(rows, self.rows_per_table, rounding_mode="floor")) % self.n_tables
        return table * self.rows_per_table + rows % self.rows_per_table


def _pre_value_table(rows: int, pre_value_dim: int) -> nn.Parameter | None:
    """The pre-value table, or None for plain values (pre_value_dim=0)."""
    return nn.Parameter(torch.empty(rows, pre_value_dim)) if pre_value_dim else None


class UltraMemV2Layer(SparseLayer):
    """UltraMemV2 memory layer: `forward(u [..., h]) -> [..., h]` (contract: `SparseLayer`).

    store/slot: with S_g-Ring sharing, the shared `ValueStore` and this layer's index among the
    memory layers; otherwise the layer owns its `values` [N, Dv] and `pre_values` [N, Dp].
    With pre_value_dim=0 (plain values) `pre_values` and `pre_proj` are None.
    """

    preselects = True

    def __init__(self, cfg: UltraMemV2Config, d_model: int, *, slot: int = 0, n_slots: int = 1,
                 store: ValueStore | None = None):
        super().__init__(cfg, d_model, slot=slot, n_slots=n_slots)
        r, dk = cfg.tucker_rank, cfg.key_dim
        n_query = 2 * dk if cfg.shared_rank_query else 2 * r * dk
        self.query = nn.Linear(d_model, n_query, bias=False)
        self.keys = TuckerProductKeys(cfg.n_keys, dk, r, cfg.n_cores)
        self.pre_proj = (nn.Linear(d_model, cfg.pre_value_dim, bias=False)  # W_pre
                         if cfg.pre_value_dim else None)
        self.out_proj = nn.Linear(cfg.value_dim, d_model, bias=False)  # W_out
        self.register_buffer("perm", self._shuffle())  # [N], saved with the model
        if store is None:
            if cfg.share_group != 1:
                raise ValueError("share_group > 1 needs a ValueStore passed as store=")
            self.values = nn.Parameter(torch.empty(cfg.n_values, cfg.value_dim))
            self.pre_values = _pre_value_table(cfg.n_values, cfg.pre_value_dim)
        # A plain attribute, not a submodule: the model owns the store, layers only borrow it.
        object.__setattr__(self, "store", store)
        # Set by `ultramem.offload` when the tables are served from disk or host memory.
        self.table_source = None
        # Set by `ultramem.serve`: the inference forward, used when no gradients are recorded.
        self.decode_step = None

    def _shuffle(self, device: torch.device | str | None = None) -> Tensor:
        """The fixed shuffle of grid cells to value rows, [N], from `cfg.seed` and the slot."""
        gen = torch.Generator().manual_seed(self.cfg.seed + self.slot)
        return torch.randperm(self.cfg.n_values, generator=gen, device=device)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.perm.copy_(self._shuffle("cpu"))

    # -- tables ---------------------------------------------------------------------------

    def tables(self) -> tuple[Tensor, Tensor | None]:
        """(values, pre_values) this layer reads, [rows, Dv] and [rows, Dp] (None: plain values)."""
        if self.table_source is not None:
            return self.table_source.values, self.table_source.pre_values
        if self.store is None:
            return self.values, self.pre_values
        return self.store.values, self.store.pre_values

    def value_parameters(self) -> list[nn.Parameter]:
        """The sparse tables (values, pre-values): their own lr group, sparse updates allowed."""
        return [t for t in self.tables() if isinstance(t, nn.Parameter)]

    def table_rows(self, rows: Tensor) -> Tensor:
        """Rows as returned by `retrieve` -> rows of `tables()`."""
        return rows if self.store is None else self.store.global_rows(self.slot, rows)

    # -- retrieval ------------------------------------------------------------------------

    def _queries(self, x: Tensor) -> Tensor:
        r, dk = self.cfg.tucker_rank, self.cfg.key_dim
        # float32 also under bf16 autocast: the queries decide which rows are read, and bf16
        # queries change the retrieved set for most tokens (retrieval.row_col_scores likewise)
        with float32_region(x.device.type):
            q = F.linear(x.float(), self.query.weight.float())  # [T, 2 r Dk]
        if self.cfg.shared_rank_query:
            return q.view(-1, 2, 1, dk).expand(-1, 2, r, dk)  # [T, 2, r, Dk]
        return q.view(-1, 2, r, dk)  # [T, 2, r, Dk]

    def _retrieve(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s_row, s_col = self.keys.row_col_scores(self._queries(x))  # [T, r, n] each
        scores, cells = self.keys.select(s_row, s_col, self.cfg.top_m, self.cfg.preselect_k,
                                         self.cfg.preselect)
        return scores, self.perm[cells], s_row, s_col  # [T, m, c], [T, m]

    def retrieve(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Per-core scores [T, top_m, n_cores] (sorted by their sum) and value rows [T, top_m]."""
        scores, rows, _, _ = self._retrieve(self._flat(u))
        return scores, rows

    def grid_scores(self, u: Tensor) -> Tensor:
        """Exact summed Tucker score of every grid cell, [T, n, n] (tests and diagnostics)."""
        s_row, s_col = self.keys.row_col_scores(self._queries(self._flat(u)))
        return self.keys.grid_scores(s_row, s_col)

    def cells_of_rows(self, rows: Tensor) -> Tensor:
        """Inverse of the shuffle: value rows -> grid cells i * n + j."""
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.perm.numel(), device=self.perm.device)
        return inv[rows]

    # -- forward --------------------------------------------------------------------------

    def forward(self, u: Tensor) -> Tensor:
        if self.decode_step is not None and not torch.is_grad_enabled():
            return self.decode_step(u)
        lead = u.shape[:-1]
        x = self._flat(u)  # [T, h]
        scores, rows, s_row, s_col = self._retrieve(x)  # [T, m, c], [T, m]
        rows = self.table_rows(rows)
        xp = self.pre_proj(x) if self.pre_proj is not None else None  # [T, Dp]
        # a_s = <pre_value[s], W_pre x> (1 for plain values); y = sum_s a_s G_k(s) value[s][slice k]
        if self.table_source is not None:
            y = self.table_source.read(rows, scores, xp)  # [T, Dv]
        else:
            values, pre_values = self.tables()
            y = memory_read(values, pre_values, rows, scores, xp,
                            sparse_grad=self.cfg.sparse_grad)  # [T, Dv]
        out = self.out_proj(y.to(self.out_proj.weight.dtype))  # [T, h]
        self._aux_loss = self._auxiliary(s_row, s_col) if torch.is_grad_enabled() else None
        return out.view(*lead, self.d_model)

    def _auxiliary(self, s_row: Tensor, s_col: Tensor) -> Tensor | None:
        cfg = self.cfg
        loss = None
        if cfg.tucker_penalty > 0:
            loss = self.keys.tucker_penalty(cfg.tucker_penalty, cfg.tucker_tau)
        if cfg.balance_loss > 0:
            bal = self.keys.balance_loss(s_row, s_col, cfg.preselect_k, cfg.balance_loss)
            loss = bal if loss is None else loss + bal
        return loss

    # -- init and diagnostics ---------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, target_var: float, n_layers: int, generator: torch.Generator, *,
                     init_tables: bool = True) -> dict[str, float]:
        """Linear maps std sqrt(2/(5h)); keys and score scale by `init_tucker_keys` through the
        real retrieval; values and pre-values std sigma_V so the output variance is target_var."""
        cfg, h = self.cfg, self.d_model
        for lin in (self.query, self.pre_proj, self.out_proj):
            if lin is not None:  # pre_proj is None for plain values
                lin.weight.normal_(std=linear_std(h), generator=generator)
        stats = init_tucker_keys(self.keys, lambda x: self.retrieve(x)[0], cfg.init_samples, h,
                                 generator)
        if cfg.value_init == "fixed":
            value_std = cfg.fixed_value_std
        else:
            value_std = value_std_for(target_var, h, cfg.pre_value_dim, cfg.value_dim, cfg.top_m,
                                      stats["score_second_moment"])
        if init_tables:
            values, pre_values = self.tables()
            values.normal_(std=value_std, generator=generator)
            if pre_values is not None:
                pre_values.normal_(std=value_std, generator=generator)
        stats.update(
            value_std=value_std,
            target_var=target_var,
            predicted_var=memory_output_variance(value_std, h, cfg.pre_value_dim, cfg.value_dim,
                                                 cfg.top_m, stats["score_second_moment"]),
        )
        self.init_stats = stats
        return stats

    @torch.no_grad()
    def diagnostics(self, u: Tensor) -> dict[str, Any]:
        """Row usage and score statistics, the Tucker cores' singular values [c, r] and the
        pre-selection recall (`ultramem.diagnostics.preselect_recall`)."""
        stats = super().diagnostics(u)
        stats["tucker_singular_values"] = torch.linalg.svdvals(
            self.keys.cores.detach().float()).tolist()
        stats.update(preselect_recall(self, u))
        return stats

    # -- cost model (`ultramem.accounting`) ----------------------------------------------------

    @staticmethod
    def dense_params(cfg: UltraMemV2Config, d_model: int) -> int:
        r, dk = cfg.tucker_rank, cfg.key_dim
        query = d_model * (2 * dk if cfg.shared_rank_query else 2 * r * dk)
        keys = 2 * r * cfg.n_keys * dk
        cores = cfg.n_cores * r * r
        gains = 2 * dk
        return query + keys + cores + gains + d_model * cfg.pre_value_dim + cfg.value_dim * d_model

    @staticmethod
    def sparse_tables(cfg: UltraMemV2Config, d_model: int, n_layers: int) -> list[Table]:
        """One row is Dv + Dp wide; with S_g-Ring sharing n_layers tables of N / g rows, each
        read by g layers for top_m / g rows."""
        g = cfg.share_group
        picks = cfg.top_m // g if cfg.top_m % g == 0 else cfg.top_m / g
        return [Table(cfg.rows_per_table, cfg.value_dim + cfg.pre_value_dim, picks, n_layers, g)]

    @staticmethod
    def retrieval_flops(cfg: UltraMemV2Config) -> int:
        return tucker_scoring_flops(cfg.preselect_k, cfg.tucker_rank, cfg.n_cores)

    @staticmethod
    def build_store(cfg: ModelConfig) -> ValueStore | None:
        """The S_g-Ring `ValueStore` when share_group > 1."""
        mem = cfg.memory
        if mem.share_group == 1:
            return None
        return ValueStore(len(cfg.memory_blocks), mem.rows_per_table, mem.value_dim,
                          mem.pre_value_dim, mem.share_group)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"n_keys={c.n_keys}, N={c.n_values}, Dk={c.key_dim}, r={c.tucker_rank}, "
                f"cores={c.n_cores}, top_m={c.top_m}, kr={c.preselect_k}, Dv={c.value_dim}, "
                f"Dp={c.pre_value_dim}, shared={self.store is not None}")


# ----------------------------------------------------------------------------- Tucker helpers


def tucker_scoring_flops(kr: int, tucker_rank: int, n_cores: int) -> int:
    """Per-token FLOPs of scoring the kr^2 pre-selected cells with c cores of rank r."""
    r = tucker_rank
    return 2 * n_cores * (kr * r * r + kr * kr * r)
