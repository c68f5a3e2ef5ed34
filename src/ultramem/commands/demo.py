"""`ultramem demo`: train the tiny model on built-in data, print loss, fact recall and a sample."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultramem.cli import add_threads_argument
    from ultramem.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="train the tiny model on built-in data and show results",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="validate and keep a checkpoint every N steps; the best is reported")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out,
                   help="run directory (replaced only if a previous demo wrote it)")
    add_threads_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ultramem.cli import set_threads
    from ultramem.demo import DemoConfig, run_demo

    set_threads(args.threads)
    try:
        cfg = DemoConfig(steps=args.steps, eval_every=args.eval_every, seed=args.seed,
                         out=args.out)
        if cfg.steps < 1 or cfg.eval_every < 1:
            raise ValueError("--steps and --eval-every must be >= 1")
        run_demo(cfg)
    except ValueError as err:
        print(f"ultramem demo: {err}", file=sys.stderr)
        return 2
    return 0
