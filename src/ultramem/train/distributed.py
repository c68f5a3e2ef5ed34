"""torch.distributed for the trainer: process group setup, DDP / FSDP2 wrapping, table gradients.

Launched by `torchrun` (WORLD_SIZE > 1 in the environment), or a single process otherwise, in
which case every helper here is a no-op. Backend: nccl on CUDA, gloo on CPU.

- Dense weights: `DistributedDataParallel`, or FSDP2 `fully_shard` per block and at the root
  (`parallel=fsdp`).
- Checkpoints hold full tensors: FSDP shards (weights and AdamW state) are gathered for rank 0
  to write, and every rank reads the full state back on resume.
- Value and pre-value tables are kept out of DDP / FSDP (ignored parameters). By default they
  are replicated, and their gradients are reduced here after backward: sparse gradients by
  all-gathering each rank's touched rows (indices and values, padded to the largest count) and
  summing, so the traffic is rows read, not table size; dense ones by all-reduce. With
  `shard_tables` each rank holds a column slice instead (`train.sharded_tables`), and the
  checkpoint gathers the slices (and the lazy-Adam moments) back into whole tables.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ultramem.train.optim import table_parameters


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sharded: bool = False  # value tables split by columns (set by `wrap`)

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, requested: torch.device) -> torch.device:
        if requested.type == "cuda" and self.active:
            return torch.device("cuda", self.local_rank)
        return requested

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: Tensor) -> Tensor:
        """Mean of a scalar tensor over ranks (on CPU; gloo or nccl handles the move)."""
        if not self.active:
            return value
        t = value.detach().clone().double()
        if dist.get_backend() == "nccl":
            t = t.cuda(self.local_rank)
        dist.all_reduce(t)
        return (t / self.world).cpu()

    def no_sync(self, model: nn.Module, skip: bool):
        """DDP's no_sync during the first grad_accum - 1 micro-batches."""
        if skip and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    @property
    def table_sq_reduce(self):
        """Sums a squared table-gradient norm over ranks when each holds a column shard."""
        if not self.sharded:
            return None

        def reduce(sq: Tensor) -> Tensor:
            sq = sq.detach().clone().float()
            dist.all_reduce(sq)
            return sq

        return reduce

    def reduce_table_grads(self, model: nn.Module) -> None:
        """Average the value-table gradients over ranks (they are outside DDP / FSDP).

        Column shards already hold every rank's contribution (through the collectives of the
        read): they only need DDP's 1 / W. Replicated tables are summed across ranks."""
        if not self.active:
            return
        for p in table_parameters(model).values():
            if p.grad is None:
                continue
            if self.sharded:
                p.grad = p.grad / self.world
            elif p.grad.is_sparse:
                p.grad = _all_gather_sparse(p.grad.coalesce(), self.world) / self.world
            else:
                dist.all_reduce(p.grad)
                p.grad /= self.world


def _all_gather_sparse(grad: Tensor, world: int) -> Tensor:
    """Sum of a row-sparse COO gradient over ranks, moving only touched rows."""
    idx, val = grad.indices()[0], grad.values()  # [U], [U, D]
    count = torch.tensor([idx.numel()], device=idx.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = int(max(int(c) for c in counts))
    pad_idx = torch.zeros(most, dtype=idx.dtype, device=idx.device)
    pad_idx[: idx.numel()] = idx
    pad_val = torch.zeros(most, *val.shape[1:], dtype=val.dtype, device=val.device)
    pad_val[: idx.numel()] = val
    all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
    all_val = [torch.empty_like(pad_val) for _ in range(world)]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_val, pad_val)
    rows = torch.cat([i[: int(c)] for i, c in zip(all_idx, counts, strict=True)])
    vals = torch.cat([v[: int(c)] for v, c in zip(all_val, counts, strict=True)])
    return torch.sparse_coo_tensor(rows.unsqueeze(0), vals, grad.shape).coalesce()


def setup() -> DistContext:
    """Join the torchrun process group if WORLD_SIZE > 1 (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def wrap(model: nn.Module, ctx: DistContext, cfg) -> nn.Module:
    """The module the training step calls: model itself, DDP, or FSDP2-sharded model."""
    if not ctx.active:
        return model
    if cfg.shard_tables:
        from ultramem.train.sharded_tables import shard_model_tables

        shard_model_tables(model, ctx.rank, ctx.world)
        ctx.sharded = True
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        ignored = set(table_parameters(model).values())
        for block in model.blocks:
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = list(table_parameters(model))
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
    return DDP(model, device_ids=device_ids)


_COLUMN_STATE = ("exp_avg", "exp_avg_sq")  # RowSparseAdam state laid out like the table


def _table_opt_state(opt, ctx: DistContext, gather: bool, state: dict | None = None) -> dict:
    """The table optimizer's state_dict with column shards gathered (or, loading, re-sliced)."""
    from ultramem.train.sharded_tables import gather_columns, shard_columns

    if gather:
        sd = opt.state_dict()  # its per-parameter dicts are the live state: copy, then gather
        sd["state"] = {idx: {k: (gather_columns(v) if k in _COLUMN_STATE else v)
                             for k, v in entry.items()} for idx, entry in sd["state"].items()}
        return sd
    sd = {"state": {}, "param_groups": state["param_groups"]}
    for idx, entry in state["state"].items():
        sd["state"][idx] = {k: (shard_columns(v, ctx.rank, ctx.world) if k in _COLUMN_STATE
                                else v) for k, v in entry.items()}
    opt.load_state_dict(sd)
    return sd


def optimizer_state(opts: dict, model: nn.Module, ctx: DistContext) -> dict:
    """Full optimizer state dicts for a checkpoint; call on all ranks (FSDP and column shards
    are gathered)."""
    out = {}
    for name, opt in opts.items():
        if name == "main" and ctx.active and _is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            out[name] = get_optimizer_state_dict(
                model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif name == "values" and ctx.sharded:
            out[name] = _table_opt_state(opt, ctx, gather=True)
        else:
            out[name] = opt.state_dict()
    return out


def load_optimizer_state(opts: dict, model: nn.Module, ctx: DistContext, state: dict) -> None:
    """Inverse of `optimizer_state`: every rank loads the full state and keeps its part."""
    for name, opt in opts.items():
        if name == "main" and ctx.active and _is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(model, opt, optim_state_dict=state[name],
                                     options=StateDictOptions(full_state_dict=True))
        elif name == "values" and ctx.sharded:
            _table_opt_state(opt, ctx, gather=False, state=state[name])
        else:
            opt.load_state_dict(state[name])


def _unshard_name(name: str) -> str:
    return name.replace(".table_source.", ".")


def full_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """A module whose state_dict holds full tensors (gathers FSDP shards); call on all ranks."""
    if not ctx.active or not (_is_fsdp(model) or ctx.sharded):
        return model
    from torch.distributed.tensor import DTensor

    from ultramem.train.sharded_tables import gather_columns, is_shard_name

    full = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if is_shard_name(k):
            k, v = _unshard_name(k), gather_columns(v)
        full[k] = v
    return _StateOnly(full)


def full_grads(model: nn.Module, ctx: DistContext) -> dict[str, Tensor]:
    """Every parameter's gradient as a full dense tensor under its unsharded name (tests)."""
    from torch.distributed.tensor import DTensor

    from ultramem.train.sharded_tables import gather_columns, is_shard_name

    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        g = (g.to_dense() if g.is_sparse else g).detach().clone()
        if ctx.sharded and is_shard_name(name):
            name, g = _unshard_name(name), gather_columns(g)
        out[name] = g
    return out


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class _StateOnly(nn.Module):
    """Holds a plain state_dict for `safetensors.torch.save_model`."""

    def __init__(self, state: dict[str, Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # noqa: D102
        return dict(self._state)
