"""Memory+ (Berges et al. 2024): PKM with qk-norm, values shared by all memory layers, and a
gated output.

Per token x [h]:
  scores, rows = product-key top-k per head (RMS-normed query halves and sub-keys)
  y     = sum_{heads, k} softmax(scores) * V[rows]          -> [Dv], V shared by every layer
  out   = W_o (y * SiLU(W_s x))                              -> [h]
The shared table lives in a `SharedValues` module owned by the model and passed to each layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import MemoryPlusConfig, ModelConfig
from ultramem.init import balance_table, init_product_keys, linear_std
from ultramem.layers.common import SparseLayer, Table
from ultramem.layers.pkm import ProductKeyQuery, product_key_flops
from ultramem.ops import weighted_lookup


class SharedValues(nn.Module):
    """One value table [N, Dv] read by every Memory+ layer of a model."""

    def __init__(self, n_values: int, value_dim: int):
        super().__init__()
        self.values = nn.Parameter(torch.empty(n_values, value_dim))


class MemoryPlusLayer(SparseLayer):
    """`forward(u [..., h]) -> [..., h]`; `store` is the model's `SharedValues` (contract:
    `SparseLayer`)."""

    def __init__(self, cfg: MemoryPlusConfig, d_model: int, *, slot: int = 0, n_slots: int = 1,
                 store: SharedValues | None = None):
        if store is None:
            raise ValueError("MemoryPlusLayer needs the model's SharedValues passed as store=")
        super().__init__(cfg, d_model, slot=slot, n_slots=n_slots)
        self.value_dim = cfg.value_dim or d_model
        self.pk = ProductKeyQuery(d_model, cfg.n_keys, cfg.key_dim, cfg.n_heads, "rms",
                                  key_norm=True)
        self.gate_proj = nn.Linear(d_model, self.value_dim, bias=False)  # W_s
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)  # W_o
        # A plain attribute, not a submodule: the model owns the store, layers only borrow it.
        object.__setattr__(self, "store", store)

    @property
    def n_rows(self) -> int:
        return self.store.values.shape[0]

    def retrieve(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Scores [T, H*k] and rows of the shared table [T, H*k]."""
        scores, cells = self.pk(self._flat(u), self.cfg.top_k)
        return scores.flatten(1), cells.flatten(1)

    def forward(self, u: Tensor) -> Tensor:
        lead = u.shape[:-1]
        x = self._flat(u)  # [T, h]
        scores, rows = self.pk(x, self.cfg.top_k)  # [T, H, k]
        w = scores.softmax(-1).flatten(1)  # [T, H*k]
        y = weighted_lookup(self.store.values, rows.flatten(1), w,
                            sparse_grad=self.cfg.sparse_grad)  # [T, Dv]
        out = self.out_proj(y.to(x.dtype) * F.silu(self.gate_proj(x)))  # [T, h]
        return out.view(*lead, self.d_model)

    def value_parameters(self) -> list[nn.Parameter]:
        return [self.store.values]

    @torch.no_grad()
    def init_weights(self, target_var: float, n_layers: int, generator: torch.Generator, *,
                     init_tables: bool = True) -> dict[str, float]:
        """Product keys as `init_product_keys`, W_s and W_o std sqrt(2/(5h)), the shared table
        (drawn by the first layer only) scaled so the output variance is target_var."""
        h = self.d_model
        init_product_keys(self.pk, h, generator)
        self.gate_proj.weight.normal_(std=linear_std(h), generator=generator)
        self.out_proj.weight.normal_(std=linear_std(h), generator=generator)
        self.init_stats = balance_table(self, self.store.values, target_var, generator,
                                        init_tables=init_tables)
        return self.init_stats

    @staticmethod
    def dense_params(cfg: MemoryPlusConfig, d_model: int) -> int:
        dv = cfg.value_dim or d_model
        return (ProductKeyQuery.param_count(d_model, cfg.n_keys, cfg.key_dim, cfg.n_heads, "rms",
                                            key_norm=True)
                + 2 * d_model * dv)  # W_s, W_o

    @staticmethod
    def sparse_tables(cfg: MemoryPlusConfig, d_model: int, n_layers: int) -> list[Table]:
        """One table read by all n_layers layers."""
        return [Table(cfg.n_values, cfg.value_dim or d_model, cfg.n_heads * cfg.top_k, 1,
                      n_layers)]

    @staticmethod
    def retrieval_flops(cfg: MemoryPlusConfig) -> int:
        return product_key_flops(cfg.n_heads, cfg.top_k)

    @staticmethod
    def build_store(cfg: ModelConfig) -> SharedValues:
        """The one value table every Memory+ layer reads."""
        mem = cfg.memory
        return SharedValues(mem.n_values, mem.value_dim or cfg.d_model)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"n_keys={c.n_keys}, N={c.n_values} shared, Dk={c.key_dim}, heads={c.n_heads}, "
                f"top_k={c.top_k}, Dv={self.value_dim}")
