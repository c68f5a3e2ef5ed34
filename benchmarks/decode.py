"""Decode-step benchmark: UltraMemV2 against MoE and dense, side by side in one process.

For every thread count (`--threads`, default 1,2) and weight dtype (`--dtypes`: fp32, and the
serving path of `ultramem.serve.prepare_for_serving`: bf16 or int8) it times, median of repeated
runs, without gradients:
- the sparse layer alone at the `--layer-families` shapes (one block's layer of the matched
  presets): UltraMemV2's memory layer, the MoE layer and the dense FFN; "ffn_side_ms" is FFN +
  memory for UltraMemV2 (what replaces a dense FFN);
- one decode step of the whole model of each of `--families` against a KV cache holding
  `--context` tokens (random keys and values: attention cost depends only on the length).
Ratios are UltraMemV2's speed over the MoE's (same family, dtype, threads, batch). Layer rows also
report the weight bytes the call touched (distinct value rows and experts from the real routing)
and the floor: touched bytes / this machine's measured random-row gather bandwidth.

    python benchmarks/decode.py                    # table + runs/benchmarks/decode.{json,png}
    python benchmarks/decode.py --quick            # tiny family, for a smoke run
    python benchmarks/decode.py --out docs/benchmarks/decode.json   # to publish a run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from ultramem import LM, ModelConfig
from ultramem.accounting import count_params, decode_bytes
from ultramem.model import KVCache
from ultramem.serve import Int8Linear, PackedLinear, prepare_for_serving

ARCHS = ("ultramem_v2", "moe", "dense")
BYTES = {"fp32": 4, "bf16": 2, "int8": 2}  # value tables and experts (int8 touches only linears)


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _interleaved_ms(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median ms of each fn, timed in turns (one call of each per round) so that the load of a
    shared machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def gather_bandwidth(rows: int = 1 << 20, width: int = 128, picks: int = 65536,
                     repeats: int = 9) -> float:
    """Bytes/s of random-row gathers (index_select) from a table far larger than the caches."""
    table = torch.randn(rows, width)
    idx = torch.randint(0, rows, (picks,))
    out = torch.empty(picks, width)
    ms = _median_ms(lambda: torch.index_select(table, 0, idx, out=out), repeats)
    return picks * width * 4 / (ms / 1e3)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_bytes(module: torch.nn.Module) -> int:
    """Weight bytes of a module, counting serving linears (packed bf16, int8) too."""
    total = _bytes(module.parameters())
    for sub in module.modules():
        if isinstance(sub, PackedLinear):
            total += sub.in_features * sub.out_features * 2
        elif isinstance(sub, Int8Linear):
            total += _bytes(sub.buffers())
    return total


def touched_bytes(arch: str, block, u: torch.Tensor) -> float:
    """Weight bytes a forward of u actually reads in the block's sparse layer (or FFN)."""
    if arch == "dense":
        return float(_module_bytes(block.ffn))
    layer = block.memory
    if arch == "moe":
        _, _, experts = layer.route(u)
        per_expert = _bytes([layer.gate[0], layer.up[0], layer.down[0]])
        return float(experts.unique().numel() * per_expert + _bytes([layer.router.weight]))
    rows = layer.table_rows(layer.decode_step.retrieve(u.reshape(-1, u.shape[-1]))[1])
    tables = [t for t in layer.tables() if t is not None]
    per_row = sum(t.shape[1] * t.element_size() for t in tables)
    dense = _bytes(layer.parameters()) - _bytes(tables)
    return float(rows.unique().numel() * per_row + dense)


def _layer_models(family: str) -> dict:
    models = {}
    for arch in ARCHS:
        cfg = ModelConfig.preset(f"{family}/{arch}").replace(n_layers=1, vocab_size=256)
        models[arch] = (cfg, LM(cfg, seed=0).eval())
    return models


def bench_layers(family: str, dtypes: list[str], threads: list[int], batches: list[int],
                 repeats: int, bandwidth: float) -> list[dict]:
    rows = []
    models = _layer_models(family)
    h = models["dense"][0].d_model
    for dtype in dtypes:
        for arch in ARCHS:
            prepare_for_serving(models[arch][1], dtype)
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for batch in batches:
                u = torch.randn(batch, h, generator=torch.Generator().manual_seed(batch))
                u = u.to(models["dense"][1].embed.weight.dtype)
                blocks = {arch: models[arch][1].blocks[0] for arch in ARCHS}
                fns = {arch: (lambda layer=(b.ffn if arch == "dense" else b.memory), u=u:
                              layer(u)) for arch, b in blocks.items()}
                um = blocks["ultramem_v2"]
                fns["side"] = lambda b=um, u=u: b.ffn(u) + b.memory(u)
                with torch.no_grad():
                    times = _interleaved_ms(fns, repeats)
                for arch in ARCHS:
                    with torch.no_grad():
                        touched = touched_bytes(arch, blocks[arch], u)
                    ms = times[arch]
                    rows.append({
                        "scope": f"layer:{family}", "arch": arch, "dtype": dtype,
                        "threads": n_threads, "batch": batch, "ms": ms,
                        "ffn_side_ms": times["side"] if arch == "ultramem_v2" else ms,
                        "tokens_per_s": batch / (ms / 1e3), "bytes_touched": touched,
                        "floor_ms": touched / bandwidth * 1e3,
                    })
    return rows


def _filled_cache(model: LM, batch: int, context: int) -> KVCache:
    cache = KVCache.for_model(model, batch, capacity=context + 1)
    gen = torch.Generator().manual_seed(batch)
    for store in (cache.keys, cache.values):
        for buf in store:
            buf.copy_(torch.randn(buf.shape, generator=gen))
    cache.pos = context
    return cache


def bench_model(family: str, dtypes: list[str], threads: list[int], batches: list[int],
                repeats: int, context: int) -> list[dict]:
    rows = []
    cfgs = {arch: ModelConfig.preset(f"{family}/{arch}") for arch in ARCHS}
    models = {arch: LM(cfg, seed=0).eval() for arch, cfg in cfgs.items()}
    for dtype in dtypes:  # in order, each cast from the previous (fp32 first)
        for model in models.values():
            prepare_for_serving(model, dtype)
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for batch in batches:
                gen = torch.Generator().manual_seed(batch)
                nxt = torch.randint(0, cfgs["dense"].vocab_size, (batch, 1), generator=gen)
                caches = {arch: _filled_cache(m, batch, context) for arch, m in models.items()}

                def step(arch, nxt=nxt, caches=caches, models=models):
                    caches[arch].pos = context  # overwrite one slot: every step is the same
                    models[arch](nxt, cache=caches[arch])

                with torch.no_grad():
                    times = _interleaved_ms({a: (lambda a=a: step(a)) for a in ARCHS}, repeats)
                for arch in ARCHS:
                    counts = count_params(cfgs[arch])
                    rows.append({
                        "scope": f"model:{family}", "arch": arch, "dtype": dtype,
                        "threads": n_threads, "batch": batch, "ms": times[arch],
                        "tokens_per_s": batch / (times[arch] / 1e3),
                        "bytes_predicted": decode_bytes(cfgs[arch], batch, BYTES[dtype])["total"],
                        "active_params": counts["active"], "total_params": counts["total"],
                    })
                del caches
    del models
    gc.collect()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """vs_moe: the MoE's ms over this row's ms (same scope, dtype, threads, batch)."""
    key = {(r["scope"], r["arch"], r["dtype"], r["threads"], r["batch"]): r for r in rows}
    for r in rows:
        moe = key.get((r["scope"], "moe", r["dtype"], r["threads"], r["batch"]))
        r["vs_moe"] = moe["ms"] / r["ms"] if moe else None
        fp32 = key.get((r["scope"], r["arch"], "fp32", r["threads"], r["batch"]))
        r["vs_fp32"] = fp32["ms"] / r["ms"] if fp32 else None


def print_table(rows: list[dict]) -> None:
    print(f"{'scope':<14} {'dtype':<5} {'thr':>3} {'batch':>5} "
          + " ".join(f"{a[:7] + ' ms':>10}" for a in ARCHS)
          + f" {'UMv2 tok/s':>10} {'UMv2/MoE':>8} {'vs fp32':>7} {'UMv2/floor':>10}")
    seen = []
    for r in rows:
        k = (r["scope"], r["dtype"], r["threads"], r["batch"])
        if k not in seen:
            seen.append(k)
    by = {(r["scope"], r["dtype"], r["threads"], r["batch"], r["arch"]): r for r in rows}
    for k in seen:
        group = {a: by.get((*k, a)) for a in ARCHS}
        um = group["ultramem_v2"]
        ms = " ".join(f"{group[a]['ms']:>10.3f}" if group[a] else f"{'-':>10}" for a in ARCHS)
        floor = f"{um['ms'] / um['floor_ms']:>9.2f}x" if um and "floor_ms" in um else f"{'-':>10}"
        vs32 = f"{um['vs_fp32']:>6.2f}x" if um and um.get("vs_fp32") else f"{'-':>7}"
        ratio = f"{um['vs_moe']:>7.2f}x" if um and um.get("vs_moe") else f"{'-':>8}"
        tok = f"{um['tokens_per_s']:>10.1f}" if um else f"{'-':>10}"
        print(f"{k[0]:<14} {k[1]:<5} {k[2]:>3} {k[3]:>5} {ms} {tok} {ratio} {vs32} {floor}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["scope"], r["threads"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (scope, n_threads) in zip(axes[0], panels, strict=True):
        for arch in ARCHS:
            for dtype in sorted({r["dtype"] for r in rows}):
                pts = [r for r in rows if (r["scope"], r["threads"], r["arch"], r["dtype"])
                       == (scope, n_threads, arch, dtype)]
                if pts:
                    ax.plot([p["batch"] for p in pts], [p["ms"] / p["batch"] for p in pts],
                            "o-" if dtype == "fp32" else "s--", label=f"{arch} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per token (one decode step / batch)")
        ax.set_title(f"{scope}, {n_threads} thread(s)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="227m,small",
                        help="matched families for the whole model ('' for none)")
    parser.add_argument("--layer-families", default="227m,small",
                        help="matched families for the layer alone ('' for none)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32, bf16, int8 (in this order)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls (227m: at most 5)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--out", default="runs/benchmarks/decode.json")
    parser.add_argument("--quick", action="store_true", help="tiny family, few repeats")
    args = parser.parse_args()
    if args.quick:
        args.families = args.layer_families = "tiny"
        args.repeats, args.batches = 3, "1,8,64"
    batches, threads = _ints(args.batches), _ints(args.threads)
    dtypes = [d for d in ("fp32", "bf16", "int8") if d in args.dtypes.split(",")]
    torch.manual_seed(0)
    torch.set_num_threads(threads[0])
    bandwidth = gather_bandwidth()
    print(f"torch {torch.__version__}, threads {threads}, gather bandwidth "
          f"{bandwidth / 1e9:.2f} GB/s ({threads[0]} thread)")
    rows = []
    for fam in [f for f in args.layer_families.split(",") if f]:
        reps = min(args.repeats, 5) if fam == "227m" else args.repeats
        rows += bench_layers(fam, dtypes, threads, batches, reps, bandwidth)
    for fam in [f for f in args.families.split(",") if f]:
        reps = min(args.repeats, 5) if fam == "227m" else args.repeats
        rows += bench_model(fam, dtypes, threads, batches, reps, args.context)
    add_ratios(rows)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/decode.py " + " ".join(
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "quick"),
        "commit": _commit(), "torch": torch.__version__, "threads": threads,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "gather_bandwidth_bytes_per_s": bandwidth, "dtypes": dtypes}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
