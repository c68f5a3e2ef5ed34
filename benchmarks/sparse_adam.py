"""The lazy Adam table update: the readable form against the fast one, side by side.

One full-size layer of a preset (default umv2-227m-1.2b: two tables of 123,904 rows, widths 192
and 192), the rows a step of `--tokens` tokens reads (`accounting.expected_rows`, drawn at
random), a fresh random gradient each repeat. Each repeat runs both forms on their own copies
of the same table and moments, in alternating order, so load on a shared machine hits both
alike; reported: the median seconds per layer of each and their ratio, and the largest
difference between the two tables afterwards.

    python benchmarks/sparse_adam.py                 # table + runs/benchmarks/sparse_adam.json
    python benchmarks/sparse_adam.py --threads 2 --out docs/benchmarks/sparse_adam.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def run(preset: str, tokens: int, repeats: int) -> dict:
    import torch

    from ultramem import accounting
    from ultramem.config import ModelConfig
    from ultramem.train.sparse import Workspace, lazy_adam_rows, lazy_adam_rows_reference

    cfg = ModelConfig.preset(preset)
    table, mem = accounting.sparse_tables(cfg)[0], cfg.memory
    rows = int(accounting.expected_rows(table, tokens))
    gen = torch.Generator().manual_seed(0)
    widths = (mem.value_dim, mem.pre_value_dim)

    def fresh(d: int) -> list:
        return [torch.randn(table.rows, d, generator=gen), torch.zeros(table.rows, d),
                torch.zeros(table.rows, d), torch.zeros(table.rows, dtype=torch.int64)]

    ours = [fresh(d) for d in widths]
    ref = [[t.clone() for t in s] for s in ours]
    ws = Workspace()
    hyper = dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, wd=0.0)
    times: dict[str, list[float]] = {"reference": [], "fast": []}
    for r in range(repeats):
        picked = torch.randperm(table.rows, generator=gen)[:rows].sort().values
        grads = [torch.randn(rows, d, generator=gen) for d in widths]
        order = ("reference", "fast") if r % 2 == 0 else ("fast", "reference")
        for form in order:
            t0 = time.perf_counter()
            for state, g in zip(ours if form == "fast" else ref, grads, strict=True):
                if form == "fast":
                    lazy_adam_rows(*state, picked, g, **hyper, ws=ws)
                else:
                    lazy_adam_rows_reference(*state, picked, g, **hyper)
            times[form].append(time.perf_counter() - t0)
    diff = max(float((a[0] - b[0]).abs().max()) for a, b in zip(ours, ref, strict=True))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first warms up
    return {"preset": preset, "tokens": tokens, "rows": rows, "table_rows": table.rows,
            "widths": widths, "repeats": repeats, "threads": torch.get_num_threads(),
            "seconds": times, "median_s": med, "speedup": med["reference"] / med["fast"],
            "max_abs_diff_after": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="umv2-227m-1.2b")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per optimizer step")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/benchmarks/sparse_adam.json")
    args = p.parse_args(argv)
    import torch

    from ultramem.eval.study import git_commit

    torch.set_num_threads(args.threads)
    res = run(args.preset, args.tokens, args.repeats)
    res.update(command=" ".join([Path(sys.executable).name, *sys.argv]), git_commit=git_commit(),
               machine={"platform": platform.platform(), "threads": args.threads})
    print(f"{args.preset}: one layer's two tables, {res['rows']:,} of {res['table_rows']:,} rows "
          f"({args.tokens} tokens), {args.threads} thread(s), median of {args.repeats - 1}\n")
    print("| form | seconds per layer | speed-up |\n|---|---|---|")
    print(f"| reference (`lazy_adam_rows_reference`) | {res['median_s']['reference']:.3f} | 1.00 |")
    print(f"| fast (`lazy_adam_rows`, RowSparseAdam) | {res['median_s']['fast']:.3f} | "
          f"{res['speedup']:.2f} |")
    print(f"\nlargest |difference| of the tables after {args.repeats} steps: "
          f"{res['max_abs_diff_after']:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
