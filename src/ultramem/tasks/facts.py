"""Parametric memory: a generated world of people and their attributes, trained on and then asked
in phrasings never seen with that fact.

Each fact has three phrasings (`ultramem.data.builtin.TEMPLATES`); one per fact is held out of the
training text, chosen by a seeded draw, and the question uses it. Every phrasing is still seen in
training with other facts, so the form is known and only the fact itself has to be recalled.
"""

from __future__ import annotations

import math
import random

from ultramem.data.builtin import ATTRIBUTES, TEMPLATES, Fact, fact_world
from ultramem.tasks.base import Example, Task


class FactWorld(Task):
    """`n_people` people x 3 attributes. `train_documents` states each fact `repeats` times in the
    phrasings not held out; `examples` asks each fact in its held-out phrasing."""

    name = "facts"
    category = "parametric memory"

    def __init__(self, n_people: int = 64, repeats: int = 4, world_seed: int = 0):
        self.n_people, self.repeats, self.world_seed = n_people, repeats, world_seed

    def facts(self) -> list[Fact]:
        return fact_world(self.n_people, seed=self.world_seed)

    def held_out(self) -> list[int]:
        """Index of the held-out template of each fact."""
        rng = random.Random(self.world_seed + 7919)
        return [rng.randrange(len(TEMPLATES[f.attribute])) for f in self.facts()]

    def example(self, rng: random.Random) -> Example:  # a random fact, held-out phrasing
        i = rng.randrange(len(self.facts()))
        return self._ask(i)

    def _ask(self, i: int) -> Example:
        f, h = self.facts()[i], self.held_out()[i]
        template = TEMPLATES[f.attribute][h]
        head, tail = template.split("{v}")
        return Example(((head.format(p=f.person).rstrip(), False), (" " + f.value, True),
                        (tail, False)), group=f.attribute)

    def examples(self, n: int | None = None, seed: int = 0, split: str = "eval") -> list[Example]:
        """Every fact once (n caps the count), in world order; seed and split are ignored."""
        count = len(self.facts()) if n is None else min(n, len(self.facts()))
        return [self._ask(i) for i in range(count)]

    def train_documents(self, n: int = 1, seed: int = 0) -> list[str]:
        """n copies of the fact text (statements shuffled per copy with seed)."""
        docs = []
        facts, held = self.facts(), self.held_out()
        for c in range(n):
            rng = random.Random(seed * 1000 + c)
            lines = []
            for f, h in zip(facts, held, strict=True):
                allowed = [t for j, t in enumerate(TEMPLATES[f.attribute]) if j != h]
                lines += [rng.choice(allowed).format(p=f.person, v=f.value)
                          for _ in range(self.repeats)]
            rng.shuffle(lines)
            docs.append("\n".join(lines) + "\n")
        return docs

    def bits_per_fact(self) -> float:
        """log2 of the number of possible values of an attribute (all attributes have as many)."""
        return math.log2(min(len(v) for v in ATTRIBUTES.values()))
