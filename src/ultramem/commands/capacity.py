"""`ultramem capacity`: the knowledge-capacity experiment (`ultramem.eval.capacity`).

Trains every architecture on a generated fact world until each fact has been seen --epochs times,
at the dense reference's activated parameters and several total sizes, and reports bits stored
per total and per active parameter:

  ultramem capacity                                   # every architecture, into runs/capacity
  ultramem capacity --archs dense,moe,ultramem_v2 --multiples 2,4 --epochs 40
  ultramem capacity --jobs 2 --out docs/results/capacity   # committed results: name the path

Finished runs are kept under --work and reused by a later invocation with the same settings, so
an interrupted experiment continues with the runs it had not finished; `--report-only` reports
the finished runs of the plan (and names the others) without training.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

PASSES_DOC = """`ultramem capacity-passes`: the same capacity runs trained for different numbers of
passes (--epochs), gathered from several reports into one table and plot of bits stored against
passes (`ultramem.eval.capacity_passes`). Trains nothing.

  ultramem capacity-passes runs/cap200 runs/cap400 runs/cap800 --out runs/passes
"""


def _floats(text: str, flag: str) -> tuple[float, ...]:
    from ultramem.cli import UsageError

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag}: give at least one number")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultramem.cli import add_threads_argument
    from ultramem.eval.capacity import (
        CAPACITY_ARCHS,
        CAPACITY_VARIANTS,
        CapacityConfig,
        WorldConfig,
    )

    d, w = CapacityConfig(), WorldConfig()
    p = sub.add_parser("capacity", help="knowledge capacity: bits of facts stored per parameter",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="all",
                   help=f"comma list of {list(CAPACITY_ARCHS)} or all (those), and the variants "
                        f"{list(CAPACITY_VARIANTS)}")
    p.add_argument("--multiples", default=",".join(f"{m:g}" for m in d.multiples),
                   help="sparse models' totals as multiples of the dense reference's")
    p.add_argument("--dense-multiples", default=",".join(f"{m:g}" for m in d.dense_multiples),
                   help="dense models' totals (wider FFNs) as multiples of the reference's")
    p.add_argument("--subjects", type=int, default=w.n_subjects, help="names in the fact world")
    p.add_argument("--relations", type=int, default=w.n_relations, help="relations per name")
    p.add_argument("--values", type=int, default=w.n_values,
                   help="possible values of each fact (log2 of it: bits per fact)")
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--ffn-hidden", type=int, default=d.ffn_hidden,
                   help="FFN width of the dense reference (sets every model's activated size)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="times each fact is seen")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--value-lr-scale", type=float, default=d.value_lr_scale,
                   help="the memory value tables' learning rate as a multiple of --lr")
    p.add_argument("--measure-every", type=int, default=d.measure_every,
                   help="epochs between measurements of the bits stored")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out,
                   help="where capacity.md/.json/.png go (committed results: name docs/results/..)")
    p.add_argument("--work", default=d.work, help="run directories (each run's result.json)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at the same time, each its own process with --threads")
    p.add_argument("--report-only", action="store_true",
                   help="write the report of the runs already finished; train nothing")
    add_threads_argument(p)
    p.set_defaults(func=run)

    q = sub.add_parser("capacity-passes", help="bits stored against passes over the facts, "
                       "from several capacity reports", description=PASSES_DOC,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("reports", nargs="+",
                   help="`ultramem capacity` --out directories (or their capacity.json); where "
                        "two hold the same run at the same passes, the first is used")
    q.add_argument("--out", default="runs/capacity-passes",
                   help="where passes.md/.json/.png go (committed results: name docs/results/..)")
    q.set_defaults(func=run_passes)


def run(args: argparse.Namespace) -> int:
    from ultramem.eval.capacity import CAPACITY_ARCHS, CapacityConfig, WorldConfig, run_capacity

    archs = CAPACITY_ARCHS if args.archs == "all" else tuple(
        a.strip() for a in args.archs.split(",") if a.strip())
    world = WorldConfig(n_subjects=args.subjects, n_relations=args.relations,
                        n_values=args.values, seed=args.seed)
    cfg = CapacityConfig(
        archs=archs, multiples=_floats(args.multiples, "--multiples"),
        dense_multiples=_floats(args.dense_multiples, "--dense-multiples"), world=world,
        d_model=args.d_model, ffn_hidden=args.ffn_hidden, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr,
        value_lr_scale=args.value_lr_scale, measure_every=args.measure_every,
        seed=args.seed, out=args.out, work=args.work, threads=args.threads or 1,
        jobs=args.jobs, report_only=args.report_only, command="ultramem " + shlex.join(sys.argv[1:])
        if sys.argv[1:2] == ["capacity"] else "ultramem capacity")
    run_capacity(cfg)
    return 0


def run_passes(args: argparse.Namespace) -> int:
    from ultramem.cli import UsageError
    from ultramem.eval.capacity_passes import capacity_passes

    command = ("ultramem " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["capacity-passes"]
               else "ultramem capacity-passes " + shlex.join(args.reports))
    try:
        result = capacity_passes(args.reports, Path(args.out), command)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"[capacity-passes] {len(result['rows'])} runs at several passes; wrote "
          f"{', '.join(result['files'])}")
    return 0
