"""Value tables sharded by columns across ranks (torchrun), plugged in as a layer's table source.

Each rank holds every row of its slice of the columns: values [N, Dv / W], pre-values
[N, Dp / W]. One memory read, for the T tokens of each of the W ranks:

  R, S, X  = all_gather(rows [T, m]), all_gather(scores [T, m, c]), all_gather(W_pre x [T, Dp])
  a        = all_reduce_sum(<pre_values_shard[R], X[:, my Dp slice]>)       # [W T, m]
  y_local  = sum_s a_s * S_k(s) * values_shard[R]  (k = core of my columns)  # [W T, Dv / W]
  y        = all_to_all(y_local): my tokens' slices from every rank, concatenated  # [T, Dv]

Gradients flow back through the same collectives (custom autograd functions below), so a rank's
table shard receives the contributions of every rank's tokens; dividing by W gives DDP's mean.
Memory per rank: 1 / W of the tables and of their optimizer state. Traffic per read: the rows,
scores and pre-projections of all tokens, and [T, Dv] of outputs, independent of table size.

Limits: UltraMemV2 layers that own their tables (share_group = 1); Dv and Dp divisible by W; W a
multiple or a divisor of n_cores; equal token counts on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ultramem.ops import gather_dot, weighted_lookup


def _gather(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's x along dim 0; backward: sum the gradients, keep my rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.n = x.shape[0]
        return _gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        r = dist.get_rank()
        return grad[r * ctx.n : (r + 1) * ctx.n]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _AllToAll(torch.autograd.Function):
    """x [W * T, D] -> [W * T, D]: block q of the output is rank q's block r (r = my rank)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _all_to_all(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad)


def _all_to_all(x: Tensor) -> Tensor:
    w = dist.get_world_size()
    send = [c.contiguous() for c in x.chunk(w, dim=0)]
    recv = [torch.empty_like(c) for c in send]
    dist.all_to_all(recv, send)
    return torch.cat(recv, dim=0)


class ColumnShardedTables(nn.Module):
    """This rank's column slice of one layer's values and pre-values (a layer `table_source`)."""

    def __init__(self, values: Tensor, pre_values: Tensor | None, n_cores: int, *,
                 sparse_grad: bool, rank: int, world: int):
        super().__init__()
        dv, dp = values.shape[1], (0 if pre_values is None else pre_values.shape[1])
        if dv % world or dp % world:
            raise ValueError(f"column sharding: value_dim={dv} and pre_value_dim={dp} must be "
                             f"divisible by the world size {world}")
        if world % n_cores and n_cores % world:
            raise ValueError(f"column sharding: world size {world} must be a multiple or a "
                             f"divisor of n_cores={n_cores}")
        self.rank, self.world, self.n_cores, self.sparse_grad = rank, world, n_cores, sparse_grad
        self.full_dims = (dv, dp)
        self.values = nn.Parameter(values.detach()[:, self._cols(dv)].clone())
        self.pre_values = (nn.Parameter(pre_values.detach()[:, self._cols(dp)].clone())
                           if pre_values is not None else None)  # None: plain values

    def _cols(self, d: int) -> slice:
        w = d // self.world
        return slice(self.rank * w, (self.rank + 1) * w)

    def _core_weights(self, a: Tensor | None, scores: Tensor) -> Tensor:
        """Weights of the cores whose Dv slices this rank's columns belong to (a None: a = 1)."""
        c, w, r = self.n_cores, self.world, self.rank
        if w >= c:
            g = scores[..., r // (w // c)]  # [WT, m]
            return g if a is None else a * g
        per = c // w
        g = scores[..., r * per : (r + 1) * per]  # [WT, m, c / W]
        return g if a is None else a.unsqueeze(-1) * g

    def read(self, rows: Tensor, scores: Tensor, xp: Tensor | None) -> Tensor:
        """rows [T, m], scores [T, m, c], xp = W_pre x [T, Dp] -> y [T, Dv] (see module doc).
        xp None: plain values, a = 1."""
        t = rows.shape[0]
        all_rows = _gather(rows)  # [WT, m]
        all_scores = _AllGather.apply(scores)  # [WT, m, c]
        a = None  # plain values: the scores alone weight the rows
        if self.pre_values is not None:
            all_xp = _AllGather.apply(xp)[:, self._cols(self.full_dims[1])]  # [WT, Dp / W]
            a_part = gather_dot(self.pre_values, all_rows, all_xp, sparse_grad=self.sparse_grad)
            a = _AllReduceSum.apply(a_part)  # [WT, m]
        dtype = self.values.dtype if a is None else a.dtype
        weights = self._core_weights(a, all_scores.to(dtype))
        y_local = weighted_lookup(self.values, all_rows, weights,
                                  sparse_grad=self.sparse_grad)  # [WT, Dv / W]
        y_mine = _AllToAll.apply(y_local)  # [W * T, Dv / W]: rank q's slice of my tokens
        return torch.cat(y_mine.split(t, dim=0), dim=1)  # [T, Dv]

    @torch.no_grad()
    def full(self) -> tuple[Tensor, Tensor]:
        """The whole tables, gathered from every rank's columns (call on all ranks)."""
        pre = gather_columns(self.pre_values) if self.pre_values is not None else None
        return gather_columns(self.values), pre


def gather_columns(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=1)


def shard_columns(x: Tensor, rank: int, world: int) -> Tensor:
    w = x.shape[1] // world
    return x[:, rank * w : (rank + 1) * w].clone()


def shard_model_tables(model: nn.Module, rank: int, world: int) -> list[ColumnShardedTables]:
    """Replace every UltraMemV2 layer's tables by its column shard; returns the shards."""
    from ultramem.layers.ultramem_v2 import UltraMemV2Layer

    shards = []
    for layer in model.memory_layers():
        if not isinstance(layer, UltraMemV2Layer) or layer.store is not None:
            raise ValueError("column sharding supports UltraMemV2 layers that own their tables "
                             "(memory.kind=ultramem_v2, share_group=1)")
        source = ColumnShardedTables(layer.values, layer.pre_values, layer.cfg.n_cores,
                                     sparse_grad=layer.cfg.sparse_grad, rank=rank, world=world)
        del layer.values, layer.pre_values
        layer.table_source = source  # registers as a submodule: its shards are parameters
        shards.append(source)
    return shards


def is_shard_name(name: str) -> bool:
    return ".table_source." in name
