"""Find the needle: one marked fact hidden at a chosen depth of filler text, asked at the end."""

from __future__ import annotations

import random

from ultramem.tasks.base import Example, Task, filler, random_number

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class Needle(Task):
    """'The secret code is 7291.' placed at a depth of about `filler_chars` of text, then
    'The secret code is? 7291'. Examples cycle through `depths`; each example's group is its depth,
    so accuracy is reported over the grid of depths."""

    name = "needle"
    category = "find the needle"

    def __init__(self, filler_chars: int = 160, digits: int = 4,
                 depths: tuple[float, ...] = DEPTHS):
        if not depths or any(not 0 <= d <= 1 for d in depths):
            raise ValueError(f"depths must be a non-empty tuple of values in [0, 1], got {depths}")
        self.filler_chars, self.digits, self.depths = filler_chars, digits, tuple(depths)
        self._count = 0

    def example(self, rng: random.Random, depth: float | None = None) -> Example:
        if depth is None:
            depth = self.depths[self._count % len(self.depths)]
            self._count += 1
        code = random_number(rng, self.digits)
        before = filler(rng, round(self.filler_chars * depth))
        after = filler(rng, round(self.filler_chars * (1 - depth)))
        text = " ".join(p for p in (before, f"The secret code is {code}.", after) if p)
        return Example(((text + "\nThe secret code is?", False), (" " + code, True),
                        ("\n", False)), group=f"depth={depth:g}")

    def examples(self, n: int, seed: int = 0, split: str = "eval") -> list[Example]:
        self._count = 0
        return super().examples(n, seed, split)

    def params(self) -> dict:
        return {"filler_chars": self.filler_chars, "digits": self.digits, "depths": self.depths}
