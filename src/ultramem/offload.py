"""UltraMemV2 value tables served from disk (memory-mapped) or host memory, and written to disk.

A memory layer reads top_m rows per token out of millions, so its tables need not be resident.
`load_offloaded(checkpoint)` builds the model with every other weight loaded (and moved to
`device`) while each layer's tables stay on the host, memory-mapped, in one of two forms:

- float tables inside a training checkpoint's `model.safetensors`, mapped in place;
- int8 row files, one per memory layer, under the checkpoint's `tables/` (`tables/index.json`
  lists them), so a layer's table is read without touching the others'.

An int8 row file is a safetensors file holding one uint8 tensor "rows" [N, W]. Row s is one
W-byte record: pre_values[s] as int8 [Dp], values[s] as int8 [Dv], zero padding to a multiple of
4, then the pre-value and value scales as float32 (`RowLayout`). Quantization is per row and
symmetric: q = round(row / s), s = max|row| / 127. A token's row is one record, so reading it
touches one page of the file (two when it straddles a page boundary), not four.

Writers: `write_int8_tables(checkpoint)` converts a trained checkpoint's tables;
`write_initialized(cfg, out)` (`ultramem init`) writes a freshly initialised model of any size:
the dense weights by `ultramem.init.init_lm`, exactly as `LM(cfg, seed=seed)` draws them, and
each table drawn in row chunks from the same generator at the same point of the init, quantized
and written chunk by chunk, never whole in memory (the tables equal `LM(cfg, seed)`'s, quantized).

A decode step gathers the records it needs on the host (touching only their pages; `prefetch`
first asks the kernel for all of them at once, so cold reads overlap), dequantizes them and
ships the memory read to the device. Offloaded tables are for inference: they take no gradients.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ultramem.layers.ultramem_v2 import UltraMemV2Layer
from ultramem.ops import memory_read

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
ROWS_FORMAT = "ultramem-int8-rows"
TABLES_DIR = "tables"
INDEX = "index.json"
PAGE = mmap.PAGESIZE
# A gather slower than this per row went to disk, and the next one of its table prefetches: a
# cached row takes under a microsecond, a cold one a disk read (~100 us on this VM's disk),
# and prefetching costs ~6 us per row (one madvise per page run) even when nothing is read.
COLD_SECONDS_PER_ROW = 10e-6


# ----------------------------------------------------------------------------- mapping files


def _map(path: Path, random_access: bool) -> tuple[mmap.mmap, dict, int]:
    """(private mapping of a safetensors file, its header, offset of its data)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if random_access and hasattr(mmap, "MADV_RANDOM"):
        buf.madvise(mmap.MADV_RANDOM)  # no read-around: a fault reads its own page only
    return buf, header, 8 + header_len


def mmap_safetensors(path: str | Path, *, random_access: bool = True) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as a memory-mapped CPU tensor (nothing read yet).

    Parses the documented layout (8-byte little-endian header size, JSON header, raw data). The
    mapping is private copy-on-write, so tensors are writable in principle but the file never
    changes. random_access advises the kernel not to read ahead around each touched page.
    """
    path = Path(path)
    buf, header, base = _map(path, random_access)
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
        rows = table[start : start + chunk].to(torch.float32, copy=True)
        q[start : start + chunk], scale[start : start + chunk] = _quantize_(rows)
    return q, scale


def _quantize_(rows: Tensor) -> tuple[Tensor, Tensor]:
    """`quantize_int8` of float32 rows [c, D], overwriting rows: (q [c, D] int8, scale [c])."""
    s = torch.maximum(rows.amax(1), rows.amin(1).neg_()).clamp_min_(1e-12).div_(127.0)
    return rows.div_(s.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8), s


# ----------------------------------------------------------------------------- int8 row records


@dataclass(frozen=True)
class RowLayout:
    """Byte layout of one int8 row record: [pre_values q | values q | pad | scales (float32)]."""

    value_dim: int
    pre_value_dim: int

    @property
    def scales_at(self) -> int:
        return -(-(self.pre_value_dim + self.value_dim) // 4) * 4  # float32-aligned

    @property
    def width(self) -> int:
        """W: bytes per row."""
        return self.scales_at + (8 if self.pre_value_dim else 4)

    def fields(self, name: str) -> tuple[slice, slice]:
        """Byte columns of table `name` ("values" or "pre_values"): (int8 row, float32 scale)."""
        dp, s = self.pre_value_dim, self.scales_at
        if name == "pre_values" and dp:
            return slice(0, dp), slice(s, s + 4)
        if name == "values":
            at = s + 4 if dp else s
            return slice(dp, dp + self.value_dim), slice(at, at + 4)
        raise KeyError(f"no table {name!r} in {self}")

    def names(self) -> tuple[str, ...]:
        return ("values", "pre_values") if self.pre_value_dim else ("values",)

    def unpack(self, records: Tensor, name: str) -> Tensor:
        """records [K, W] uint8 -> table `name`'s rows [K, D], dequantized float32."""
        q, s = self.fields(name)
        return records[:, q].view(torch.int8).float() * records[:, s].view(torch.float32)

    def metadata(self) -> dict[str, str]:
        return {"format": ROWS_FORMAT, "value_dim": str(self.value_dim),
                "pre_value_dim": str(self.pre_value_dim),
                "layout": "int8 pre_values [Dp] | int8 values [Dv] | zero pad to 4 | float32 "
                          "pre_values scale | float32 values scale (one row per record)"}


class OffloadedTables:
    """Float value and pre-value tables kept on the host (memory-mapped or in RAM).

    `read(rows, scores, xp)` computes the memory read on the host and returns it on xp's device.
    """

    quantized = False

    def __init__(self, values: Tensor, pre_values: Tensor | None):
        self.values, self.pre_values = values, pre_values

    @torch.no_grad()
    def read(self, rows: Tensor, scores: Tensor, xp: Tensor | None) -> Tensor:
        """xp None: plain values (no pre-value table)."""
        scores_h = scores.detach().float().cpu()
        xp_h = xp.detach().float().cpu() if xp is not None else None
        y = memory_read(self.values, self.pre_values, rows.cpu(), scores_h, xp_h, impl="fast")
        like = xp if xp is not None else scores
        return y.to(device=like.device, dtype=like.dtype)


class Int8RowTables:
    """One layer's tables as int8 row records [N, W] (an int8 row file, mapped or in RAM).

    `values` / `pre_values` are int8 views (the scales are `scales(name)`); `read` gathers the
    records of the rows a step needs, one copy per row, and dequantizes them. With `prefetch`
    (mapped files only), while gathers are slow (`COLD_SECONDS_PER_ROW`: rows come from disk)
    each gather first asks the kernel for all its pages at once, so their reads overlap.
    """

    quantized = True

    def __init__(self, records: Tensor, layout: RowLayout, *, mapping: mmap.mmap | None = None,
                 base: int = 0, prefetch: bool = True):
        self.records, self.layout = records, layout
        self.values = records[:, layout.fields("values")[0]].view(torch.int8)  # [N, Dv]
        self.pre_values = (records[:, layout.fields("pre_values")[0]].view(torch.int8)
                           if layout.pre_value_dim else None)  # [N, Dp]
        self._mapping, self._base, self.path = mapping, base, None
        self.prefetch = prefetch and mapping is not None and hasattr(mmap, "MADV_WILLNEED")
        self._cold = True  # the last gather went to disk

    @classmethod
    def open(cls, path: str | Path, layout: RowLayout, n_rows: int, *, in_memory: bool = False,
             prefetch: bool = True) -> Int8RowTables:
        """The int8 row file at path, checked against the layout and row count it must have."""
        path = Path(path)
        try:
            buf, header, base = _map(path, random_access=True)
        except (OSError, ValueError, struct.error) as err:
            raise ValueError(f"{path}: not a readable int8 row file ({err})") from None
        meta, info = header.get("__metadata__", {}), header.get("rows", {})
        want = [n_rows, layout.width]
        if meta.get("format") != ROWS_FORMAT or info.get("shape") != want \
                or info.get("dtype") != "U8":
            raise ValueError(f"{path}: expected {ROWS_FORMAT} rows {want}, found format "
                             f"{meta.get('format')!r} shape {info.get('shape')}")
        size = n_rows * layout.width
        if len(buf) < base + size:
            raise ValueError(f"{path}: truncated ({len(buf)} bytes, needs {base + size})")
        records = torch.frombuffer(buf, dtype=torch.uint8, count=size, offset=base)
        records = records.view(n_rows, layout.width)
        if in_memory:
            return cls(records.clone(), layout)
        tables = cls(records, layout, mapping=buf, base=base, prefetch=prefetch)
        tables.path = path
        return tables

    def release(self, *, drop_cache: bool = False) -> None:
        """Unmap the pages this process has read (its resident set shrinks; later reads map them
        again from the page cache); drop_cache: also ask the kernel to evict the file from the
        page cache, so the next reads come from disk (a cold start, for benchmarks)."""
        if self._mapping is None:
            return
        self._mapping.madvise(mmap.MADV_DONTNEED)
        if drop_cache and hasattr(os, "posix_fadvise"):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        self._cold = True

    def scales(self, name: str) -> Tensor:
        """Per-row float32 scales of table `name`, [N] (a strided view)."""
        return self.records[:, self.layout.fields(name)[1]].view(torch.float32)[:, 0]

    def _prefetch(self, rows: Tensor) -> None:
        """Ask the kernel for every page these rows' records lie on (asynchronous reads), so the
        gather that follows waits for one batch of overlapping reads, not one read per row."""
        w = self.layout.width
        start = self._base + rows.numpy().astype(np.int64) * w
        pages = np.unique(np.concatenate([start // PAGE, (start + w - 1) // PAGE]))
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1  # runs of consecutive pages
        firsts = pages[np.concatenate([[0], breaks])].tolist()
        counts = np.diff(np.concatenate([[0], breaks, [len(pages)]])).tolist()
        for first, count in zip(firsts, counts, strict=True):
            self._mapping.madvise(mmap.MADV_WILLNEED, first * PAGE, count * PAGE)

    def gather(self, rows: Tensor) -> Tensor:
        """Records of rows [K] (int64, CPU) -> [K, W] uint8, touching only their pages."""
        if not self.prefetch:
            return torch.index_select(self.records, 0, rows)
        start = time.perf_counter()
        if self._cold:
            self._prefetch(rows)
        got = torch.index_select(self.records, 0, rows)
        self._cold = time.perf_counter() - start > COLD_SECONDS_PER_ROW * max(len(rows), 1)
        return got

    @torch.no_grad()
    def read(self, rows: Tensor, scores: Tensor, xp: Tensor | None) -> Tensor:
        """The memory read of rows [T, m] with scores [T, m, c] and W_pre x [T, Dp] (None:
        plain values), on xp's (or scores') device and dtype."""
        t, m = rows.shape
        got = self.gather(rows.reshape(-1).cpu())  # [T m, W] uint8
        values = self.layout.unpack(got, "values")  # [T m, Dv]
        pre = self.layout.unpack(got, "pre_values") if self.pre_values is not None else None
        local = torch.arange(t * m).view(t, m)  # the gathered rows, in order
        xp_h = xp.detach().float().cpu() if xp is not None else None
        y = memory_read(values, pre, local, scores.detach().float().cpu(), xp_h, impl="fast")
        like = xp if xp is not None else scores
        return y.to(device=like.device, dtype=like.dtype)


class _RowFile:
    """An int8 row file being written: header and size first, then each table's columns filled
    in row chunks (read, modify, write back), so the tables need not be drawn side by side."""

    def __init__(self, path: Path, n_rows: int, layout: RowLayout, metadata: dict[str, str]):
        self.path, self.n_rows, self.layout = path, n_rows, layout
        size = n_rows * layout.width
        header = json.dumps({"__metadata__": {**layout.metadata(), **metadata},
                             "rows": {"dtype": "U8", "shape": [n_rows, layout.width],
                                      "data_offsets": [0, size]}}).encode()
        header += b" " * (-(8 + len(header)) % 8)  # data 8-byte aligned, as safetensors writes
        self.base = 8 + len(header)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, struct.pack("<Q", len(header)) + header)
        os.ftruncate(self.fd, self.base + size)  # a hole: reads as zeros until written
        self.written: set[str] = set()  # tables with columns on disk
        self._buffer = bytearray()

    def fill(self, name: str, start: int, q: Tensor, scale: Tensor) -> None:
        """Write rows start.. of table `name`: int8 q [c, D] and float32 scale [c]."""
        w, c = self.layout.width, q.shape[0]
        qcol, scol = self.layout.fields(name)
        offset = self.base + start * w
        if len(self._buffer) < c * w:
            self._buffer = bytearray(c * w)
        view = memoryview(self._buffer)[: c * w]
        rec = torch.frombuffer(view, dtype=torch.uint8).view(c, w)
        if self.written - {name}:  # another table's columns are on disk: keep them
            if os.preadv(self.fd, [view], offset) != c * w:
                raise OSError(f"{self.path}: short read at row {start}")
        else:
            rec.zero_()
        rec[:, qcol] = q.view(torch.uint8)
        rec[:, scol] = scale.contiguous().view(torch.uint8).view(c, 4)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done
        self.written.add(name)

    def close(self) -> None:
        """Flush to disk, then drop the written pages from the page cache (they would push out
        other processes' pages; serving maps the rows it needs)."""
        os.fsync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(self.fd)


# ----------------------------------------------------------------------------- building


def _table_names(model: nn.Module) -> dict[str, tuple[UltraMemV2Layer, str]]:
    """state_dict name of every UltraMemV2 value/pre-value table -> (layer, attribute)."""
    names = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, UltraMemV2Layer) and module.store is None:
            for attr in ("values", "pre_values"):
                if getattr(module, attr) is not None:  # pre_values is None for plain values
                    names[f"{mod_name}.{attr}"] = (module, attr)
    return names


def _layers(tables: dict[str, tuple[UltraMemV2Layer, str]]) -> dict[str, UltraMemV2Layer]:
    """Module name -> layer, in model order."""
    return {name.rsplit(".", 1)[0]: layer for name, (layer, _) in tables.items()}


def check_servable(cfg) -> None:
    """ValueError unless cfg is an UltraMemV2 model whose layers own their tables."""
    mem = cfg.memory
    if mem is None or mem.kind != "ultramem_v2" or mem.share_group != 1:
        raise ValueError("offloaded tables serve UltraMemV2 models without value sharing "
                         "(memory.kind ultramem_v2, share_group 1)")


class _TablesOnMeta(TorchFunctionMode):
    """Allocates UltraMemV2 value tables (torch.empty of [n_values, Dv] or [n_values, Dp]) on
    the meta device while a model is built: shape only, never memory."""

    def __init__(self, shapes: set[tuple[int, int]], skip_init: bool = False):
        super().__init__()
        self.shapes, self.skip_init = shapes, skip_init

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], tuple | list) else args
        if func is torch.empty and tuple(shape) in self.shapes:
            kwargs["device"] = "meta"
        elif self.skip_init and func in (torch.Tensor.uniform_, torch.Tensor.normal_):
            return args[0]  # a constructor's default init, overwritten by the loaded weights
        elif self.skip_init and func is torch.randperm:
            return torch.empty(args[0], dtype=torch.long)  # shuffle buffers: loaded too
        return func(*args, **kwargs)


def build_without_tables(cfg, *, skip_init: bool = False):
    """`LM(cfg, init=False)` with its UltraMemV2 value tables on the meta device, so a model of
    any table size builds in the memory of its dense weights. skip_init: leave the constructors'
    random draws (default inits, shuffle permutations) undone, for a model whose every weight
    and buffer is loaded next (the loader checks that none is missing)."""
    from ultramem.model import LM

    check_servable(cfg)
    mem = cfg.memory
    shapes = {(mem.n_values, mem.value_dim), (mem.n_values, mem.pre_value_dim)}
    with _TablesOnMeta(shapes, skip_init):
        model = LM(cfg, init=False)
    tables = _table_names(model)
    real = [name for name, (layer, attr) in tables.items()
            if getattr(layer, attr).device.type != "meta"]
    if real or any(p.device.type == "meta" for n, p in model.state_dict().items()
                   if n not in tables):
        raise RuntimeError(f"build_without_tables: tables {real} were allocated, or another "
                           "weight was not (has UltraMemV2Layer changed how it allocates?)")
    return model


# ----------------------------------------------------------------------------- writing


def _row_chunks(n_rows: int, chunk: int, width: int) -> Iterator[tuple[int, int]]:
    """(start, end) row chunks of `chunk` rows (a multiple of 16); a last piece under 16 values
    joins the one before, so drawing chunk by chunk consumes the generator as one draw does."""
    chunk = max(16, chunk // 16 * 16)
    start = 0
    while start < n_rows:
        end = min(start + chunk, n_rows)
        if 0 < (n_rows - end) * width < 16:
            end = n_rows
        yield start, end
        start = end


class _StreamTables(TorchFunctionMode):
    """During `init_lm`: the `normal_` of a meta table draws it in row chunks from the same
    generator instead, each chunk quantized and written to its layer's row file."""

    def __init__(self, targets: dict[int, tuple[_RowFile, str]], chunk: int,
                 progress: Callable[[str], None] | None):
        super().__init__()
        self.targets, self.chunk, self.progress = targets, chunk, progress

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        target = self.targets.get(id(args[0])) if args else None
        if func is not torch.Tensor.normal_ or target is None:
            return func(*args, **kwargs)
        table, (file, name) = args[0], target
        mean = kwargs.get("mean", args[1] if len(args) > 1 else 0.0)
        std = kwargs.get("std", args[2] if len(args) > 2 else 1.0)
        gen = kwargs.get("generator")
        n, d = table.shape
        start_s = time.perf_counter()
        buffer = torch.empty(0)
        for start, end in _row_chunks(n, self.chunk, d):
            if buffer.numel() < (end - start) * d:
                buffer = torch.empty((end - start) * d)
            rows = buffer[: (end - start) * d].view(end - start, d)
            rows.normal_(mean, std, generator=gen)  # consumes gen as table.normal_ would
            file.fill(name, start, *_quantize_(rows))
        if self.progress is not None:
            self.progress(f"{file.path.name}: {name} {n} x {d}, std {std:.4g}, "
                          f"{time.perf_counter() - start_s:.1f} s")
        return table


def _disk_bytes(cfg) -> tuple[int, int]:
    """(bytes of the int8 row files, bytes of the dense weights in float32) of cfg's model."""
    from ultramem.accounting import count_params, sparse_tables

    mem = cfg.memory
    layout = RowLayout(mem.value_dim, mem.pre_value_dim)
    tables = sum(t.params for t in sparse_tables(cfg))
    rows = len(cfg.memory_blocks) * mem.n_values
    perm = rows * 8  # the shuffle buffers, int64
    return rows * layout.width, 4 * (count_params(cfg)["total"] - tables) + perm


def disk_bytes(cfg) -> int:
    """Bytes `write_initialized(cfg, ...)` puts on disk (headers aside)."""
    return sum(_disk_bytes(cfg))


def _save_dense(model: nn.Module, tables: dict, path: Path) -> None:
    from safetensors.torch import save_file

    dense = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tables}
    save_file(dense, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # the mode of a plain new file (the writer may make it private)


def _finish(tmp: Path, out: Path) -> None:
    """fsync every file under tmp, then rename it to out (an empty out directory is replaced)."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if out.is_dir():
        out.rmdir()  # empty (checked before writing)
    os.rename(tmp, out)


def check_out_dir(out: Path) -> None:
    """ValueError unless out is missing or an empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not an empty directory; give a new or empty one")


def write_initialized(cfg, out: str | Path, *, seed: int = 0, chunk_rows: int = 1 << 16,
                      progress: Callable[[str], None] | None = None) -> Path:
    """Write `LM(cfg, seed=seed)` to the directory out without building its tables in memory:
    config.json, the dense weights (model.safetensors, float32) and one int8 row file per
    memory layer under tables/ (with tables/index.json). The tables are those `LM(cfg, seed)`
    draws, quantized per row; each is drawn, quantized and written `chunk_rows` rows at a time.
    Written under a temporary name beside out and renamed when complete; nothing is left if it
    fails. out must be missing or empty. progress(line) is told each table as it is written."""
    from ultramem.init import init_lm
    from ultramem.train.checkpoint import FORMAT, VERSION

    out = Path(out)
    check_out_dir(out)
    check_servable(cfg)
    mem = cfg.memory
    layout = RowLayout(mem.value_dim, mem.pre_value_dim)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / TABLES_DIR).mkdir(parents=True)
    files: list[_RowFile] = []
    try:
        model = build_without_tables(cfg)
        tables = _table_names(model)
        layers = _layers(tables)
        targets = {}
        for prefix, layer in layers.items():
            file = _RowFile(tmp / TABLES_DIR / f"{prefix}.safetensors", mem.n_values, layout,
                            {"layer": prefix, "seed": str(seed)})
            files.append(file)
            for name in layout.names():
                targets[id(getattr(layer, name))] = (file, name)
        with torch.no_grad(), _StreamTables(targets, chunk_rows, progress):
            init_lm(model, seed=seed)
        for file in files:
            if file.written != set(layout.names()):
                raise RuntimeError(f"init_lm did not draw {file.path.name}'s tables "
                                   f"{sorted(set(layout.names()) - file.written)}")
            file.close()
        files = []
        index = {"format": ROWS_FORMAT, "version": 1, "value_dim": mem.value_dim,
                 "pre_value_dim": mem.pre_value_dim, "rows": mem.n_values,
                 "width": layout.width,
                 "files": {p: f"{p}.safetensors" for p in layers},
                 "value_std": {p: layer.init_stats.get("value_std") for p, layer in layers.items()}}
        (tmp / TABLES_DIR / INDEX).write_text(json.dumps(index, indent=1))
        _save_dense(model, tables, tmp / "model.safetensors")
        config = {"format": FORMAT, "version": VERSION, "step": 0, "model": cfg.to_dict(),
                  "tokenizer": {"kind": "bytes", "vocab_size": 256},
                  "tables": f"{TABLES_DIR}/{INDEX}", "init": {"seed": seed}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _finish(tmp, out)
    finally:
        for file in files:
            os.close(file.fd)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_int8_tables(checkpoint: str | Path) -> Path:
    """Quantize a training checkpoint's UltraMemV2 tables into int8 row files under its
    `tables/` directory (one per layer, and tables/index.json); returns that directory."""
    from ultramem.config import ModelConfig
    from ultramem.train.checkpoint import read_config, resolve

    ckpt = resolve(checkpoint)
    cfg = ModelConfig.from_dict(read_config(ckpt)["model"])
    check_servable(cfg)
    mem = cfg.memory
    layout = RowLayout(mem.value_dim, mem.pre_value_dim)
    tensors = mmap_safetensors(ckpt / "model.safetensors", random_access=False)
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors
                       if k.endswith(".values") and "memory" in k and tensors[k].dim() == 2},
                      key=lambda p: [int(x) if x.isdigit() else x for x in p.split(".")])
    if not prefixes:
        raise ValueError(f"{ckpt}: no UltraMemV2 value tables to quantize")
    out = ckpt / TABLES_DIR
    tmp = ckpt / f".{TABLES_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for prefix in prefixes:
            file = _RowFile(tmp / f"{prefix}.safetensors", mem.n_values, layout,
                            {"layer": prefix})
            try:
                for name in layout.names():
                    table = tensors[f"{prefix}.{name}"]
                    for start, end in _row_chunks(mem.n_values, 1 << 16, table.shape[1]):
                        file.fill(name, start, *quantize_int8(table[start:end]))
            finally:
                file.close()
        index = {"format": ROWS_FORMAT, "version": 1, "value_dim": mem.value_dim,
                 "pre_value_dim": mem.pre_value_dim, "rows": mem.n_values,
                 "width": layout.width, "files": {p: f"{p}.safetensors" for p in prefixes}}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        if out.exists():
            shutil.rmtree(out)
        _finish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- loading


def has_external_tables(checkpoint: str | Path) -> bool:
    """True for a checkpoint whose tables live only in int8 row files (`ultramem init`)."""
    from ultramem.train.checkpoint import read_config

    return "tables" in read_config(checkpoint)


def load_offloaded(checkpoint: str | Path, *, device: str | torch.device = "cpu",
                   int8: bool | None = None, in_memory: bool = False,
                   prefetch: bool = True) -> nn.Module:
    """The checkpoint's LM with UltraMemV2 tables served from the host, the rest on `device`.

    int8: read the tables from the int8 row files under tables/ (`write_int8_tables`,
    `write_initialized`); None: when the checkpoint has them. in_memory: copy the tables into
    host RAM instead of mapping them. prefetch: int8 reads ask for all their pages at once.
    """
    from safetensors import safe_open

    from ultramem.config import ModelConfig
    from ultramem.train.checkpoint import read_config, resolve

    ckpt = resolve(checkpoint)
    meta = read_config(ckpt)
    cfg = ModelConfig.from_dict(meta["model"])
    check_servable(cfg)
    index_path = ckpt / TABLES_DIR / INDEX
    if int8 is None:
        int8 = index_path.is_file()
    if "tables" in meta and not int8:
        raise ValueError(f"{ckpt}: its tables exist only as int8 row files; serve them as int8")
    model = build_without_tables(cfg, skip_init=True)
    tables = _table_names(model)
    layers = _layers(tables)
    for layer, attr in tables.values():
        delattr(layer, attr)  # drop the meta placeholder
    file = ckpt / "model.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        dense = {k: fh.get_tensor(k) for k in fh.keys() if k not in tables}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if unexpected or set(missing) - set(tables):
        raise ValueError(f"{file}: state mismatch, missing {sorted(set(missing) - set(tables))}, "
                         f"unexpected {unexpected}")
    del dense
    mem = cfg.memory
    if int8:
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{index_path}: not readable ({err})") from None
        layout = RowLayout(mem.value_dim, mem.pre_value_dim)
        for prefix, layer in layers.items():
            name = index.get("files", {}).get(prefix)
            if name is None:
                raise ValueError(f"{index_path}: no row file for layer {prefix}")
            layer.table_source = Int8RowTables.open(index_path.parent / name, layout,
                                                    mem.n_values, in_memory=in_memory,
                                                    prefetch=prefetch)
    else:
        mapped = mmap_safetensors(file)
        for prefix, layer in layers.items():
            values = mapped[f"{prefix}.values"]
            pre = mapped.get(f"{prefix}.pre_values")
            if in_memory:
                values, pre = values.clone(), (pre.clone() if pre is not None else None)
            layer.table_source = OffloadedTables(values, pre)
    return model.to(device).eval()


def table_files(checkpoint: str | Path) -> list[Path]:
    """Every file the tables of an offloaded checkpoint are read from (for page-cache control)."""
    ckpt = Path(checkpoint)
    found = sorted((ckpt / TABLES_DIR).glob("*.safetensors"))
    return found or [ckpt / "model.safetensors"]


__all__ = ["Int8RowTables", "OffloadedTables", "RowLayout", "build_without_tables",
           "check_out_dir", "disk_bytes", "has_external_tables", "load_offloaded",
           "mmap_safetensors", "quantize_int8", "table_files", "write_initialized",
           "write_int8_tables"]
