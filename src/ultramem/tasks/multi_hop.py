"""Multi-hop: chains of references to follow (qa = qb. qb = qc. qc = 7. What is qa? 7)."""

from __future__ import annotations

import random

from ultramem.tasks.base import Example, Task, random_key


class MultiHop(Task):
    """`n_chains` chains of `hops` references each ending in a digit, statements shuffled, then
    'qa = ? 7' for the head of each chain in a fresh order. hops=1 is a direct lookup."""

    name = "multi_hop"
    category = "multi-hop reasoning"

    def __init__(self, hops: int = 2, n_chains: int = 2):
        if hops < 1:
            raise ValueError(f"hops must be >= 1, got {hops}")
        self.hops, self.n_chains = hops, n_chains

    def example(self, rng: random.Random) -> Example:
        used: set[str] = set()
        statements, heads = [], []
        for _ in range(self.n_chains):
            names = [random_key(rng, 2, avoid=used) for _ in range(self.hops)]
            value = str(rng.randrange(10))
            for a, b in zip(names, names[1:] + [value], strict=True):
                statements.append(f"{a} = {b}.")
            heads.append((names[0], value))
        rng.shuffle(statements)
        segs: list[tuple[str, bool]] = [(" ".join(statements) + "\n", False)]
        for head, value in rng.sample(heads, len(heads)):
            segs += [(f"{head} = ?", False), (" " + value, True), ("\n", False)]
        return Example(tuple(segs))
