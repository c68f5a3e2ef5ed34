"""`ultramem presets`: every preset with its activated and total parameters, forward FLOPs per
token and the weight bytes one decode step reads at batch 1 and 64 (bf16), from
`ultramem.accounting.summarize`."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list presets with parameters, FLOPs and decode bytes")
    p.add_argument("--family", default=None,
                   help="only the presets whose name starts with this (e.g. tiny, 227m)")
    p.set_defaults(func=run)


def _size(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def table(names: list[str] | None = None) -> list[str]:
    """The table's lines (header first)."""
    from ultramem.accounting import summarize
    from ultramem.config import PRESETS, ModelConfig

    lines = [f"{'preset':<20} {'kind':<12} {'layers':>6} {'d_model':>7} {'active':>9} "
             f"{'total':>9} {'GFLOP/tok':>9} {'dec B=1 (sparse)':>18} {'dec B=64 (sparse)':>18}"]
    for name in names or list(PRESETS):
        cfg = ModelConfig.preset(name)
        s = summarize(cfg)
        kind = cfg.memory.kind if cfg.memory is not None else "dense"
        b1, b64 = s["decode_bytes"](1), s["decode_bytes"](64)
        lines.append(
            f"{name:<20} {kind:<12} {cfg.n_layers:>6} {cfg.d_model:>7} "
            f"{_size(s['active_params']):>9} {_size(s['total_params']):>9} "
            f"{s['flops_per_token'] / 1e9:>9.3f} "
            f"{_size(b1['total']) + 'B (' + _size(b1['sparse']) + ')':>18} "
            f"{_size(b64['total']) + 'B (' + _size(b64['sparse']) + ')':>18}"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    from ultramem.config import PRESETS

    names = [n for n in PRESETS if args.family is None or n.startswith(args.family)]
    if not names:
        families = sorted({n.split("/")[0] for n in PRESETS})
        print(f"ultramem presets: no preset name starts with {args.family!r}; names start with "
              f"one of {families}", file=sys.stderr)
        return 2
    print("\n".join(table(names)))
    print("FLOPs: forward, context = max_seq_len. dec: weight bytes read per decode step at "
          "batch B (bf16), total (sparse part)")
    return 0
