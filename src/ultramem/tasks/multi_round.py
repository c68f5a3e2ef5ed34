"""Multi-round memorization: rounds add or overwrite key-value pairs; after each round, queries
ask for the current value of keys set in that or any earlier round."""

from __future__ import annotations

import random

from ultramem.tasks.base import Example, Task, random_key, random_number


class MultiRound(Task):
    """`n_rounds` rounds 'round 2: set qa=41, qb=07.' of `sets_per_round` assignments over a pool of
    `n_keys` keys (later rounds overwrite), each followed by `queries_per_round` lines 'qa? 41'.
    The first round's queries are not answers: only from round 2 on does memory across rounds
    matter; a query after round r prefers keys last set before round r."""

    name = "multi_round"
    category = "multi-round memorization"

    def __init__(self, n_rounds: int = 3, n_keys: int = 4, sets_per_round: int = 2,
                 queries_per_round: int = 2, digits: int = 2):
        self.n_rounds, self.n_keys, self.sets_per_round = n_rounds, n_keys, sets_per_round
        self.queries_per_round, self.digits = queries_per_round, digits

    def example(self, rng: random.Random) -> Example:
        used: set[str] = set()
        keys = [random_key(rng, 2, avoid=used) for _ in range(self.n_keys)]
        current: dict[str, str] = {}
        set_in: dict[str, int] = {}
        segs: list[tuple[str, bool]] = []
        for r in range(1, self.n_rounds + 1):
            chosen = rng.sample(keys, min(self.sets_per_round, len(keys)))
            assigns = []
            for k in chosen:
                current[k] = random_number(rng, self.digits)
                set_in[k] = r
                assigns.append(f"{k}={current[k]}")
            segs.append((f"round {r}: set " + ", ".join(assigns) + ".\n", False))
            older = [k for k in current if set_in[k] < r]
            pool = older if older else list(current)
            for _ in range(self.queries_per_round):
                k = rng.choice(pool)
                segs += [(f"{k}?", False), (" " + current[k], r > 1), ("\n", False)]
        return Example(tuple(segs))
