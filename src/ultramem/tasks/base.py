"""What every task shares: an `Example` of text segments with marked answers, and the scorers.

An example is a document cut into segments, some marked as answers. The same object serves
training (token ids plus a loss mask over the answer tokens, `encode` / `masked_targets`) and
evaluation (one `(prompt, gold)` query per answer span, `queries`). Answers are a space followed by
letters or digits and are followed by punctuation or whitespace, so a byte-level BPE tokenizes a
segment the same way alone as inside the whole text (its pre-tokenizer splits there).
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

ANSWER = re.compile(r"^ [A-Za-z0-9]+$")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Example:
    """A document: (text, is_answer) segments. `group` labels a slice of a task (needle depth)."""

    segments: tuple[tuple[str, bool], ...]
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for text, is_answer in self.segments:
            if is_answer and not ANSWER.match(text):
                raise ValueError(f"answer segment {text!r} must be ' ' + letters/digits")

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)

    def answers(self) -> list[str]:
        return [t for t, a in self.segments if a]

    def queries(self) -> list[tuple[str, str]]:
        """(prompt, gold) per answer span; the prompt is all text before it (earlier golds too)."""
        out, before = [], ""
        for text, is_answer in self.segments:
            if is_answer:
                out.append((before, text))
            before += text
        return out


class Task:
    """A seeded generator of examples. Subclasses set `name`, `category` and `example(rng)`."""

    name = "task"
    category = ""

    def example(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def _rng(self, seed: int, split: str) -> random.Random:
        # Train and eval draw from disjoint streams of the same generator.
        return random.Random(zlib.crc32(f"{self.name}/{split}/{seed}".encode()))

    def examples(self, n: int, seed: int = 0, split: str = "eval") -> list[Example]:
        rng = self._rng(seed, split)
        return [self.example(rng) for _ in range(n)]

    def train_documents(self, n: int, seed: int = 0) -> list[str]:
        """n training documents (answers included), from a stream disjoint from `examples`."""
        return [e.text for e in self.examples(n, seed, split="train")]

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------ encoding


def encode(example: Example, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of the example and a mask that is True on answer tokens."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_answer in example.segments:
        part = tokenizer.encode(text)
        ids += part
        mask += [is_answer] * len(part)
    return ids, mask


def answer_spans(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) token ranges of consecutive True runs."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def masked_targets(ids: list[int], mask: list[bool]) -> tuple[list[int], list[int]]:
    """(inputs, targets) for `LM(idx, targets)`: inputs ids[:-1]; the target at position j is
    ids[j + 1] where token j + 1 is an answer token, else -100 (ignored)."""
    x = ids[:-1]
    y = [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
    return x, y


# ------------------------------------------------------------------------------ scorers


def first_field(prediction: str) -> str:
    """The first whitespace/punctuation-delimited field of a generated continuation."""
    m = re.match(r"\s*([A-Za-z0-9]*)", prediction)
    return m.group(1) if m else ""


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the continuation's first field is the gold answer exactly, else 0.0.

    ' 4831.' and ' 4831\\n...' match gold ' 4831'; ' 48310', ' 483' and '' do not.
    """
    return float(first_field(prediction) == gold.strip() and gold.strip() != "")


def score_predictions(predictions: list[str], golds: list[str]) -> float:
    """Mean exact match; raises when the lists differ in length."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")
    if not golds:
        return 0.0
    return sum(map(exact_match, predictions, golds)) / len(golds)


# ------------------------------------------------------------------------------ shared pieces


def random_key(rng: random.Random, length: int = 3, avoid: set[str] | None = None) -> str:
    """A fresh lowercase key, distinct from those in avoid (which it joins)."""
    while True:
        key = "".join(rng.choice(LETTERS) for _ in range(length))
        if avoid is None or key not in avoid:
            if avoid is not None:
                avoid.add(key)
            return key


def random_number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits))


_WORDS: list[str] | None = None


def filler_words() -> list[str]:
    """Words of English text shipped with Python (see `ultramem.tasks.text`), cached."""
    global _WORDS
    if _WORDS is None:
        from ultramem.tasks.text import stdlib_text

        _WORDS = [w for w in stdlib_text("train").split() if w.isascii()]
    return _WORDS


def filler(rng: random.Random, n_chars: int) -> str:
    """About n_chars of running text (a random slice of the filler words), '' for n_chars <= 0."""
    if n_chars <= 0:
        return ""
    words = filler_words()
    start = rng.randrange(len(words))
    out, size = [], 0
    while size < n_chars:
        w = words[(start + len(out)) % len(words)]
        out.append(w)
        size += len(w) + 1
    return " ".join(out)
