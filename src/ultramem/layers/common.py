"""The sparse-layer contract, `SparseLayer`, and the `Table` a kind's cost model is made of.

A sparse layer kind is three things: its frozen config in `ultramem.config` (whose `kind` names
it), a `SparseLayer` subclass in its own file in this package, and one line in
`ultramem.layers.LAYER_CLASSES`. The shared modules reach a kind only through the hooks below and
never branch on it: the model builds and calls layers, `ultramem.init` calls `init_weights`,
`ultramem.diagnostics` calls `diagnostics`, `ultramem.accounting` calls the cost hooks (static:
from a config alone, without building a layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ultramem.config import ModelConfig
from ultramem.diagnostics import row_counts, usage_stats


@dataclass(frozen=True)
class Table:
    """Sparse rows in the cost model: `copies` tables of `rows` x `width` parameters; each is read
    by `readers` layers, each of which reads `picks` rows per token. MoE experts are tables too
    (rows = experts, width = one expert's parameters, picks = top_k)."""

    rows: int
    width: int
    picks: float
    copies: int = 1
    readers: int = 1

    @property
    def params(self) -> int:
        return self.copies * self.rows * self.width

    @property
    def active(self) -> float:
        return self.copies * self.readers * self.picks * self.width


class SparseLayer(nn.Module):
    """A sparse layer: `forward(u [..., h]) -> [..., h]` on the normed FFN input u of its block.

    Built as `cls(cfg, d_model, slot=i, n_slots=n, store=s)`: cfg is the kind's config, slot the
    layer's index among the model's n_slots sparse layers, store what `build_store` made (tables
    shared by all layers and owned by the model; None when each layer owns its own). Parameters
    are allocated uninitialised; `init_weights` sets them (build first, initialise after).

    What each kind provides:
      forward(u)            the layer; computes only (no logging, no host sync)
      retrieve(u)           (scores, rows [T, picks]): what the layer selects per token, scores
                            [T, picks] or per-core [T, picks, c]; rows index `n_rows` rows
      n_rows                rows `retrieve` addresses (value rows, experts)
      value_parameters()    the sparse tables: their own lr group, sparse updates allowed
      init_weights(...)     its init, from the formulas of `ultramem.init`
      reset_buffers()       recompute buffers that are derived, not learned (shuffles); called
                            by `ultramem.init.init_lm` before any init_weights
      diagnostics(u)        usage statistics (`ultramem.diagnostics.layer_diagnostics`)
      dense_params, sparse_tables, retrieval_flops
                            its cost model, static, from a config (`ultramem.accounting`)
      build_store(cfg)      the model-owned shared tables, if the kind has any
    Shared here: `pop_aux_loss` (the auxiliary loss the last forward with gradients recorded in
    `_aux_loss`; the model adds it to the training loss) and `_flat` (the input check).
    """

    # True where `retrieve` pre-selects rows and columns of a Tucker key grid before exact scoring
    # and exposes `grid_scores`, `cells_of_rows`, `keys` and `_queries`, so that
    # `ultramem.diagnostics.preselect_recall` can hold it against brute force (UltraMemV2).
    preselects: ClassVar[bool] = False

    def __init__(self, cfg: Any, d_model: int, *, slot: int = 0, n_slots: int = 1):
        super().__init__()
        self.cfg, self.d_model, self.slot, self.n_slots = cfg, d_model, slot, n_slots
        self._aux_loss: Tensor | None = None
        self.init_stats: dict[str, float] = {}

    def _flat(self, u: Tensor) -> Tensor:
        """u [..., d_model] -> [T, d_model]; a wrong width raises an error naming the layer."""
        if u.shape[-1] != self.d_model:
            raise ValueError(
                f"{type(self).__name__}: input last dim {u.shape[-1]} != d_model={self.d_model}"
            )
        return u.reshape(-1, self.d_model)

    def forward(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def retrieve(self, u: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no retrieval")

    @property
    def n_rows(self) -> int:
        return self.cfg.n_values

    def value_parameters(self) -> list[nn.Parameter]:
        """The sparse tables (their own lr group; sparse updates allowed): none by default."""
        return []

    def pop_aux_loss(self) -> Tensor | None:
        """The auxiliary loss of the last forward run with gradients enabled (None if off); read
        once. The model sums these over its layers."""
        loss, self._aux_loss = self._aux_loss, None
        return loss

    def reset_buffers(self) -> None:
        """Recompute the derived buffers (none by default): after `to_empty`, before init."""

    def init_weights(self, target_var: float, n_layers: int, generator: torch.Generator, *,
                     init_tables: bool = True) -> dict[str, float]:
        """Initialise every parameter (REFERENCE.md section 4) and return the init statistics,
        also kept as `init_stats`. target_var: the FFN output variance at init the layer's
        output should match; n_layers: the model's depth; init_tables=False leaves tables shared
        with an earlier layer alone."""
        raise NotImplementedError

    @torch.no_grad()
    def diagnostics(self, u: Tensor) -> dict[str, Any]:
        """Row usage (`ultramem.diagnostics.usage_stats`) and the mean/std of the selected scores
        on inputs u [..., h]."""
        scores, rows = self.retrieve(u)
        if scores.dim() == 3:  # per-core scores: rank by their sum
            scores = scores.sum(-1)
        stats = usage_stats(row_counts(rows, self.n_rows))
        stats.update(kind=self.cfg.kind, score_mean=float(scores.mean()),
                     score_std=float(scores.std()))
        return stats

    # -- cost model: static, from a config alone (`ultramem.accounting`) ----------------------

    @staticmethod
    def dense_params(cfg: Any, d_model: int) -> int:
        """Parameters of one layer outside its sparse tables (all read at every step)."""
        raise NotImplementedError

    @staticmethod
    def sparse_tables(cfg: Any, d_model: int, n_layers: int) -> list[Table]:
        """The sparse tables of `n_layers` such layers (a shared table counted once)."""
        raise NotImplementedError

    @staticmethod
    def retrieval_flops(cfg: Any) -> int:
        """Per-token forward FLOPs of one layer's selection beyond its weights' matmuls."""
        return 0

    @staticmethod
    def build_store(cfg: ModelConfig) -> nn.Module | None:
        """Tables shared by all layers of `LM(cfg)`, owned by the model; None: layers own theirs."""
        return None
