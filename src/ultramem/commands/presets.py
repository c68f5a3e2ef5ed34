"""`ultramem presets`: every preset with its activated and total parameters."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list presets with their parameter counts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ultramem.accounting import count_params
    from ultramem.config import PRESETS, ModelConfig

    print(f"{'preset':<18} {'layers':>6} {'d_model':>7} {'active':>10} {'total':>10}")
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        counts = count_params(cfg)
        print(f"{name:<18} {cfg.n_layers:>6} {cfg.d_model:>7} "
              f"{counts['active'] / 1e6:>9.1f}M {counts['total'] / 1e6:>9.1f}M")
    return 0
