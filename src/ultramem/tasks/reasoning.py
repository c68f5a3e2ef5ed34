"""Long-context reasoning: a sum over numbers stated at scattered places in the context."""

from __future__ import annotations

import random

from ultramem.tasks.base import Example, Task, filler, random_key


class Reasoning(Task):
    """`n_vars` statements 'Let qz be 4.' spread through about `filler_chars` of text, then
    'qz + bf = ? 11' for a sum of `n_terms` of them (single-digit values)."""

    name = "reasoning"
    category = "long-context reasoning"

    def __init__(self, n_vars: int = 3, n_terms: int = 2, filler_chars: int = 120):
        if not 1 <= n_terms <= n_vars:
            raise ValueError(f"n_terms must lie in [1, n_vars={n_vars}], got {n_terms}")
        self.n_vars, self.n_terms, self.filler_chars = n_vars, n_terms, filler_chars

    def example(self, rng: random.Random) -> Example:
        used: set[str] = set()
        values = {random_key(rng, 2, avoid=used): rng.randrange(10) for _ in range(self.n_vars)}
        piece = self.filler_chars // (self.n_vars + 1)
        text = ""
        for k, v in values.items():
            text += filler(rng, piece) + f" Let {k} be {v}. "
        text += filler(rng, piece) + "\n"
        terms = rng.sample(list(values), self.n_terms)
        question = " + ".join(terms) + " = ?"
        answer = " " + str(sum(values[k] for k in terms))
        return Example(((text.lstrip() + question, False), (answer, True), ("\n", False)))
