"""Key-value retrieval (multi-query associative recall): many pairs, then many queries."""

from __future__ import annotations

import random

from ultramem.tasks.base import Example, Task, random_key, random_number


class KVRetrieval(Task):
    """A line of `n_pairs` pairs 'qzt: 41,' then `n_queries` lines 'qzt? 41' about random pairs."""

    name = "kv_retrieval"
    category = "key-value retrieval"

    def __init__(self, n_pairs: int = 8, n_queries: int = 4, digits: int = 2):
        if n_queries > n_pairs:
            raise ValueError(f"n_queries={n_queries} exceeds n_pairs={n_pairs}")
        self.n_pairs, self.n_queries, self.digits = n_pairs, n_queries, digits

    def example(self, rng: random.Random) -> Example:
        used: set[str] = set()
        pairs = [(random_key(rng, avoid=used), random_number(rng, self.digits))
                 for _ in range(self.n_pairs)]
        segs: list[tuple[str, bool]] = [
            ("pairs: " + ", ".join(f"{k}: {v}" for k, v in pairs) + ".\n", False)]
        for k, v in rng.sample(pairs, self.n_queries):
            segs += [(f"{k}?", False), (" " + v, True), ("\n", False)]
        return Example(tuple(segs))
