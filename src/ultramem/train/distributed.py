"""torch.distributed for the trainer: process group setup, DDP / FSDP2 wrapping, table gradients.

Launched by `torchrun` (WORLD_SIZE > 1 in the environment), or a single process otherwise, in
which case every helper here is a no-op. Backend: nccl on CUDA, gloo on CPU.

- Dense weights: `DistributedDataParallel`, or FSDP2 `fully_shard` per block and at the root
  (`parallel=fsdp`).
- Checkpoints, format `full`: FSDP shards (weights and AdamW state) are gathered for rank 0 to
  write, and every rank reads the full state back on resume (`full_model`, `optimizer_state`).
  Format `sharded` (torch.distributed.checkpoint): each rank saves its own shards under global
  names, FSDP's as DTensors, column-sharded tables as DTensor views (Shard(1)) of their local
  slice, and reads back the parts its layout needs, whatever the layout or world size that
  wrote them (`sharded_state`, `load_sharded_state`).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    _meshes: dict = field(default_factory=dict, repr=False)

    def mesh(self, device_type: str):
        """A 1-D device mesh over all ranks (DTensor views of column shards for checkpoints)."""
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import init_device_mesh

            self._meshes[device_type] = init_device_mesh(device_type, (self.world,))
        return self._meshes[device_type]

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


# -- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------


def _global_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in a checkpoint (column shards under the unsharded name)."""
    return {id(p): _unshard_name(n) for n, p in model.named_parameters()}


def _column_view(t: Tensor, ctx: DistContext) -> Tensor:
    """This rank's column slice t as a DTensor over the whole table: DCP writes it with its
    global offset, and fills it from whatever slices were saved."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(t, ctx.mesh(t.device.type), [Shard(1)], run_check=False)


def _is_column_shard(name: str, ctx: DistContext) -> bool:
    from ultramem.train.sharded_tables import is_shard_name

    return ctx.sharded and is_shard_name(name)


def _model_tensors(model: nn.Module, ctx: DistContext) -> dict[str, Tensor]:
    """{global name: tensor sharing storage with the model's}: plain, FSDP DTensor, or a
    DTensor view of a column shard. Loading into them loads the model in place."""
    from ultramem.train.checkpoint import unique_state

    out = {}
    for name, t in unique_state(model).items():
        if _is_column_shard(name, ctx):
            out[_unshard_name(name)] = _column_view(t, ctx)
        else:
            out[name] = t
    return out


def _column_params(model: nn.Module, ctx: DistContext) -> set[int]:
    return {id(p) for n, p in model.named_parameters() if _is_column_shard(n, ctx)}


def sharded_state(model: nn.Module, opts: dict, ctx: DistContext,
                  ) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """(what this rank saves with DCP, the optimizers' hyperparameters as JSON-able groups).

    State: {'model': {name: tensor}, 'optim': {opt: {name: {key: tensor}}}, 'rng': {'torch':
    [W, n] rows per rank}}. Optimizer state laid out like a column shard (Adam's moments) is a
    DTensor view too; what every rank holds alike (step counts, replicated tables) is plain."""
    names = _global_names(model)
    columns = _column_params(model, ctx)
    optim: dict[str, dict[str, dict[str, Tensor]]] = {}
    groups: dict[str, list[dict]] = {}
    for opt_name, opt in opts.items():
        entries = {}
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p)
                if not st:
                    continue
                entry = {}
                for key, v in st.items():
                    if not isinstance(v, Tensor):
                        raise TypeError(f"optimizer {opt_name}: state {key!r} of {names[id(p)]} "
                                        f"is a {type(v).__name__}, not a tensor")
                    is_col = id(p) in columns and v.shape == p.shape
                    entry[key] = _column_view(v, ctx) if is_col else v
                entries[names[id(p)]] = entry
        optim[opt_name] = entries
        groups[opt_name] = [{k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in g.items() if k != "params"} for g in opt.param_groups]
    rng = torch.get_rng_state().unsqueeze(0)  # [1, n]: this rank's row
    if ctx.active:  # on the model's device: a mesh of the process group's backend (nccl: cuda)
        from torch.distributed.tensor import DTensor, Shard

        device = next(model.parameters()).device
        rng = DTensor.from_local(rng.to(device), ctx.mesh(device.type), [Shard(0)],
                                 run_check=False)
    state = {"model": _model_tensors(model, ctx), "optim": optim, "rng": {"torch": rng}}
    return state, groups


def load_sharded_state(model: nn.Module, opts: dict, ctx: DistContext, ckpt: str | Path,
                       groups: dict[str, list[dict]]) -> None:
    """Inverse of `sharded_state` on any layout and world size: weights in place, optimizer
    state (through `load_state_dict`, so devices and dtypes follow the parameters), this
    rank's RNG (rank r takes row r; a rank the saving run did not have keeps its own).
    groups: the saved hyperparameters. Every rank calls it."""
    from torch.distributed.tensor import DTensor

    from ultramem.train.checkpoint import CheckpointError, load_shards, shard_metadata

    saved = shard_metadata(ckpt)
    names = _global_names(model)
    columns = _column_params(model, ctx)
    optim: dict[str, dict[str, dict[str, Tensor]]] = {}
    for opt_name, opt in opts.items():
        entries = {}
        for group in opt.param_groups:
            for p in group["params"]:
                prefix = f"optim.{opt_name}.{names[id(p)]}."
                keys = [k for k in saved if k.startswith(prefix) and "." not in k[len(prefix):]]
                entry = {}
                for key in keys:
                    shape, dtype = saved[key]
                    if shape == tuple(p.shape if id(p) not in columns else
                                      (p.shape[0], p.shape[1] * ctx.world)):
                        t = torch.zeros_like(p, dtype=dtype)  # a DTensor for an FSDP parameter
                        entry[key[len(prefix):]] = (_column_view(t, ctx) if id(p) in columns
                                                    else t)
                    else:  # the same on every rank (a step count, a replicated table's state)
                        entry[key[len(prefix):]] = torch.zeros(shape, dtype=dtype)
                if entry:
                    entries[names[id(p)]] = entry
        optim[opt_name] = entries
    rng_shape, rng_dtype = saved.get("rng.torch", ((0, 0), torch.uint8))
    state = {"model": _model_tensors(model, ctx), "optim": optim}
    if rng_shape[0]:
        state["rng"] = {"torch": torch.zeros(rng_shape, dtype=rng_dtype)}
    load_shards(ckpt, state)
    for opt_name, opt in opts.items():
        if len(groups.get(opt_name, ())) != len(opt.param_groups):
            raise CheckpointError(f"{ckpt}: optimizer {opt_name!r} has {len(opt.param_groups)} "
                                  f"parameter groups, the checkpoint "
                                  f"{len(groups.get(opt_name, ()))}")
        sd: dict[str, Any] = {"state": {}, "param_groups": []}
        first = 0  # a state_dict numbers the parameters across groups
        for saved_group, group in zip(groups[opt_name], opt.param_groups, strict=True):
            ids = list(range(first, first + len(group["params"])))
            first += len(ids)
            for idx, p in zip(ids, group["params"], strict=True):
                entry = optim[opt_name].get(names[id(p)])
                if entry:  # column views back to this rank's slice
                    sd["state"][idx] = {k: (v.to_local() if isinstance(v, DTensor)
                                            and id(p) in columns else v)
                                        for k, v in entry.items()}
            sd["param_groups"].append({**{k: (tuple(v) if k == "betas" else v)
                                          for k, v in saved_group.items()}, "params": ids})
        opt.load_state_dict(sd)
    if "rng" in state and ctx.rank < rng_shape[0]:
        torch.set_rng_state(state["rng"]["torch"][ctx.rank].clone())
