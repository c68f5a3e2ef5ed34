"""`ultramem init --preset NAME --out DIR`: write a freshly initialised UltraMemV2 model to disk.

For models whose value tables do not fit in memory (`umv2-227m-20b`: 20B table parameters,
20 GB as int8). The dense weights are initialised as `LM(cfg, seed=SEED)` initialises them and
saved as `model.safetensors` (float32); each memory layer's value and pre-value tables are drawn
with the paper's init (the variance-matching std of `ultramem.init`, from the same generator at
the same point, so they are `LM(cfg, seed)`'s tables), quantized to int8 per row and streamed to
one row file per layer under `DIR/tables/`, CHUNK rows at a time: memory stays at the dense
weights plus one chunk. DIR is written under a temporary name and renamed when complete; an
interrupted run leaves nothing. Serve it with `ultramem generate --checkpoint DIR --prompt TEXT`
(the tables are memory-mapped; a step reads only the rows it needs). Layout: docs/scale.md.

Examples:
  ultramem init --preset umv2-227m-20b --out models/umv2-20b
  ultramem init --preset umv2-227m-1.2b --n-keys 1000 --out models/umv2-8b
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

# Space left free on the output's file system beyond what the model takes.
SPARE_BYTES = 1 << 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultramem.cli import add_threads_argument

    p = sub.add_parser("init", help="write a freshly initialised UltraMemV2 model, tables as int8 "
                       "row files (for models larger than memory)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="model preset (`ultramem presets`)")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--n-keys", type=int, default=None,
                   help="change the preset's memory.n_keys (n_keys^2 rows per layer)")
    p.add_argument("--seed", type=int, default=0, help="init seed, as LM(cfg, seed=SEED)")
    p.add_argument("--chunk-rows", type=int, default=1 << 16,
                   help="table rows drawn, quantized and written at a time")
    add_threads_argument(p)
    p.set_defaults(func=run)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def run(args: argparse.Namespace) -> int:
    from ultramem.cli import UsageError, set_threads
    from ultramem.config import ModelConfig

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} is not an empty directory; give a new or empty one")
    if args.chunk_rows < 16:
        raise UsageError(f"--chunk-rows must be >= 16, got {args.chunk_rows}")
    cfg = ModelConfig.preset(args.preset)
    if cfg.memory is None or cfg.memory.kind != "ultramem_v2" or cfg.memory.share_group != 1:
        raise UsageError(f"--preset {args.preset}: init writes UltraMemV2 models without value "
                         f"sharing")
    if args.n_keys is not None:
        cfg = cfg.replace(memory={"n_keys": args.n_keys})  # ConfigError names a bad value
    set_threads(args.threads)

    from ultramem.accounting import count_params
    from ultramem.offload import disk_bytes, write_initialized

    need = disk_bytes(cfg)
    probe = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    if need + SPARE_BYTES > free:
        raise UsageError(f"--out {out}: the model takes {_gb(need)} on disk and only "
                         f"{_gb(free)} are free there")
    total = count_params(cfg)["total"]
    print(f"ultramem init: {args.preset}: {_params(total)} parameters, {_gb(need)} on disk",
          file=sys.stderr)
    start = time.perf_counter()
    write_initialized(cfg, out, seed=args.seed, chunk_rows=args.chunk_rows,
                      progress=lambda line: print(f"ultramem init: {line}", file=sys.stderr))
    print(f"wrote {out} ({_params(total)} parameters, {_gb(need)}) in "
          f"{time.perf_counter() - start:.0f} s; serve it with: ultramem generate --checkpoint "
          f"{out} --prompt TEXT")
    return 0
