"""Serving: cast a trained `LM` for decoding and give UltraMemV2 layers a lean decode step.

`prepare_for_serving(model, "bf16")` casts the dense weights (attention, FFN, MoE experts,
embedding, value tables) to bfloat16 in place, prepacks the attention, FFN and head linears for
oneDNN (`PackedLinear`, where the CPU supports it) and installs `UltraMemV2Decode` on every
UltraMemV2 layer. What decides which rows are read stays float32: the query map, the keys,
their RMSNorm gains and the Tucker cores, so the retrieved rows are those of the float32 layer
for the same input (a bf16 query map changes the rows of 10-13% of tokens).
The pre-value and output maps, which only weight the rows, run as packed bf16 linears.
Norms compute in float32 (`RMSNorm`), RoPE tables stay float32 (`LM._apply`).
"int8" is "bf16" plus weight-only int8 (per output channel scales) for the attention and FFN
linears and the output head, through `torch.ops.aten._weight_int8pack_mm`. "fp32" casts nothing.

`decoding(model)` installs the decode steps for the duration of a `with` block without casting
(`LM.generate` uses it), and leaves steps that `prepare_for_serving` installed in place.

The decode step (used only without gradients, see `UltraMemV2Layer.forward`), per tokens x [T, h]:
  qp       = [W_q; W_pre] x                     one float32 GEMM -> queries and W_pre x
                                                (packed: W_q x float32, W_pre x packed bf16)
  S        = RMSNorm(q) . K_normed              one bmm against cached float32 normed keys
  top m    = TuckerProductKeys.select(S_row, S_col)   pre-selection, candidates, top m, as in
                                                training (one home for that math)
  y        = memory_read(values, pre_values, rows, scores, W_pre x)   (embedding_bag)
  out      = W_out y                            float32 (packed: bf16), in the input's dtype
The scores are `TuckerProductKeys.row_col_scores` with fewer ops (query gain folded into the
cached keys); tests hold the two equal. Cached tensors are rebuilt when a parameter they come
from changes (version counter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.layers.ultramem_v2 import UltraMemV2Layer
from ultramem.ops import memory_read
from ultramem.retrieval import rms_norm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}


class UltraMemV2Decode:
    """The inference forward of one `UltraMemV2Layer`: `step(u [..., h]) -> [..., h]`."""

    def __init__(self, layer: UltraMemV2Layer, *, installed_by: str = "serve",
                 packed: bool = False):
        self.layer = layer
        self.installed_by = installed_by
        self.packed = packed  # W_pre and W_out as bf16 `PackedLinear` (they do not pick rows)
        self._stamp: tuple | None = None

    def _sources(self) -> tuple[Tensor, ...]:
        layer = self.layer
        keys = layer.keys
        ps = [layer.query.weight, keys.keys, keys.key_gain, keys.query_gain, keys.cores,
              layer.out_proj.weight]
        if layer.pre_proj is not None:
            ps.append(layer.pre_proj.weight)
        return tuple(ps)

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the caches: [W_q; W_pre] (float32; W_q alone when packed, with W_pre and W_out
        packed bf16), normed keys * query gain, float32."""
        layer, cfg = self.layer, self.layer.cfg
        keys = layer.keys
        r, dk = cfg.tucker_rank, cfg.key_dim
        w = [layer.query.weight.float()]
        self.pre = self.out = None
        if self.packed:
            self.out = PackedLinear(layer.out_proj.weight)
            if layer.pre_proj is not None:
                self.pre = PackedLinear(layer.pre_proj.weight)
        elif layer.pre_proj is not None:
            w.append(layer.pre_proj.weight.float())
        self.w_in = torch.cat(w).contiguous()  # [n_query + Dp, h]
        self.n_query = layer.query.weight.shape[0]
        # <RMSNorm(q) * g_q, RMSNorm(k) * g_k> = <q / rms(q), g_q * RMSNorm(k) * g_k>
        kn = rms_norm(keys.keys.float(), keys.key_gain) * keys.query_gain.float()  # [2, r, n, Dk]
        self.keys_t = kn.transpose(-1, -2).reshape(2 * r, dk, -1).contiguous()  # [2r, Dk, n]
        self.eps = 1e-6  # as in rms_norm
        self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple:
        return tuple((p._version, p.data_ptr(), p.dtype) for p in self._sources())

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [T, h] -> per-core scores [T, m, c] (sorted by their sum), value rows [T, m] (as
        `UltraMemV2Layer.retrieve` before `table_rows`) and W_pre x [T, Dp] (None: plain)."""
        if self._stamp != self._current_stamp():
            self.refresh()
        layer, cfg = self.layer, self.layer.cfg
        r, dk, n = cfg.tucker_rank, cfg.key_dim, cfg.n_keys
        kr, m = cfg.preselect_k, cfg.top_m
        t = x.shape[0]
        qp = F.linear(x.float(), self.w_in)  # [T, n_query (+ Dp)]
        if self.pre is not None:
            xp = self.pre(x)  # [T, Dp]
        else:
            xp = qp[:, self.n_query:] if layer.pre_proj is not None else None  # [T, Dp]
        q = qp[:, : self.n_query].view(t, -1, dk)  # [T, 2r or 2, Dk]
        inv_rms = q.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        q = (q * inv_rms).transpose(0, 1)  # [2r or 2, T, Dk]
        if cfg.shared_rank_query:
            q = q.view(2, 1, t, dk).expand(2, r, t, dk).reshape(2 * r, t, dk)
        s = torch.bmm(q, self.keys_t).view(2, r, t, n)  # [2, r, T, n]: S_row, S_col
        # pre-selection, candidate scoring and top-m: the layer's own (`TuckerProductKeys.select`)
        scores, cells = layer.keys.select(s[0].transpose(0, 1), s[1].transpose(0, 1), m, kr,
                                          cfg.preselect)  # [T, m, c], [T, m]
        return scores, layer.perm[cells], xp

    def __call__(self, u: Tensor) -> Tensor:
        layer = self.layer
        lead = u.shape[:-1]
        x = layer._flat(u)  # [T, h]
        scores, rows, xp = self.retrieve(x)
        rows = layer.table_rows(rows)
        if layer.table_source is not None:
            y = layer.table_source.read(rows, scores, xp)  # [T, Dv]
        else:
            values, pre_values = layer.tables()
            y = memory_read(values, pre_values, rows, scores, xp)  # [T, Dv]
        if self.out is not None:
            return self.out(y).to(u.dtype).view(*lead, layer.d_model)
        w_out = layer.out_proj.weight
        return F.linear(y.to(w_out.dtype), w_out).to(u.dtype).view(*lead, layer.d_model)


# ----------------------------------------------------------------------------- dense linears


def packed_bf16_supported() -> bool:
    """oneDNN bf16 linears with prepacked weights (CPU with bf16 support, torch built with it)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """bf16 linear whose weight is prepacked once in oneDNN's blocked layout (CPU).

    On this project's CPU (AVX-512 BF16) a plain bf16 `F.linear` of a few tokens is no faster
    than float32; the prepacked one is 1.2-2.3x faster than plain bf16 from 1 to 64 tokens
    (docs/performance.md). The packed tensor is a plain attribute: a serving model is not saved.
    """

    def __init__(self, weight: Tensor):
        super().__init__()
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.out_features, self.in_features = w.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, None, "none", [], "")
        return y.to(x.dtype).view(*lead, self.out_features)


# ----------------------------------------------------------------------------- int8 weights


class Int8Linear(nn.Module):
    """Weight-only int8 linear: w ~ scale[o] * w_int8[o, :], symmetric per output channel.

    Activations are bfloat16 (`_weight_int8pack_mm` wants matching activation and scale dtypes);
    the output has the input's dtype.
    """

    def __init__(self, weight: Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127.0  # [out]
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8).contiguous())
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight, self.scales)
        return y.to(x.dtype).view(*lead, self.out_features)


def _swap_linears(model: nn.Module, make) -> int:
    """Replace the nn.Linear of attention and FFNs, and the output head, by make(weight)."""
    from ultramem.layers.ffn import SwiGLU
    from ultramem.model import Attention

    swapped = 0
    for module in list(model.modules()):
        if isinstance(module, (Attention, SwiGLU)):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, make(child.weight))
                    swapped += 1
    if isinstance(getattr(model, "head", None), nn.Linear):
        model.head = make(model.head.weight)
        swapped += 1
    elif getattr(model, "head", 0) is None and getattr(model, "embed", None) is not None:
        # Tied embeddings: the head reads its own copy; the input embedding keeps its rows.
        model.head = make(model.embed.weight)
        swapped += 1
    return swapped


# ----------------------------------------------------------------------------- public API


def ultramem_v2_layers(model: nn.Module) -> list[UltraMemV2Layer]:
    return [m for m in model.modules() if isinstance(m, UltraMemV2Layer)]


def install_decode_steps(model: nn.Module, *, installed_by: str = "serve",
                         packed: bool = False) -> int:
    """Give every UltraMemV2 layer without one a decode step; returns how many were installed."""
    count = 0
    for layer in ultramem_v2_layers(model):
        if getattr(layer, "decode_step", None) is None:
            layer.decode_step = UltraMemV2Decode(layer, installed_by=installed_by, packed=packed)
            count += 1
    return count


def remove_decode_steps(model: nn.Module, *, installed_by: str | None = None) -> None:
    """Remove decode steps (only those installed by `installed_by`, if given)."""
    for layer in ultramem_v2_layers(model):
        step = getattr(layer, "decode_step", None)
        if step is not None and (installed_by is None or step.installed_by == installed_by):
            layer.decode_step = None


@contextlib.contextmanager
def decoding(model: nn.Module) -> Iterator[nn.Module]:
    """Decode steps installed for the block, removed after (steps already there are kept)."""
    install_decode_steps(model, installed_by="decoding")
    try:
        yield model
    finally:
        remove_decode_steps(model, installed_by="decoding")


def _keep_fp32(model: nn.Module) -> list[Tensor]:
    """Parameters that stay float32: norms, and what decides retrieval in UltraMemV2 layers."""
    from ultramem.model import RMSNorm

    keep: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, RMSNorm):
            keep.append(module.weight)
        if isinstance(module, UltraMemV2Layer):
            keep += [*module.keys.parameters(), *module.query.parameters(),
                     *module.out_proj.parameters()]
            if module.pre_proj is not None:
                keep += list(module.pre_proj.parameters())
    return keep


@torch.no_grad()
def prepare_for_serving(model: nn.Module, dtype: str = "bf16", *,
                        packed: bool = True) -> nn.Module:
    """Cast `model` in place for decoding and install UltraMemV2 decode steps; returns it.

    dtype: "bf16" (dense weights and value tables in bfloat16, retrieval in float32; with
    `packed`, attention/FFN/head linears use oneDNN prepacked weights where supported), "int8"
    (bf16 plus int8 attention/FFN/head linears) or "fp32" (no cast). The result is for inference:
    training or saving it needs the float32 checkpoint again.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    target = DTYPES[dtype]
    if target != torch.float32:
        keep = {id(p): p.detach().clone() for p in _keep_fp32(model)}
        model.to(target)
        for p in _keep_fp32(model):
            if id(p) in keep:
                p.data = keep[id(p)]
    packed = packed and dtype != "fp32" and packed_bf16_supported()
    if dtype == "int8":
        _swap_linears(model, Int8Linear)
    elif packed:
        _swap_linears(model, PackedLinear)
    remove_decode_steps(model)
    install_decode_steps(model, packed=packed)
    model.eval()
    model.serving_dtype = dtype
    return model


__all__ = ["DTYPES", "Int8Linear", "PackedLinear", "UltraMemV2Decode", "decoding",
           "install_decode_steps", "packed_bf16_supported", "prepare_for_serving",
           "remove_decode_steps"]
