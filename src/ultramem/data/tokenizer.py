"""Tokenizers: raw bytes, and a byte-level BPE trained locally with the `tokenizers` library.

A tokenizer is described by a small JSON-able spec saved beside the data and in checkpoints:
`{"kind": "bytes"}` or `{"kind": "bpe", "file": "tokenizer.json"}` (the file sits in the same
directory as the spec). `load_tokenizer(spec, directory)` turns a spec back into a tokenizer.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

EOS_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def spec(self) -> dict[str, Any]: ...

    def save(self, directory: Path) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no end-of-text token (documents end with '\\n')."""

    vocab_size = 256
    eos_id = None
    path = None  # no tokenizer file

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": 256}

    def save(self, directory: Path) -> dict[str, Any]:
        return self.spec()


class BPETokenizer:
    """A byte-level BPE (`tokenizers.Tokenizer`) with `<|endoftext|>` as id 0."""

    def __init__(self, tok: Any, path: Path | None = None):
        self.tok, self.path = tok, path
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, computed in parallel by `tokenizers` (same ids)."""
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def spec(self) -> dict[str, Any]:
        return {"kind": "bpe", "file": "tokenizer.json", "vocab_size": self.vocab_size}

    def save(self, directory: Path) -> dict[str, Any]:
        """Write tokenizer.json into directory; returns the spec."""
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "tokenizer.json"
        if self.path is not None and self.path.resolve() != target.resolve():
            shutil.copyfile(self.path, target)
        elif self.path is None:
            self.tok.save(str(target))
        return self.spec()


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE on texts locally (no download)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size: a byte-level BPE needs > 257 tokens, got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(spec: dict[str, Any], directory: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a spec describes; BPE files are looked up in directory."""
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory) / spec.get("file", "tokenizer.json")
        if not path.is_file():
            raise FileNotFoundError(f"BPE tokenizer file {path} is missing")
        return BPETokenizer(HFTokenizer.from_file(str(path)), path)
    raise ValueError(f"tokenizer kind must be 'bytes' or 'bpe', got {kind!r}")
