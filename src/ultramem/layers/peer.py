"""PEER (He 2024): a pool of n_keys**2 single-neuron experts chosen by product keys.

Per token x [h], per head (own query and sub-keys; the expert pool is shared):
  scores, experts = product-key top-k            -> [H, k]
  g_s   = softmax over the head's k scores        (router weights)
  out   = sum_{heads, k} g_s * GELU(<u_s, x>) v_s  with u_s, v_s in R^h
The down vectors u_s are read with `gather_dot` and the up vectors v_s with `weighted_lookup`,
so only the selected experts' rows are touched, forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import PEERConfig
from ultramem.init import balance_table, init_product_keys
from ultramem.layers.common import SparseLayer, Table
from ultramem.layers.pkm import ProductKeyQuery, product_key_flops
from ultramem.ops import gather_dot, weighted_lookup


class PEERLayer(SparseLayer):
    """`forward(u [..., h]) -> [..., h]` (contract: `SparseLayer`; its rows are the experts)."""

    def __init__(self, cfg: PEERConfig, d_model: int, *, slot: int = 0, n_slots: int = 1,
                 store: None = None):
        super().__init__(cfg, d_model, slot=slot, n_slots=n_slots)
        self.pk = ProductKeyQuery(d_model, cfg.n_keys, cfg.key_dim, cfg.n_heads, cfg.query_norm)
        self.down = nn.Parameter(torch.empty(cfg.n_values, d_model))  # u_s
        self.up = nn.Parameter(torch.empty(cfg.n_values, d_model))  # v_s

    def retrieve(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Router scores [T, H*k] and expert ids [T, H*k]."""
        scores, cells = self.pk(self._flat(u), self.cfg.top_k)
        return scores.flatten(1), cells.flatten(1)

    def forward(self, u: Tensor) -> Tensor:
        lead = u.shape[:-1]
        x = self._flat(u)  # [T, h]
        scores, experts = self.pk(x, self.cfg.top_k)  # [T, H, k]
        rows = experts.flatten(1)  # [T, H*k]
        router = scores.softmax(-1).flatten(1)  # [T, H*k]
        sparse = self.cfg.sparse_grad
        a = gather_dot(self.down, rows, x, sparse_grad=sparse)  # [T, H*k]
        weights = router * F.gelu(a.float())  # [T, H*k]
        out = weighted_lookup(self.up, rows, weights, sparse_grad=sparse)  # [T, h]
        return out.view(*lead, self.d_model)

    def value_parameters(self) -> list[nn.Parameter]:
        return [self.down, self.up]

    @torch.no_grad()
    def init_weights(self, target_var: float, n_layers: int, generator: torch.Generator, *,
                     init_tables: bool = True) -> dict[str, float]:
        """Product keys as `init_product_keys`; down vectors std 1/sqrt(h), so <u_s, x> ~ N(0, 1);
        the up vectors scaled so the output variance is target_var (`balance_table`)."""
        init_product_keys(self.pk, self.d_model, generator)
        self.down.normal_(std=1.0 / math.sqrt(self.d_model), generator=generator)
        self.init_stats = balance_table(self, self.up, target_var, generator,
                                        init_tables=init_tables)
        return self.init_stats

    @staticmethod
    def dense_params(cfg: PEERConfig, d_model: int) -> int:
        return ProductKeyQuery.param_count(d_model, cfg.n_keys, cfg.key_dim, cfg.n_heads,
                                           cfg.query_norm)

    @staticmethod
    def sparse_tables(cfg: PEERConfig, d_model: int, n_layers: int) -> list[Table]:
        """The experts: one row holds u_s and v_s, 2 h parameters."""
        return [Table(cfg.n_values, 2 * d_model, cfg.n_heads * cfg.top_k, n_layers)]

    @staticmethod
    def retrieval_flops(cfg: PEERConfig) -> int:
        return product_key_flops(cfg.n_heads, cfg.top_k)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"experts={c.n_values}, heads={c.n_heads}, top_k={c.top_k}, Dk={c.key_dim}"
