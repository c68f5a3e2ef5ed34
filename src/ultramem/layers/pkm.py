"""Product-key memory, PKM (Lample et al. 2019), and the product-key query it shares with PEER
and Memory+.

Per token x [h], per head h_i (own query map and sub-keys; values shared by all heads):
  q       = norm(W_q x)                      -> [H, Dk], split into halves q1, q2 [H, Dk/2]
  s1, s2  = q1 K1^T, q2 K2^T                 -> [H, n] each
  top-k   = best k of {s1[i] + s2[j]}        (exact, from the k x k candidates)
  w       = softmax over the k scores        -> [H, k]
  out     = sum_{heads, k} w * V[i * n + j]  -> [Dv] (then W_out when Dv != h)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ultramem.config import PKMConfig
from ultramem.init import balance_table, init_product_keys, linear_std
from ultramem.layers.common import SparseLayer, Table
from ultramem.ops import weighted_lookup
from ultramem.retrieval import product_key_topk, rms_norm


class ProductKeyQuery(nn.Module):
    """n_heads product-key searches over an n_keys x n_keys grid.

    query_norm: "layer" (LayerNorm over each head's Dk), "batch" (BatchNorm over all heads'
    queries, Lample's choice; it mixes tokens of a batch in training) or "rms" (RMSNorm of each
    half, as in Memory+'s qk-norm; half scores are then divided by sqrt(Dk/2) as in attention).
    key_norm: RMSNorm the sub-keys too (qk-norm).
    """

    def __init__(self, d_model: int, n_keys: int, key_dim: int, n_heads: int,
                 query_norm: str = "layer", key_norm: bool = False):
        super().__init__()
        self.n_keys, self.key_dim, self.n_heads = n_keys, key_dim, n_heads
        self.query_norm = query_norm
        half = key_dim // 2
        self.query = nn.Linear(d_model, n_heads * key_dim, bias=False)
        if query_norm == "batch":
            self.norm = nn.BatchNorm1d(n_heads * key_dim)
        elif query_norm == "layer":
            self.norm = nn.LayerNorm(key_dim)
        else:
            self.query_gain = nn.Parameter(torch.ones(half))
        self.keys = nn.Parameter(torch.empty(n_heads, 2, n_keys, half))  # [H, 2, n, Dk/2]
        self.key_gain = nn.Parameter(torch.ones(half)) if key_norm else None

    def half_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, h] -> s1, s2 [T, H, n]."""
        t = x.shape[0]
        q = self.query(x)  # [T, H*Dk]
        if self.query_norm == "batch":
            q = self.norm(q)
        q = q.view(t, self.n_heads, 2, self.key_dim // 2)  # [T, H, 2, Dk/2]
        if self.query_norm == "layer":
            q = self.norm(q.flatten(-2)).view_as(q)
        elif self.query_norm == "rms":
            q = rms_norm(q, self.query_gain)
        keys = self.keys if self.key_gain is None else rms_norm(self.keys, self.key_gain)
        s = torch.einsum("thpd,hpnd->thpn", q, keys.to(q.dtype)).float()  # [T, H, 2, n]
        if self.query_norm == "rms":  # unit-RMS halves: scale the dot product as attention does
            s = s * (self.key_dim // 2) ** -0.5
        return s[:, :, 0], s[:, :, 1]

    def forward(self, x: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
        """x [T, h] -> scores [T, H, k] (float32, descending) and cells [T, H, k]."""
        s1, s2 = self.half_scores(x)
        return product_key_topk(s1, s2, top_k)

    @staticmethod
    def param_count(d_model: int, n_keys: int, key_dim: int, n_heads: int,
                    query_norm: str = "layer", key_norm: bool = False) -> int:
        """Parameters of `ProductKeyQuery(...)` with these arguments, without building it."""
        hk = n_heads * key_dim
        norm = {"batch": 2 * hk, "layer": 2 * key_dim, "rms": key_dim // 2}[query_norm]
        return d_model * hk + norm + n_heads * n_keys * key_dim + (
            key_dim // 2 if key_norm else 0)


class PKMLayer(SparseLayer):
    """Product-key memory layer: `forward(u [..., h]) -> [..., h]` (contract: `SparseLayer`)."""

    def __init__(self, cfg: PKMConfig, d_model: int, *, slot: int = 0, n_slots: int = 1,
                 store: None = None):
        super().__init__(cfg, d_model, slot=slot, n_slots=n_slots)
        self.value_dim = cfg.value_dim or d_model
        self.pk = ProductKeyQuery(d_model, cfg.n_keys, cfg.key_dim, cfg.n_heads, cfg.query_norm)
        self.values = nn.Parameter(torch.empty(cfg.n_values, self.value_dim))
        self.out_proj = (nn.Linear(self.value_dim, d_model, bias=False)
                         if self.value_dim != d_model else None)

    def retrieve(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Scores [T, H*k] and value rows [T, H*k] of every head's selection."""
        scores, cells = self.pk(self._flat(u), self.cfg.top_k)  # [T, H, k]
        return scores.flatten(1), cells.flatten(1)

    def forward(self, u: Tensor) -> Tensor:
        lead = u.shape[:-1]
        x = self._flat(u)  # [T, h]
        scores, rows = self.pk(x, self.cfg.top_k)  # [T, H, k]
        w = scores.softmax(-1).flatten(1)  # [T, H*k]
        y = weighted_lookup(self.values, rows.flatten(1), w, sparse_grad=self.cfg.sparse_grad)
        out = y if self.out_proj is None else self.out_proj(y)  # [T, h]
        return out.view(*lead, self.d_model)

    def value_parameters(self) -> list[nn.Parameter]:
        """The sparse tables (their optimizer may use sparse updates)."""
        return [self.values]

    @torch.no_grad()
    def init_weights(self, target_var: float, n_layers: int, generator: torch.Generator, *,
                     init_tables: bool = True) -> dict[str, float]:
        """Product keys as `init_product_keys`, W_out std sqrt(2/(5h)), the table scaled so the
        output variance is target_var (`balance_table`)."""
        init_product_keys(self.pk, self.d_model, generator)
        if self.out_proj is not None:
            self.out_proj.weight.normal_(std=linear_std(self.d_model), generator=generator)
        self.init_stats = balance_table(self, self.values, target_var, generator,
                                        init_tables=init_tables)
        return self.init_stats

    @staticmethod
    def dense_params(cfg: PKMConfig, d_model: int) -> int:
        dv = cfg.value_dim or d_model
        return (ProductKeyQuery.param_count(d_model, cfg.n_keys, cfg.key_dim, cfg.n_heads,
                                            cfg.query_norm)
                + (dv * d_model if dv != d_model else 0))

    @staticmethod
    def sparse_tables(cfg: PKMConfig, d_model: int, n_layers: int) -> list[Table]:
        return [Table(cfg.n_values, cfg.value_dim or d_model, cfg.n_heads * cfg.top_k, n_layers)]

    @staticmethod
    def retrieval_flops(cfg: PKMConfig) -> int:
        return product_key_flops(cfg.n_heads, cfg.top_k)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"n_keys={c.n_keys}, N={c.n_values}, Dk={c.key_dim}, heads={c.n_heads}, "
                f"top_k={c.top_k}, Dv={self.value_dim}, norm={c.query_norm}")


def product_key_flops(n_heads: int, top_k: int) -> int:
    """Per-token FLOPs of scoring the top_k x top_k candidate sums of every head."""
    return n_heads * top_k * top_k
