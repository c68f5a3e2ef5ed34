"""Every initialization formula of REFERENCE.md section 4, in one place.

Modules own their init and call the formulas here: attention and FFN (`ultramem.model`,
`ultramem.layers.ffn`) and each sparse layer through its `init_weights` hook
(`ultramem.layers.common.SparseLayer`), which applies the procedures below (`init_tucker_keys`,
`init_product_keys`, `balance_table`, ...). `init_lm` initialises a whole `ultramem.LM` in a fixed
order (`LM.init_weights`, after construction: build first, initialise after).

The point is balance: at init, on unit-variance input, a block's memory output variance equals its
FFN output variance. The chain, for a memory layer with top_m = m, Dv, Dp and value std sigma_V:

    W_pre x      : each coordinate has variance h * 2/(5h) = 0.4
    a_s          : Dp * sigma_V^2 * 0.4
    y (per dim)  : m * E[a^2] * E[G_k^2] * sigma_V^2
    out          : Dv * 2/(5h) * var(y) = 0.16 * sigma_V^4 * Dp * m * Dv * E[G_k^2] / h
                   (plain values, Dp = 0: a = 1, so 0.4 * sigma_V^2 * m * Dv * E[G_k^2] / h)

E[G_k^2] is the second moment of the per-core selected scores, measured by Monte Carlo through
the real retrieval after the query/key gains are set so the mean selected (summed) score is 1.
This is not the paper's factor: the paper writes E[G^2] = 1 + sigma_s^2, the second moment of the
summed score G = sum_k G_k. With c cores each Dv/c slice of a value is weighted by its own G_k,
so the per-slice variance needs E[G_k^2], about (1 + sigma_s^2) / c^2 (exactly that when the
cores contribute equally); the paper's factor would overstate the output variance by ~c^2. The
two agree for c = 1. Values and pre-values share sigma_V, hence the fourth power; the paper
prints sigma_V^2 but only sigma_V^4 makes the algebra close.

The FFN side: SwiGLU down(silu(g) * u) with g, u ~ N(0, 0.4). The paper takes the inner variance
as 0.16; it is 0.4 * E[silu(g)^2] ~ 0.049 (computed here by Gauss-Hermite quadrature), so the
paper's FFN variance is ~3.3x too high. We match the exact FFN variance instead and keep the
paper's figure only for the record (`paper_ffn_output_variance`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from ultramem.config import ModelConfig

# ----------------------------------------------------------------------------- formulas


def linear_std(d_model: int) -> float:
    """Std of every linear map: sqrt(2 / (5h))."""
    return math.sqrt(2.0 / (5.0 * d_model))


def ffn_output_std(d_model: int, n_layers: int) -> float:
    """The FFN's output map is further scaled by 1 / sqrt(2L)."""
    return linear_std(d_model) / math.sqrt(2.0 * n_layers)


def swiglu_inner_variance(pre_var: float = 0.4, n_nodes: int = 120) -> float:
    """Var(silu(g) * u) for independent g, u ~ N(0, pre_var): pre_var * E[silu(g)^2], exact."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)
    g = math.sqrt(pre_var) * nodes
    silu = g / (1.0 + np.exp(-g))
    return float(pre_var * (weights * silu**2).sum() / math.sqrt(2.0 * math.pi))


def swiglu_output_variance(d_model: int, ffn_hidden: int, n_layers: int) -> float:
    """Output variance of a SwiGLU FFN at init on unit-variance input (exact in expectation)."""
    return ffn_hidden * swiglu_inner_variance() * ffn_output_std(d_model, n_layers) ** 2


def paper_ffn_output_variance(d_model: int, ffn_hidden: int, n_layers: int) -> float:
    """The paper's sigma_ffn^2 = 0.064 k_inner / (2L), which assumes an inner variance of 0.16."""
    return 0.064 * (ffn_hidden / d_model) / (2.0 * n_layers)


def memory_output_variance(value_std: float, d_model: int, pre_value_dim: int, value_dim: int,
                           top_m: int, score_second_moment: float, n_heads: int = 1) -> float:
    """0.16 sigma_V^4 Dp m n_head Dv E[G_k^2] / h, with E[G_k^2] the per-core score second
    moment (module docstring; the paper's factor 1 + sigma_s^2 is for the summed score).

    pre_value_dim=0 (plain values, a_s = 1): 0.4 sigma_V^2 m n_head Dv E[G_k^2] / h.
    """
    a2 = 0.4 * pre_value_dim * value_std**2 if pre_value_dim else 1.0  # E[a_s^2]
    return 0.4 * value_std**2 * a2 * top_m * n_heads * value_dim * score_second_moment / d_model


def value_std_for(target_var: float, d_model: int, pre_value_dim: int, value_dim: int,
                  top_m: int, score_second_moment: float, n_heads: int = 1) -> float:
    """sigma_V such that `memory_output_variance` equals target_var: a fourth root with
    pre-values (both tables share sigma_V), a square root for plain values."""
    if not pre_value_dim:
        return (target_var * d_model / (0.4 * top_m * n_heads * value_dim
                                        * score_second_moment)) ** 0.5
    denom = 0.16 * pre_value_dim * top_m * n_heads * value_dim * score_second_moment
    return (target_var * d_model / denom) ** 0.25


# ----------------------------------------------------------------------------- procedures


@torch.no_grad()
def init_tucker_keys(keys: nn.Module, score_fn, n_samples: int, d_model: int,
                     generator: torch.Generator) -> dict:
    """Keys ~ N(0, 1); cores diagonal-dominant; then scale the query/key gains so the mean of the
    selected (summed) scores is 1, measured by Monte Carlo on unit-variance input.

    keys: a `TuckerProductKeys`; score_fn(x [T, h]) -> its selected per-core scores [T, m, c].
    Returns mean, sigma_s^2 (variance of summed selected scores) and E[G_k^2] (per-core).
    """
    keys.keys.normal_(generator=generator)
    r = keys.tucker_rank
    decay = torch.tensor([0.25**p for p in range(r)])
    base = torch.diag(decay) / keys.n_cores
    noise = 0.02 * torch.randn(keys.n_cores, r, r, generator=generator)
    keys.cores.copy_(base.unsqueeze(0) + noise)
    keys.query_gain.fill_(1.0)
    keys.key_gain.fill_(1.0)
    keys.direction_ref.zero_()  # a new model: the sign rule starts afresh (ultramem.retrieval)
    x = torch.randn(n_samples, d_model, generator=generator).to(keys.keys.device)
    scores = score_fn(x)  # [T, m, c]
    mean = scores.sum(-1).mean().item()
    if not mean > 0:
        raise RuntimeError(f"score calibration failed: mean selected score {mean}")
    # scores are bilinear in (query_gain * key_gain)^2, and top-m is scale-invariant.
    scale = mean ** -0.25
    keys.query_gain.mul_(scale)
    keys.key_gain.mul_(scale)
    scores = scores / mean
    total = scores.sum(-1)
    return {
        "score_mean": total.mean().item(),
        "sigma_s2": total.var().item(),
        "score_second_moment": scores.pow(2).mean().item(),
    }


# ----------------------------------------------------------------------------- baselines


def ultramem_v1_value_std(virtual_blocks: int, top_m: int, n_heads: int, n_layers: int) -> float:
    """UltraMem v1 values: N(0, E / (2 m H L)) (REFERENCE.md section 4)."""
    return math.sqrt(virtual_blocks / (2.0 * top_m * n_heads * n_layers))


@torch.no_grad()
def init_product_keys(pk: nn.Module, d_model: int, generator: torch.Generator) -> None:
    """Query map std sqrt(2/(5h)); sub-keys uniform on the unit sphere, so a unit-variance query
    half scores ~N(0, 1). Equal key norms matter: with Gaussian keys the longer ones win the
    top-k for most queries at init and fewer rows are read. Norms start at identity."""
    pk.query.weight.normal_(std=linear_std(d_model), generator=generator)
    pk.keys.normal_(generator=generator)
    pk.keys.div_(pk.keys.norm(dim=-1, keepdim=True))
    norm = getattr(pk, "norm", None)
    if norm is not None:
        norm.reset_parameters()
        if isinstance(norm, nn.BatchNorm1d):
            norm.reset_running_stats()
    for gain in (getattr(pk, "query_gain", None), pk.key_gain):
        if gain is not None:
            gain.fill_(1.0)


@torch.no_grad()
def calibrate_table(layer: nn.Module, table: Tensor, target_var: float, n_samples: int,
                    generator: torch.Generator) -> float:
    """Draw `table` ~ N(0, 1), then rescale it so the layer's output variance on unit-variance
    input equals target_var (the output is linear in the table). Returns the table's std."""
    table.normal_(generator=generator)
    x = torch.randn(n_samples, layer.d_model, generator=generator).to(table.device)
    was_training = layer.training
    layer.eval()  # BatchNorm query norms: use (identity) running statistics
    var = layer(x).float().var().item()
    layer.train(was_training)
    std = math.sqrt(target_var / var)
    table.mul_(std)
    return std


@torch.no_grad()
def balance_table(layer: nn.Module, table: Tensor, target_var: float, generator: torch.Generator,
                  *, init_tables: bool = True, n_samples: int = 1024) -> dict[str, float]:
    """PKM, PEER and Memory+: `calibrate_table` the layer's table to target_var (the same balance
    as section 4) unless init_tables is False (a shared table drawn by an earlier layer).
    Returns the init statistics."""
    stats = {"target_var": target_var}
    if init_tables:
        stats["value_std"] = calibrate_table(layer, table, target_var, n_samples, generator)
    return stats


@torch.no_grad()
def init_lm(model: nn.Module, seed: int = 0) -> None:
    """Initialise every weight and computed buffer of an `ultramem.LM` (REFERENCE.md section 4);
    `LM.init_weights` calls this. Each module sets its own parameters (`reset_parameters`,
    `init_weights`, `reset_buffers`); this function fixes their order (one generator, drawn in
    the order embeddings, output head, each block's attention and FFN, each sparse layer) and
    the sparse layers' balance target, the exact SwiGLU output variance."""
    cfg: ModelConfig = model.cfg
    gen = torch.Generator().manual_seed(seed)
    h, L = cfg.d_model, cfg.n_layers
    model.init_rope()
    for module in model.modules():  # computed buffers (shuffles), before any retrieval runs
        if module is not model and hasattr(module, "reset_buffers"):
            module.reset_buffers()
    model.embed.weight.normal_(std=linear_std(h), generator=gen)
    if model.head is not None:
        model.head.weight.normal_(std=linear_std(h), generator=gen)
    for block in model.blocks:
        block.init_weights(gen, L)
    model.norm.reset_parameters()
    ffn_var = swiglu_output_variance(h, cfg.ffn_hidden, L)
    paper_var = paper_ffn_output_variance(h, cfg.ffn_hidden, L)  # for the record
    for i, layer in enumerate(model.memory_layers()):
        # A shared store is initialised once, from the first layer's statistics.
        stats = layer.init_weights(ffn_var, L, gen, init_tables=model.value_store is None or i == 0)
        stats["paper_ffn_var"] = paper_var
