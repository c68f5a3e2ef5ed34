"""Serve UltraMemV2 value tables from disk (memory-mapped safetensors) or host memory.

A memory layer reads top_m rows per token out of millions, so its tables need not be resident:
`load_offloaded(checkpoint)` builds the model with every other weight loaded normally (and moved
to `device`), while each layer's value and pre-value tables stay memory-mapped from the
checkpoint's `model.safetensors` (or from an int8 file written by `write_int8_tables`). A decode
step gathers the rows it needs on the host (touching only their pages), dequantizes them if
int8, and ships the gathered rows' contribution to the device.

int8 tables are quantized per row, symmetrically: q = round(row / s), s = max|row| / 127, stored
as an int8 [N, D] tensor plus a float32 [N] scale ("<name>.q" and "<name>.scale").
Offloaded tables are for inference: they take no gradients.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
from torch import Tensor, nn

from ultramem.layers.ultramem_v2 import UltraMemV2Layer
from ultramem.ops import memory_read

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def mmap_safetensors(path: str | Path, *, random_access: bool = True) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as a memory-mapped CPU tensor (nothing read yet).

    Parses the documented layout (8-byte little-endian header size, JSON header, raw data). The
    mapping is private copy-on-write, so tensors are writable in principle but the file never
    changes. random_access advises the kernel not to read ahead around each touched page.
    """
    path = Path(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if random_access and hasattr(mmap, "MADV_RANDOM"):
        buf.madvise(mmap.MADV_RANDOM)
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start)
        out[name] = flat.view(info["shape"])
    return out


def quantize_int8(table: Tensor, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: (q [N, D] int8, scale [N] float32), processed in row chunks."""
    q = torch.empty(table.shape, dtype=torch.int8)
    scale = torch.empty(table.shape[0], dtype=torch.float32)
    for start in range(0, table.shape[0], chunk):
        rows = table[start : start + chunk].float()
        s = rows.abs().amax(1).clamp_min(1e-12) / 127.0
        q_rows = torch.round(rows / s.unsqueeze(1)).clamp_(-127, 127)
        q[start : start + chunk] = q_rows.to(torch.int8)
        scale[start : start + chunk] = s
    return q, scale


class OffloadedTables:
    """Value and pre-value tables kept on the host (memory-mapped or in RAM), fp32/bf16 or int8.

    `read(rows, scores, xp)` computes the memory read on the host and returns it on xp's device.
    """

    def __init__(self, values: Tensor, pre_values: Tensor | None,
                 values_scale: Tensor | None = None,
                 pre_values_scale: Tensor | None = None):
        self.values, self.pre_values = values, pre_values
        self.values_scale, self.pre_values_scale = values_scale, pre_values_scale

    @property
    def quantized(self) -> bool:
        return self.values_scale is not None

    def _rows(self, table: Tensor, scale: Tensor | None, rows: Tensor) -> Tensor:
        got = table[rows].float()  # [T, m, D], only these rows' pages are touched
        return got if scale is None else got * scale[rows].unsqueeze(-1)

    @torch.no_grad()
    def read(self, rows: Tensor, scores: Tensor, xp: Tensor | None) -> Tensor:
        """xp None: plain values (no pre-value table)."""
        host = rows.cpu()
        scores_h = scores.detach().float().cpu()
        xp_h = xp.detach().float().cpu() if xp is not None else None
        if self.quantized:
            t, m = host.shape
            values = self._rows(self.values, self.values_scale, host).reshape(t * m, -1)
            pre = (self._rows(self.pre_values, self.pre_values_scale, host).reshape(t * m, -1)
                   if self.pre_values is not None else None)
            local = torch.arange(t * m).view(t, m)  # the gathered rows, in order
            y = memory_read(values, pre, local, scores_h, xp_h, impl="fast")
        else:
            y = memory_read(self.values, self.pre_values, host, scores_h, xp_h, impl="fast")
        like = xp if xp is not None else scores
        return y.to(device=like.device, dtype=like.dtype)


def _table_names(model: nn.Module) -> dict[str, tuple[UltraMemV2Layer, str]]:
    """state_dict name of every UltraMemV2 value/pre-value table -> (layer, attribute)."""
    names = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, UltraMemV2Layer) and module.store is None:
            for attr in ("values", "pre_values"):
                if getattr(module, attr) is not None:  # pre_values is None for plain values
                    names[f"{mod_name}.{attr}"] = (module, attr)
    return names


def write_int8_tables(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Quantize a checkpoint's UltraMemV2 tables to int8 into `tables.int8.safetensors`."""
    from safetensors.torch import save_file

    from ultramem.train.checkpoint import resolve

    ckpt = resolve(checkpoint)
    tensors = mmap_safetensors(ckpt / "model.safetensors", random_access=False)
    out = Path(out) if out is not None else ckpt / "tables.int8.safetensors"
    result = {}
    for name, t in tensors.items():
        if name.endswith(("values", "pre_values")) and t.dim() == 2 and "memory" in name:
            q, scale = quantize_int8(t)
            result[f"{name}.q"], result[f"{name}.scale"] = q, scale
    if not result:
        raise ValueError(f"{ckpt}: no UltraMemV2 value tables to quantize")
    tmp = out.with_name(out.name + ".tmp")
    save_file(result, str(tmp))
    tmp.replace(out)
    return out


def load_offloaded(checkpoint: str | Path, *, device: str | torch.device = "cpu",
                   int8: bool = False, in_memory: bool = False) -> nn.Module:
    """The checkpoint's LM with UltraMemV2 tables served from the host, the rest on `device`.

    int8: read tables from `tables.int8.safetensors` (see `write_int8_tables`).
    in_memory: copy tables into host RAM instead of memory-mapping them.
    """
    from ultramem.config import ModelConfig
    from ultramem.model import LM
    from ultramem.train.checkpoint import read_config, resolve

    ckpt = resolve(checkpoint)
    cfg = ModelConfig.from_dict(read_config(ckpt)["model"])
    if cfg.memory is None or cfg.memory.kind != "ultramem_v2" or cfg.memory.share_group != 1:
        raise ValueError("load_offloaded serves UltraMemV2 models without value sharing")
    model = LM(cfg, init=False)  # tables are torch.empty: allocated lazily, never touched
    tensors = mmap_safetensors(ckpt / "model.safetensors")
    tables = _table_names(model)
    for layer, attr in tables.values():
        delattr(layer, attr)  # drop the untouched placeholder
    rest = {k: v for k, v in tensors.items() if k not in tables}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected or set(missing) - set(tables):
        raise ValueError(f"{ckpt}: state mismatch, missing {missing}, unexpected {unexpected}")
    quant = mmap_safetensors(ckpt / "tables.int8.safetensors") if int8 else None
    for layer in {id(layer): layer for layer, _ in tables.values()}.values():
        prefix = next(k for k, (lay, _) in tables.items() if lay is layer).rsplit(".", 1)[0]

        def get(attr: str, prefix: str = prefix) -> tuple[Tensor, Tensor | None]:
            if quant is not None:
                return quant[f"{prefix}.{attr}.q"], quant[f"{prefix}.{attr}.scale"]
            t = tensors[f"{prefix}.{attr}"]
            return (t.clone() if in_memory else t), None

        values, v_scale = get("values")
        pre, p_scale = get("pre_values") if f"{prefix}.pre_values" in tables else (None, None)
        layer.table_source = OffloadedTables(values, pre, v_scale, p_scale)
    return model.to(device).eval()
