"""Open long-context memory tasks (the seven categories of the paper's Table 2) and a parametric
fact-world task: seeded generators of `Example`s with exact scorers.

`build_tasks(size)` returns one task per category sized for a family's context length ('tiny':
256 byte tokens; 'small': 512 BPE tokens); `TASKS` maps a name to its class.
"""

from __future__ import annotations

from ultramem.tasks.base import (
    Example,
    Task,
    answer_spans,
    encode,
    exact_match,
    masked_targets,
    score_predictions,
)
from ultramem.tasks.facts import FactWorld
from ultramem.tasks.icl import ICL
from ultramem.tasks.kv_retrieval import KVRetrieval
from ultramem.tasks.long_memo import LongMemo
from ultramem.tasks.multi_hop import MultiHop
from ultramem.tasks.multi_round import MultiRound
from ultramem.tasks.needle import Needle
from ultramem.tasks.reasoning import Reasoning

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (LongMemo, MultiRound, ICL, Reasoning, Needle, KVRetrieval, MultiHop, FactWorld)
}
LONG_CONTEXT = ("long_memo", "multi_round", "icl", "reasoning", "needle", "kv_retrieval",
                "multi_hop")

# Per size: keyword arguments of each task. 'tiny' documents fit 256 bytes; 'small' ones fit 512
# tokens of a 4096-token BPE (about 2 characters per token on this text, measured).
SIZES: dict[str, dict[str, dict]] = {
    "ci": {
        "long_memo": dict(n_facts=2, filler_chars=40), "multi_round": dict(n_rounds=2),
        "icl": dict(n_shots=6), "reasoning": dict(filler_chars=40),
        "needle": dict(filler_chars=60), "kv_retrieval": dict(n_pairs=4, n_queries=2),
        "multi_hop": dict(hops=2, n_chains=2), "facts": dict(n_people=16, repeats=4),
    },
    "tiny": {
        "long_memo": dict(n_facts=3, filler_chars=110), "multi_round": dict(n_rounds=3),
        "icl": dict(n_shots=12), "reasoning": dict(filler_chars=120),
        "needle": dict(filler_chars=170), "kv_retrieval": dict(n_pairs=8, n_queries=4),
        "multi_hop": dict(hops=2, n_chains=3), "facts": dict(n_people=64, repeats=4),
    },
    "small": {
        "long_memo": dict(n_facts=4, filler_chars=500),
        "multi_round": dict(n_rounds=5, n_keys=6, sets_per_round=3),
        "icl": dict(n_shots=24, n_letters=6, n_labels=4), "reasoning": dict(filler_chars=500),
        "needle": dict(filler_chars=700), "kv_retrieval": dict(n_pairs=16, n_queries=8),
        "multi_hop": dict(hops=3, n_chains=4), "facts": dict(n_people=192, repeats=4),
    },
}


def build_tasks(size: str = "tiny", names: list[str] | tuple[str, ...] | None = None,
                ) -> dict[str, Task]:
    """Task objects by name, sized by `SIZES[size]`; names defaults to all eight."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    names = list(TASKS) if names is None else list(names)
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; known: {sorted(TASKS)}")
    return {n: TASKS[n](**SIZES[size][n]) for n in names}


__all__ = [
    "Example", "Task", "TASKS", "LONG_CONTEXT", "SIZES", "build_tasks", "encode", "answer_spans",
    "masked_targets", "exact_match", "score_predictions", "FactWorld", "ICL", "KVRetrieval",
    "LongMemo", "MultiHop", "MultiRound", "Needle", "Reasoning",
]
