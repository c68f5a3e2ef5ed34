"""What the study and its report share, so neither imports the other: the UltraMemV2
ablations, the paper's Table 2, and how runs are named and where they live."""

from __future__ import annotations

from pathlib import Path

# Ablations of the family's ultramem_v2 member: name -> description (`run_configs` applies them).
ABLATIONS: dict[str, str] = {
    "plain_values": "plain values weighted by the scores alone, no PEER-style pre-values "
                    "(pre_value_dim=0; fewer total parameters, everything else equal)",
    "fixed_init": "values initialized with fixed std 0.02 instead of the paper's variance match",
    "shared_query": "one row/column query shared by all Tucker ranks (the reference code)",
    "half_layers": "a memory layer in every other block only (small: 4 of 8 blocks)",
    "both_ends": "pre-selection from both ends of the rank-1 rankings at the same rowcol_topk "
                 "(2 kr^2 candidates, twice the paper's)",
    "both_ends_equal": "pre-selection from both ends with rowcol_topk / sqrt(2) from each "
                       "(about the paper's kr^2 candidates)",
}

# The paper's Table 2 (32K context), UltraMemV2 vs MoE, for the task matching each category.
PAPER_TABLE2: dict[str, tuple[float, float]] = {
    "long_memo": (23.5, 21.9), "multi_round": (31.2, 25.0), "icl": (29.5, 21.6),
    "reasoning": (7.7, 6.7), "needle": (97.0, 96.5), "kv_retrieval": (57.1, 41.3),
    "multi_hop": (17.7, 34.8),
}


def base_name(name: str) -> str:
    """The run a seed repeat belongs to: 'moe@seed1' -> 'moe'."""
    return name.split("@", 1)[0]


def run_dir(work: Path, name: str) -> Path:
    """The run directory of a study run ('ultramem_v2+fixed_init@seed1' -> ..._fixed_init_seed1)."""
    return work / name.replace("+", "_").replace("@", "_")


__all__ = ["ABLATIONS", "PAPER_TABLE2", "base_name", "run_dir"]
