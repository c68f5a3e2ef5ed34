"""In-context learning: a label rule drawn fresh per sequence, shown by examples, applied to new
inputs. The rule maps an input word's first letter to a label, so a query word itself was never
seen: only the rule inferred from the context answers it."""

from __future__ import annotations

import random

from ultramem.tasks.base import LETTERS, Example, Task

LABELS = ("red", "blue", "green", "gold", "gray", "pink", "tan", "teal")


class ICL(Task):
    """Lines 'bqx -> red' for `n_shots` random 3-letter words whose first letter is one of
    `n_letters` letters; a fresh random map letter -> one of `n_labels` labels per sequence.
    Every line whose first letter appeared in an earlier line is an answer (the model must apply
    the rule to an unseen word); earlier lines are demonstrations."""

    name = "icl"
    category = "in-context learning"

    def __init__(self, n_shots: int = 12, n_letters: int = 4, n_labels: int = 3):
        if n_labels > len(LABELS):
            raise ValueError(f"n_labels: at most {len(LABELS)}, got {n_labels}")
        self.n_shots, self.n_letters, self.n_labels = n_shots, n_letters, n_labels

    def example(self, rng: random.Random) -> Example:
        letters = rng.sample(LETTERS, self.n_letters)
        labels = rng.sample(LABELS, self.n_labels)
        rule = {c: rng.choice(labels) for c in letters}
        seen: set[str] = set()
        words: set[str] = set()
        segs: list[tuple[str, bool]] = []
        for _ in range(self.n_shots):
            c = rng.choice(letters)
            while True:
                w = c + "".join(rng.choice(LETTERS) for _ in range(2))
                if w not in words:
                    words.add(w)
                    break
            segs += [(f"{w} ->", False), (" " + rule[c], c in seen), ("\n", False)]
            seen.add(c)
        return Example(tuple(segs))
