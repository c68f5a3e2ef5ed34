"""Long-context memorization: facts stated first, then filler, then every fact asked at the end."""

from __future__ import annotations

import random

from ultramem.tasks.base import Example, Task, filler, random_key, random_number


class LongMemo(Task):
    """`n_facts` facts 'qzt is 481.', about `filler_chars` of text, then 'What is qzt? 481' per
    fact in a fresh order. Harder with more facts, more digits or more filler."""

    name = "long_memo"
    category = "long-context memorization"

    def __init__(self, n_facts: int = 3, digits: int = 3, filler_chars: int = 120):
        self.n_facts, self.digits, self.filler_chars = n_facts, digits, filler_chars

    def example(self, rng: random.Random) -> Example:
        used: set[str] = set()
        facts = [(random_key(rng, avoid=used), random_number(rng, self.digits))
                 for _ in range(self.n_facts)]
        head = "Remember: " + " ".join(f"{k} is {v}." for k, v in facts)
        body = head + "\n" + filler(rng, self.filler_chars) + "\n"
        segs: list[tuple[str, bool]] = [(body, False)]
        order = rng.sample(facts, len(facts))
        for k, v in order:
            segs += [(f"What is {k}?", False), (" " + v, True), ("\n", False)]
        return Example(tuple(segs))
