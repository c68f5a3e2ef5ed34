"""`ultramem demo`: train the tiny model on built-in data, print loss, fact recall and a sample."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultramem.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="train the tiny model on built-in data and show results")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ultramem.demo import DemoConfig, run_demo

    run_demo(DemoConfig(steps=args.steps, seed=args.seed))
    return 0
