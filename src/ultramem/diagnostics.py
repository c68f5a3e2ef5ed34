"""Memory diagnostics, computed outside `forward` (forward never logs or syncs).

Given a sparse layer and a batch of its inputs, re-run only its selection and report how the
memory is used: the fraction of value rows read at least once, the KL divergence of row usage to
uniform, the Gini coefficient of usage, the mean/std of the selected scores, the Tucker cores'
singular values (UltraMem v1/v2); for an MoE, the load of each expert.
For UltraMemV2 layers also the pre-selection recall against brute force and the share of the
exact top-m in the (-, -) quadrant (`preselect_recall`).
This module holds the statistics; what a kind reports is its layer's `diagnostics(u)` hook
(`ultramem.layers.common.SparseLayer`), which `layer_diagnostics` calls.
`model_diagnostics(model, idx)` captures every sparse layer's input with hooks and reports each
one (`ultramem diagnose` prints it); the trainer logs `retrieval_recall` at eval steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------- usage statistics


def row_counts(rows: Tensor, n_rows: int) -> Tensor:
    """How often each of n_rows rows was selected, [n_rows] (float)."""
    return torch.bincount(rows.reshape(-1), minlength=n_rows).float()


def kl_to_uniform(counts: Tensor) -> float:
    """KL(usage || uniform) in nats: 0 when every row is read equally, log N for a single row."""
    p = counts.double() / counts.sum()
    nz = p[p > 0]
    return float((nz * (nz * counts.numel()).log()).sum())


def gini(counts: Tensor) -> float:
    """Gini coefficient of usage: 0 for equal use, (N - 1) / N when one row takes everything."""
    x = counts.double().sort().values
    n = x.numel()
    index = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * index - n - 1) * x).sum() / (n * x.sum()))


def usage_stats(counts: Tensor) -> dict[str, float]:
    """fraction_used, kl_uniform and gini of a row-count vector."""
    return {
        "fraction_used": float((counts > 0).double().mean()),
        "kl_uniform": kl_to_uniform(counts),
        "gini": gini(counts),
        "kl_uniform_max": math.log(counts.numel()),
    }


# ----------------------------------------------------------------------------- per layer


@torch.no_grad()
def expert_load(layer: nn.Module, u: Tensor) -> Tensor:
    """Fraction of the top-k assignments each expert of an MoE layer receives, [E]."""
    _, _, experts = layer.route(u)
    counts = row_counts(experts, layer.cfg.n_experts)
    return counts / counts.sum()


@torch.no_grad()
def preselect_recall(layer: nn.Module, u: Tensor, max_tokens: int = 128) -> dict[str, float]:
    """How much of the exact top-m an UltraMemV2 layer's retrieval finds, on up to max_tokens
    tokens of u [..., h]: `preselect_recall` (share of the exact top-m cells, by brute force over
    all n^2 grid scores, that `retrieve` returns) and `neg_quadrant_share` (share of the exact
    top-m cells whose rank-1 row and column factors u^T S_row, v^T S_col are both negative: the
    quadrant rank-1 pre-selection never looks at, REFERENCE.md section 10)."""
    x = u.reshape(-1, layer.d_model)[:max_tokens]
    m, n = layer.cfg.top_m, layer.cfg.n_keys
    _, rows = layer.retrieve(x)
    cells = layer.cells_of_rows(rows)  # [T, m]
    s_row, s_col = layer.keys.row_col_scores(layer._queries(x))  # [T, r, n] each
    exact = layer.keys.grid_scores(s_row, s_col).flatten(1).topk(m, dim=-1).indices  # [T, m]
    found = (exact.unsqueeze(2) == cells.unsqueeze(1)).any(2)  # [T, m]
    u_dir, v_dir = layer.keys.directions()
    a, b = torch.matmul(u_dir, s_row), torch.matmul(v_dir, s_col)  # [T, n]
    neg = (a.gather(1, exact // n) < 0) & (b.gather(1, exact % n) < 0)
    return {"preselect_recall": float(found.double().mean()),
            "neg_quadrant_share": float(neg.double().mean())}


@torch.no_grad()
def layer_diagnostics(layer: nn.Module, u: Tensor) -> dict[str, Any]:
    """Usage and score statistics of one sparse layer on inputs u [..., h]: its `diagnostics`."""
    return layer.diagnostics(u)


@torch.no_grad()
def model_diagnostics(model: nn.Module, idx: Tensor) -> list[dict[str, Any]]:
    """`layer_diagnostics` for every sparse layer of an `ultramem.LM` on the batch idx [B, T],
    with its `output_shares` entry as `out_over_ffn`."""
    inputs = layer_inputs(model, idx)
    shares = output_shares(model, idx)
    return [{**layer_diagnostics(layer, inputs[i]), "out_over_ffn": shares[i]}
            for i, layer in enumerate(model.memory_layers())]


@torch.no_grad()
def output_shares(model: nn.Module, idx: Tensor) -> list[float | None]:
    """For each sparse layer of an `ultramem.LM` (block order), the RMS of its output over the
    RMS of the FFN output of the same block, in an eval forward of idx [B, T]; None where the
    block has no FFN (the layer replaces it). A layer whose share is near 0 adds nothing to the
    residual: a dead memory layer."""
    blocks = [b for b in model.blocks if b.memory is not None]
    rms: dict[tuple[int, str], float] = {}

    def keep(i: int, part: str):
        def hook(mod, args, out):
            rms[(i, part)] = float(out.detach().float().pow(2).mean().sqrt())
        return hook

    hooks = [b.memory.register_forward_hook(keep(i, "memory")) for i, b in enumerate(blocks)]
    hooks += [b.ffn.register_forward_hook(keep(i, "ffn")) for i, b in enumerate(blocks)
              if b.ffn is not None]
    _hooked_eval_forward(model, idx, hooks)
    return [rms[(i, "memory")] / max(rms[(i, "ffn")], 1e-30) if (i, "ffn") in rms else None
            for i in range(len(blocks))]


# A sparse layer whose output RMS is below this share of its FFN's is silent: collapsed toward 0,
# dying or dead (the corpus study's dead layers read ~1e-7, its live ones 0.3-0.5).
SILENT_SHARE = 1e-3


@torch.no_grad()
def output_share_summary(model: nn.Module, idx: Tensor) -> dict[str, float]:
    """mem/out_over_ffn_min, mem/out_over_ffn_mean and mem/silent_layers (how many read below
    `SILENT_SHARE`) over the sparse layers beside an FFN (`output_shares`; the trainer logs them
    at eval steps); empty when there are none."""
    shares = [s for s in output_shares(model, idx) if s is not None]
    if not shares:
        return {}
    return {"mem/out_over_ffn_min": min(shares), "mem/out_over_ffn_mean": sum(shares) / len(shares),
            "mem/silent_layers": sum(s < SILENT_SHARE for s in shares)}


@torch.no_grad()
def adam_grad_over_eps(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[float | None]:
    """For each sparse layer of `model` (block order), the median over its dense weights (not
    its value tables) of Adam's gradient RMS estimate sqrt(v / (1 - beta2^t)) over the group's
    eps; None where the optimizer holds no state for them yet or eps is 0.

    Adam's step is m_hat / (sqrt(v_hat) + eps): at a ratio near 1 or below, eps and not the
    gradient sets the step size, so steps shrink with the gradient. A layer whose output has
    collapsed toward 0 through a product of many small factors (UltraMemV2's score and value
    path) then has gradients far below eps and stays collapsed while weight decay shrinks it
    further: a dead layer. (Wortsman et al. 2023, arXiv 2309.14322, describe the same vanishing
    update in large models and lower eps to 1e-15.)"""
    where = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out: list[float | None] = []
    for layer in model.memory_layers():
        tables = {id(t) for t in layer.value_parameters()}
        parts = []
        eps = 0.0
        for p in layer.parameters():
            group, state = where.get(id(p)), optimizer.state.get(p)
            if id(p) in tables or group is None or not state or "exp_avg_sq" not in state:
                continue
            eps = group["eps"]
            bias = 1 - group["betas"][1] ** float(state["step"])
            parts.append((state["exp_avg_sq"].detach().float().flatten() / bias).sqrt())
        out.append(float(torch.cat(parts).median()) / eps if parts and eps > 0 else None)
    return out


def adam_eps_summary(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """mem/grad_over_eps_min: the smallest `adam_grad_over_eps` over the sparse layers (the
    trainer logs it at logged steps; below 1: a layer's updates are damped by eps); empty when
    no layer has one."""
    ratios = [r for r in adam_grad_over_eps(model, optimizer) if r is not None]
    return {"mem/grad_over_eps_min": min(ratios)} if ratios else {}


@torch.no_grad()
def recall_by_layer(model: nn.Module, idx: Tensor, max_tokens: int = 128) -> list[dict[str, float]]:
    """`preselect_recall` of each UltraMemV2 layer (each layer that `preselects`) of `model` on
    the batch idx, in order (empty for a model without them)."""
    layers = model.memory_layers()
    if not any(layer.preselects for layer in layers):
        return []
    inputs = layer_inputs(model, idx)
    return [preselect_recall(layer, inputs[i], max_tokens) for i, layer in enumerate(layers)
            if layer.preselects]


@torch.no_grad()
def retrieval_recall(model: nn.Module, idx: Tensor, max_tokens: int = 128) -> dict[str, float]:
    """`preselect_recall` averaged over the UltraMemV2 layers of `model` on the batch idx, as
    `mem/preselect_recall` and `mem/neg_quadrant_share` (the trainer logs them at eval steps);
    empty for a model without UltraMemV2 layers."""
    stats = recall_by_layer(model, idx, max_tokens)
    if not stats:
        return {}
    return {f"mem/{key}": sum(s[key] for s in stats) / len(stats) for key in stats[0]}


@torch.no_grad()
def layer_inputs(model: nn.Module, idx: Tensor) -> dict[int, Tensor]:
    """The input of each sparse layer (by position in `model.memory_layers()`) in an eval
    forward of idx [B, T]."""
    layers = model.memory_layers()
    inputs: dict[int, Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(layers)]
    _hooked_eval_forward(model, idx, hooks)
    return inputs


def _hooked_eval_forward(model: nn.Module, idx: Tensor, hooks: list) -> None:
    """One eval-mode forward of idx that the given hooks watch; then the hooks are removed and
    the model's mode restored, whatever happens."""
    was_training = model.training
    try:
        model.eval()
        model(idx)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
