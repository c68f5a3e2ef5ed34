"""Row-sparse updates for value tables: a lazy Adam and a row-wise Adagrad.

With `memory.sparse_grad=True` a table's gradient is a sparse COO tensor holding only the rows
the step read (a few thousand of millions). Dense AdamW would still touch every row each step
(moments decay, weight decay), so step time and memory traffic would grow with table size. These
optimizers touch only the rows present in the gradient. What that changes, honestly:

- `RowSparseAdam` (lazy Adam): a row's moments decay and its bias correction advances only on
  steps that read it (a per-row step count), i.e. each row runs Adam over the steps that touched
  it, as if untouched steps did not exist. Dense Adam would keep shrinking an idle row's
  momentum and keep moving it by that momentum; here an idle row stays where it is. Weight decay
  (decoupled) likewise applies only to touched rows.
- `RowAdagrad`: one accumulated squared-gradient scalar per row (the mean over the row's
  columns), the update g / (sqrt(G_row) + eps); state is one float per row instead of two per
  entry. Its effective learning rate only decays, so it wants a larger lr than Adam.

Both also accept dense gradients (then they update every row the same way), so a table can be
moved between paths without changing the optimizer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rows_and_values(grad: Tensor) -> tuple[Tensor | None, Tensor]:
    """(row indices or None for all rows, gradient rows)."""
    if grad.is_sparse:
        g = grad.coalesce()
        if g.sparse_dim() != 1:  # element-sparse: regroup by rows
            g = g.to_dense().to_sparse(sparse_dim=1)
        return g.indices()[0], g.values()
    return None, grad


def lazy_adam_rows_reference(p: Tensor, m: Tensor, v: Tensor, n: Tensor, rows: Tensor, g: Tensor,
                             lr: float, b1: float, b2: float, eps: float, wd: float) -> None:
    """One lazy Adam(W) step on p's `rows` (sorted, distinct) with their gradient g, in place:
    the readable form of `RowSparseAdam`'s update (tests hold the fast one to it)."""
    n_r = n[rows] + 1  # [U] each row's own step count
    n[rows] = n_r
    m_r = m[rows].mul_(b1).add_(g, alpha=1 - b1)  # [U, D]
    v_r = v[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
    m[rows], v[rows] = m_r, v_r
    shape = (-1,) + (1,) * (p.dim() - 1)
    corr1 = (1 - b1 ** n_r.to(p.dtype)).view(shape)
    corr2 = (1 - b2 ** n_r.to(p.dtype)).view(shape)
    update = (m_r / corr1) / ((v_r / corr2).sqrt_().add_(eps))
    p_r = p[rows]
    if wd:
        p_r.mul_(1 - lr * wd)
    p[rows] = p_r.sub_(update, alpha=lr)


class Workspace:
    """Scratch [U, ...] buffers reused from step to step. A fresh tensor the size of a step's rows
    (tens of MB for a large table) comes from a new mmap every time under glibc and costs its page
    faults, which made the out-of-place form above 5-10x slower than the arithmetic on CPU."""

    def __init__(self) -> None:
        self.flat: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def get(self, slot: int, like: Tensor, rows: int) -> Tensor:
        shape = (rows, *like.shape[1:])
        numel = math.prod(shape)
        key = (slot, like.dtype, like.device)
        buf = self.flat.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(int(numel * 1.25) + 1, dtype=like.dtype, device=like.device)
            self.flat[key] = buf
        return buf[:numel].view(shape)


def lazy_adam_rows(p: Tensor, m: Tensor, v: Tensor, n: Tensor, rows: Tensor, g: Tensor,
                   lr: float, b1: float, b2: float, eps: float, wd: float,
                   ws: Workspace) -> None:
    """`lazy_adam_rows_reference` with gathers into reused buffers and in-place arithmetic:
    update = m_r / (corr1 * (sqrt(v_r) / sqrt(corr2) + eps)), the same quantity."""
    u = rows.numel()
    n_r = n.index_select(0, rows).add_(1)
    n.index_copy_(0, rows, n_r)
    m_r = torch.index_select(m, 0, rows, out=ws.get(0, m, u)).mul_(b1).add_(g, alpha=1 - b1)
    v_r = torch.index_select(v, 0, rows, out=ws.get(1, v, u)).mul_(b2)
    v_r.addcmul_(g, g, value=1 - b2)
    m.index_copy_(0, rows, m_r)
    v.index_copy_(0, rows, v_r)
    shape = (-1,) + (1,) * (p.dim() - 1)
    steps = n_r.to(p.dtype)
    corr1 = (1 - b1 ** steps).view(shape)
    sqrt_corr2 = (1 - b2 ** steps).sqrt_().view(shape)
    denom = v_r.sqrt_().div_(sqrt_corr2).add_(eps).mul_(corr1)  # v_r is written back: reuse it
    p_r = torch.index_select(p, 0, rows, out=ws.get(2, p, u))
    if wd:
        p_r.mul_(1 - lr * wd)
    p.index_copy_(0, rows, p_r.addcdiv_(m_r, denom, value=-lr))


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam(W) over rows: only rows present in a sparse gradient are updated."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._workspace = Workspace()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["row_steps"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                rows, g = _rows_and_values(p.grad)
                if rows is None:
                    rows = torch.arange(p.shape[0], device=p.device)
                lazy_adam_rows(p, state["exp_avg"], state["exp_avg_sq"], state["row_steps"], rows,
                               g.to(p.dtype), lr, b1, b2, eps, wd, self._workspace)
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # the base class casts state to the parameter's dtype
            if "row_steps" in state:
                state["row_steps"] = state["row_steps"].to(torch.int64)


class RowAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad: G_row += mean(g_row^2); row -= lr * g_row / (sqrt(G_row) + eps)."""

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        self._workspace = Workspace()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["row_sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                rows, g = _rows_and_values(p.grad)
                if rows is None:
                    rows = torch.arange(p.shape[0], device=p.device)
                g = g.to(p.dtype)
                acc = state["row_sum"]
                acc_r = acc[rows] + g.pow(2).flatten(1).mean(1)  # [U]
                acc[rows] = acc_r
                shape = (-1,) + (1,) * (p.dim() - 1)
                # p_r -= lr * g / (sqrt(G_row) + eps), gathered into a reused buffer (Workspace)
                p_r = torch.index_select(p, 0, rows, out=self._workspace.get(0, p, rows.numel()))
                if wd:
                    p_r.mul_(1 - lr * wd)
                p.index_copy_(0, rows, p_r.addcdiv_(g, acc_r.sqrt().add_(eps).view(shape),
                                                    value=-lr))
        return None


def grad_norm(params: list[Tensor], sq_reduce=None) -> Tensor:
    """Global L2 norm of the gradients of params, sparse ones coalesced in place first.
    sq_reduce sums the squared norm across ranks when params are shards."""
    sq = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            sq.append(p.grad.values().float().pow(2).sum())
        else:
            sq.append(p.grad.float().pow(2).sum())
    total = torch.stack(sq).sum() if sq else torch.zeros(())
    if sq_reduce is not None:
        total = sq_reduce(total)
    return total.sqrt()


def clip_grads(params: list[Tensor], max_norm: float, sq_reduce=None) -> float:
    """Clip dense or sparse gradients to max_norm by global norm (0 = no clip); returns the norm."""
    norm = grad_norm(params, sq_reduce)
    total = float(norm)
    if max_norm > 0 and total > max_norm and torch.isfinite(norm):
        scale = max_norm / (total + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return total
