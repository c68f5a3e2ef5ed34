"""`prepare`: local text -> tokenizer + packed token shards with a train/validation split.

Inputs: `.txt` files (one document each), `.jsonl` files (one document per line, its "text"
field), folders (every .txt/.jsonl inside, in sorted path order), and built-in sources that need
no download: `builtin:facts` (the generated fact world) and `builtin:python` (text that ships with
Python). Documents keep their input order, so the output is deterministic.

Split: with at least 20 documents, every k-th document (k = round(1 / val_fraction)) goes to
validation; with fewer, the last val_fraction of each document (cut at a newline when possible)
does. Documents end with the end-of-text token (BPE) or a newline (bytes).

Inputs are streamed (a counting pass, a BPE training pass, a writing pass), so memory holds one
batch of documents at a time: the writing pass encodes ENCODE_BATCH documents (or about
ENCODE_CHARS characters) per call, BPE through `tokenizers`' parallel `encode_batch`, with the
same ids as encoding each document alone (`_encode`, tested). Everything is written into a
hidden sibling directory and renamed into place at the end (`ultramem.files.swap_in`), so a
killed prepare never leaves a mixture of an old and a new data set at the output path;
`meta.json` records each split's token count and shard size, and `TokenShards` checks the files
against it before reading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ultramem.data.shards import META, DataError, token_dtype
from ultramem.data.tokenizer import BPETokenizer, ByteTokenizer, train_bpe
from ultramem.files import swap_in

BUILTIN = ("builtin:facts", "builtin:python")
MIN_BPE_VOCAB = 258  # 256 byte tokens + <|endoftext|> + at least one merge (`train_bpe`)
TEXT_SUFFIXES = (".txt", ".jsonl")
ENCODE_BATCH = 256  # documents per encode_batch call ...
ENCODE_CHARS = 1 << 24  # ... or fewer, once they hold this many characters


def _files(source: str) -> list[Path]:
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not found:
            raise DataError(f"{source}: folder holds no .txt or .jsonl files")
        return found
    if path.suffix not in TEXT_SUFFIXES:
        raise DataError(f"{source}: expected a .txt or .jsonl file, got {path.suffix!r}")
    return [path]


def _read_file(path: Path) -> Iterator[str]:
    try:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
            return
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string 'text'")
                yield obj["text"]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def _builtin(name: str, seed: int) -> Iterator[str]:
    from ultramem.data import builtin

    if name == "builtin:facts":
        yield builtin.fact_text(builtin.fact_world(64, seed=seed), repeats=6, seed=seed)
    elif name == "builtin:python":
        yield builtin.python_text()


def iter_documents(sources: list[str], seed: int = 0) -> Iterator[str]:
    """Every non-empty document of sources, in order. Raises DataError on bad input."""
    if not sources:
        raise DataError("no input given")
    for source in sources:
        if source.startswith("builtin:"):
            if source not in BUILTIN:
                raise DataError(f"{source}: unknown built-in source; known: {list(BUILTIN)}")
            yield from _builtin(source, seed)
            continue
        for path in _files(source):
            for doc in _read_file(path):
                if doc.strip():
                    yield doc


def _split(docs: Iterator[str], n_docs: int, val_fraction: float) -> Iterator[tuple[str, str]]:
    """(split, text) pieces of docs, streamed: see the module docstring for the rule."""
    if val_fraction <= 0:
        for doc in docs:
            yield "train", doc
    elif n_docs >= 20:
        every = max(2, round(1 / val_fraction))
        for i, doc in enumerate(docs):
            yield ("val" if i % every == every - 1 else "train"), doc
    else:
        for doc in docs:
            cut = int(len(doc) * (1 - val_fraction))
            nl = doc.rfind("\n", 0, cut)
            cut = nl + 1 if nl > len(doc) // 2 else cut
            yield "train", doc[:cut]
            yield "val", doc[cut:]


def _terminated(tok: ByteTokenizer | BPETokenizer, doc: str) -> str:
    """Byte-tokenized documents end with a newline (BPE ones with the end-of-text id)."""
    return doc if tok.eos_id is not None or doc.endswith("\n") else doc + "\n"


def _encode(tok: ByteTokenizer | BPETokenizer, doc: str) -> list[int]:
    """The ids of one document as written: the reference `_encode_batches` is held to."""
    ids = tok.encode(_terminated(tok, doc))
    return ids if tok.eos_id is None else ids + [tok.eos_id]


def _encode_batches(tok: ByteTokenizer | BPETokenizer, pieces: Iterator[tuple[str, str]],
                    ) -> Iterator[tuple[str, list[int]]]:
    """(split, ids) of each piece, in order, encoded a batch at a time (`encode_batch`)."""
    batch: list[tuple[str, str]] = []
    chars = 0

    def flush() -> Iterator[tuple[str, list[int]]]:
        ids = tok.encode_batch([_terminated(tok, text) for _, text in batch])
        end = [] if tok.eos_id is None else [tok.eos_id]
        for (split, _), seq in zip(batch, ids, strict=True):
            yield split, seq + end

    for piece in pieces:
        batch.append(piece)
        chars += len(piece[1])
        if len(batch) >= ENCODE_BATCH or chars >= ENCODE_CHARS:
            yield from flush()
            batch, chars = [], 0
    if batch:
        yield from flush()


class _ShardWriter:
    """Appends token ids to `{split}_000.bin`, `{split}_001.bin`, ... of shard_tokens each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.names: list[str] = []
        self.total = 0
        self.fh = None
        self.in_shard = shard_tokens  # forces a file on the first add

    def add(self, ids: list[int]) -> None:
        while ids:
            if self.in_shard == self.shard_tokens:
                if self.fh is not None:
                    self.fh.close()
                self.names.append(f"{self.split}_{len(self.names):03d}.bin")
                self.fh, self.in_shard = (self.out / self.names[-1]).open("wb"), 0
            room = self.shard_tokens - self.in_shard
            part, ids = ids[:room], ids[room:]
            np.asarray(part, dtype=self.dtype).tofile(self.fh)
            self.in_shard += len(part)
            self.total += len(part)

    def close(self) -> dict[str, Any]:
        if self.fh is not None:
            self.fh.close()
        return {"shards": self.names, "n_tokens": self.total}


def prepare(
    sources: list[str], out_dir: str | Path, *, tokenizer: str = "bytes", vocab_size: int = 4096,
    val_fraction: float = 0.05, shard_tokens: int = 1 << 26, seed: int = 0,
) -> dict[str, Any]:
    """Tokenize sources into out_dir (meta.json, shards, tokenizer.json for BPE); returns meta."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if shard_tokens < 2:
        raise DataError(f"shard_tokens must be >= 2, got {shard_tokens}")
    if tokenizer not in ("bytes", "bpe"):
        raise DataError(f"tokenizer must be 'bytes' or 'bpe', got {tokenizer!r}")
    if tokenizer == "bpe" and vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at "
                        f"least {MIN_BPE_VOCAB} (256 bytes, the end-of-text token, one merge)")
    out = Path(out_dir)
    _check_replaceable(out)
    # Two streaming passes (three with BPE): count documents, (train BPE,) tokenize and write.
    # Memory stays at one document, whatever the corpus size.
    n_docs = sum(1 for _ in iter_documents(sources, seed))
    if n_docs == 0:
        raise DataError(f"inputs {sources} hold no text")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"  # everything is written here first
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        meta = _write(sources, work, n_docs, tokenizer=tokenizer, vocab_size=vocab_size,
                      val_fraction=val_fraction, shard_tokens=shard_tokens, seed=seed)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    swap_in(work, out)
    return meta


# What `prepare` writes; a directory holding anything else is not replaced.
_PREPARED = re.compile(r"^(meta\.json(\.tmp\d+)?|tokenizer\.json|(train|val)_\d{3,}\.bin)$")


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if not _PREPARED.match(p.name))
        if other:
            names = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
            raise DataError(f"--out {out} holds files prepare did not write ({names}); choose an "
                            f"empty or new directory")


def _write(sources: list[str], out: Path, n_docs: int, *, tokenizer: str, vocab_size: int,
           val_fraction: float, shard_tokens: int, seed: int) -> dict[str, Any]:
    def pieces() -> Iterator[tuple[str, str]]:
        return _split(iter_documents(sources, seed), n_docs, val_fraction)

    if tokenizer == "bytes":
        tok: ByteTokenizer | BPETokenizer = ByteTokenizer()
    elif tokenizer == "bpe":
        tok = train_bpe((text for split, text in pieces() if split == "train"), vocab_size)
    else:
        raise DataError(f"tokenizer must be 'bytes' or 'bpe', got {tokenizer!r}")
    spec = tok.save(out)
    dtype = token_dtype(tok.vocab_size)
    writers = {name: _ShardWriter(out, name, dtype, shard_tokens) for name in ("train", "val")}
    for split, ids in _encode_batches(tok, pieces()):
        writers[split].add(ids)
    splits = {name: w.close() for name, w in writers.items() if w.names}
    meta = {
        "version": 1, "sources": sources, "tokenizer": spec, "vocab_size": tok.vocab_size,
        "dtype": token_dtype(tok.vocab_size).name, "n_documents": n_docs, "splits": splits,
        "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
    }
    tmp = out / (META + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / META)  # meta.json appears only once every shard is written
    return meta
