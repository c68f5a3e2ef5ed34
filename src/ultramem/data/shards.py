"""Packed token shards on disk (numpy memmap) and a deterministic, resumable batch order.

A prepared data directory holds `meta.json` and, per split, one or more raw shard files
(`train_000.bin`, ...; uint16 when the vocabulary fits, else uint32). Training reads windows of
seq_len + 1 tokens at stride seq_len inside each shard. The order is a pure function of
(seed, sample index): sample k lies in epoch k // n_windows at position
permutation(seed, epoch)[k % n_windows]. A run's data position is therefore one integer, and
resuming at sample k reproduces the uninterrupted order exactly, on any number of ranks.
`BatchLoader` serves the same batches from DataLoader worker processes, prepared ahead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

META = "meta.json"
_META_KEYS = ("splits", "vocab_size", "dtype", "tokenizer")  # what readers rely on


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class DataError(ValueError):
    """Input that cannot be prepared or read: missing, unreadable, malformed, empty or damaged."""


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `ultramem prepare` to create {data_dir}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); run `ultramem prepare` again") from None
    if not isinstance(meta, dict) or not set(_META_KEYS) <= set(meta):
        raise DataError(f"{path}: not a prepared data directory's meta.json; run `ultramem "
                        f"prepare` again")
    return meta


def check_shards(data_dir: Path, meta: dict[str, Any], split: str) -> None:
    """Every shard of `split` exists and the sizes add up to what meta.json says (and, where meta
    records `shard_tokens`, each shard but the last is full): a damaged directory, e.g. one a
    killed `prepare` of an older version left behind, is named instead of read."""
    info = meta["splits"][split]
    itemsize = np.dtype(meta["dtype"]).itemsize
    sizes = []
    for name in info["shards"]:
        path = data_dir / name
        if not path.is_file():
            raise DataError(f"{path} is listed in {data_dir / META} but missing: the data "
                            f"directory is damaged; run `ultramem prepare` again")
        nbytes = path.stat().st_size
        if nbytes % itemsize:
            raise DataError(f"{path}: {nbytes} bytes is not a whole number of "
                            f"{meta['dtype']} tokens: damaged; run `ultramem prepare` again")
        sizes.append(nbytes // itemsize)
    full = meta.get("shard_tokens")
    bad = sum(sizes) != info["n_tokens"] or (
        full is not None and (any(n != full for n in sizes[:-1]) or sizes[-1:] > [full]))
    if bad:
        raise DataError(f"{data_dir}: the {split} shards hold {sizes} tokens but {META} says "
                        f"{info['n_tokens']} in total" + (f" in shards of {full}" if full else "")
                        + ": the directory is damaged (an interrupted prepare?); run "
                        "`ultramem prepare` again")


class TokenShards:
    """The shards of one split, memory-mapped read-only."""

    def __init__(self, data_dir: str | Path, split: str):
        self.dir, self.split = Path(data_dir), split
        meta = read_meta(self.dir)
        if split not in meta["splits"]:
            raise DataError(f"split {split!r} not in {self.dir}; has {sorted(meta['splits'])}")
        dtype = np.dtype(meta["dtype"])
        check_shards(self.dir, meta, split)
        self.shards = [np.memmap(self.dir / name, dtype=dtype, mode="r")
                       for name in meta["splits"][split]["shards"]]
        self.n_tokens = sum(len(s) for s in self.shards)
        self.vocab_size = int(meta["vocab_size"])
        self._dtype, self._names = dtype, list(meta["splits"][split]["shards"])

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker started by spawn/forkserver gets a pickled copy: reopen the memmaps
        # there instead of pickling their contents.
        return {k: v for k, v in self.__dict__.items() if k != "shards"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.shards = [np.memmap(self.dir / name, dtype=self._dtype, mode="r")
                       for name in self._names]


@dataclass
class BatchOrder:
    """Deterministic batches of windows from `shards`.

    `batch(k)` returns micro-batch k of this rank: x, y [batch_size, seq_len] int64.
    Global sample index of row i: (k * world + rank) * batch_size + i.
    """

    shards: TokenShards
    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        counts = [max(0, (len(s) - 1) // self.seq_len) for s in self.shards.shards]
        self.n_windows = sum(counts)
        if self.n_windows == 0:
            longest = max((len(s) for s in self.shards.shards), default=0)
            raise DataError(
                f"{self.shards.dir}: too little data for seq_len={self.seq_len}: no shard of the "
                f"{self.shards.split} split holds a window of seq_len + 1 = {self.seq_len + 1} "
                f"tokens ({self.shards.n_tokens} tokens, at most {longest} in one shard); use a "
                f"shorter seq_len or more data"
            )
        self._starts = np.cumsum([0] + counts)  # first window index of each shard
        self._perm_epoch, self._perm = -1, None

    def _window(self, j: int) -> np.ndarray:
        shard = int(np.searchsorted(self._starts, j, side="right") - 1)
        off = (j - int(self._starts[shard])) * self.seq_len
        return self.shards.shards[shard][off : off + self.seq_len + 1]

    def sample(self, k: int) -> np.ndarray:
        epoch, j = divmod(k, self.n_windows)
        if self.shuffle:
            if epoch != self._perm_epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm, self._perm_epoch = rng.permutation(self.n_windows), epoch
            j = int(self._perm[j])
        return self._window(j)

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (k * self.world + self.rank) * self.batch_size
        rows = np.stack([self.sample(first + i) for i in range(self.batch_size)]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


class _Batches(torch.utils.data.Dataset):
    """Item k is `order.batch(k)`: what a DataLoader's workers compute."""

    def __init__(self, order: BatchOrder):
        self.order = order

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.order.batch(k)  # any k >= 0: epochs repeat; the sampler picks them


class BatchLoader:
    """`order.batch(k)` served by a `torch.utils.data.DataLoader`: `workers` processes prepare
    the next batches (`prefetch` each) while the step runs, pinned in page-locked memory when
    `pin_memory` (for CUDA). `batch(k)` returns exactly `order.batch(k)` whatever the workers:
    consecutive k come from the prefetching loader, which starts at the first k asked for (a
    resume asks for its step first) and restarts wherever a jump lands."""

    def __init__(self, order: BatchOrder, *, workers: int = 0, prefetch: int = 2,
                 pin_memory: bool = False, stop: int | None = None):
        self.order, self.workers, self.prefetch = order, workers, prefetch
        self.pin_memory, self.stop = pin_memory, stop
        self._it, self._next = None, None

    def _start(self, k: int) -> None:
        self.close()
        stop = self.stop if self.stop is not None and self.stop > k else k + (1 << 40)
        loader = torch.utils.data.DataLoader(
            _Batches(self.order), batch_size=None, sampler=range(k, stop),
            num_workers=self.workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if self.workers else None)
        self._it, self._next = iter(loader), k

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y [batch_size, seq_len] int64 of micro-batch k (= `order.batch(k)`)."""
        if self._it is None or k != self._next:
            self._start(k)
        try:
            x, y = next(self._it)
        except StopIteration:  # past `stop`: keep going from here
            self._start(k)
            x, y = next(self._it)
        self._next = k + 1
        return x, y

    def close(self) -> None:
        """Stop the workers (they also stop when the loader is garbage-collected)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
