"""Decode-step benchmark: UltraMemV2 against MoE and dense, side by side in one process.

For each batch size it times (median of repeated runs, no grad, float32 on this CPU):
- the sparse layer alone, built at the `--layer-family` shapes (default 227m: one block's layer of
  the paper-sized matched presets): UltraMemV2's memory layer, the MoE layer, and the dense FFN;
  also "block FFN side" = FFN + memory for UltraMemV2 (what replaces a dense FFN), MoE alone;
- one decode step of the whole model of `--family` (default small) with a KV cache holding a
  `--context`-token prompt.
It reports ms per step, tokens/s, weight bytes actually touched (distinct value rows and experts
counted from the real routing) against `ultramem.accounting.decode_bytes`, and the floor: bytes
touched divided by this machine's measured gather bandwidth.

    python benchmarks/decode.py                    # table + docs/benchmarks/decode.json + plot
    python benchmarks/decode.py --quick            # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
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

ARCHS = ("ultramem_v2", "moe", "dense")
BYTES = 4  # float32 weights on this CPU


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gather_bandwidth(rows: int = 1 << 20, width: int = 128, picks: int = 65536,
                     repeats: int = 9) -> float:
    """Bytes/s of random-row gathers (index_select) from a table far larger than the caches."""
    table = torch.randn(rows, width)
    idx = torch.randint(0, rows, (picks,))
    out = torch.empty(picks, width)
    ms = _median_ms(lambda: torch.index_select(table, 0, idx, out=out), repeats)
    return picks * width * 4 / (ms / 1e3)


def _params_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) * BYTES


def touched_bytes(arch: str, block, u: torch.Tensor) -> float:
    """Weight bytes a forward of u actually reads in the block's sparse layer (or FFN)."""
    if arch == "dense":
        return float(_params_bytes(block.ffn))
    layer = block.memory
    if arch == "moe":
        _, _, experts = layer.route(u)
        per_expert = (layer.gate[0].numel() + layer.up[0].numel() + layer.down[0].numel()) * BYTES
        return float(experts.unique().numel() * per_expert + layer.router.weight.numel() * BYTES)
    _, rows = layer.retrieve(u)
    cfg = layer.cfg
    tables = sum(t.numel() for t in layer.tables() if t is not None)
    dense = _params_bytes(layer) - tables * BYTES
    return float(rows.unique().numel() * (cfg.value_dim + cfg.pre_value_dim) * BYTES + dense)


def predicted_bytes(arch: str, cfg: ModelConfig, block, batch: int) -> float:
    """The cost model's prediction for the same layer (sparse part + the layer's dense weights)."""
    if arch == "dense":
        return float(_params_bytes(block.ffn))
    layer = block.memory
    sparse = decode_bytes(cfg, batch, BYTES)["sparse"]  # one-layer config: this layer's tables
    if arch == "moe":
        return sparse + layer.router.weight.numel() * BYTES
    tables = sum(t.numel() for t in layer.tables() if t is not None)
    return sparse + _params_bytes(layer) - tables * BYTES


def bench_layers(family: str, batches: list[int], repeats: int, bandwidth: float) -> list[dict]:
    rows = []
    models = {}
    for arch in ARCHS:
        cfg = ModelConfig.preset(f"{family}/{arch}").replace(n_layers=1, vocab_size=256)
        models[arch] = (cfg, LM(cfg, seed=0).eval())
    h = models["dense"][0].d_model
    for batch in batches:
        u = torch.randn(batch, h, generator=torch.Generator().manual_seed(batch))
        for arch in ARCHS:
            cfg, model = models[arch]
            block = model.blocks[0]
            with torch.no_grad():
                layer = block.ffn if arch == "dense" else block.memory
                ms = _median_ms(lambda layer=layer, u=u: layer(u), repeats)
                side = ms
                if arch == "ultramem_v2":
                    side = _median_ms(lambda b=block, u=u: b.ffn(u) + b.memory(u), repeats)
                touched = touched_bytes(arch, block, u)
            rows.append({
                "scope": f"layer:{family}", "arch": arch, "batch": batch, "ms": ms,
                "ffn_side_ms": side, "tokens_per_s": batch / (ms / 1e3),
                "bytes_touched": touched,
                "bytes_predicted": predicted_bytes(arch, cfg, block, batch),
                "floor_ms": touched / bandwidth * 1e3,
            })
    return rows


def bench_model(family: str, batches: list[int], repeats: int, context: int,
                bandwidth: float) -> list[dict]:
    rows = []
    for arch in ARCHS:
        cfg = ModelConfig.preset(f"{family}/{arch}")
        model = LM(cfg, seed=0).eval()
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            prompt = torch.randint(0, cfg.vocab_size, (batch, context), generator=gen)
            nxt = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
            cache = KVCache.for_model(model, batch, capacity=context + 1)
            with torch.no_grad():
                model(prompt, cache=cache)

                def step(cache=cache, nxt=nxt, model=model):
                    cache.pos = context  # overwrite the same slot: every step is the same step
                    model(nxt, cache=cache)

                ms = _median_ms(step, repeats)
            predicted = decode_bytes(cfg, batch, BYTES)["total"]
            rows.append({
                "scope": f"model:{family}", "arch": arch, "batch": batch, "ms": ms,
                "tokens_per_s": batch / (ms / 1e3), "bytes_predicted": predicted,
                "floor_ms": predicted / bandwidth * 1e3,
                "active_params": count_params(cfg)["active"],
                "total_params": count_params(cfg)["total"],
            })
        del model
    return rows


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:8.2f}M"


def print_table(rows: list[dict]) -> None:
    print(f"{'scope':<14} {'arch':<12} {'batch':>5} {'ms/step':>9} {'tok/s':>10} "
          f"{'touched':>9} {'predicted':>9} {'floor ms':>9} {'vs MoE':>7}")
    by_key = {(r["scope"], r["arch"], r["batch"]): r for r in rows}
    for r in rows:
        moe = by_key.get((r["scope"], "moe", r["batch"]))
        speedup = moe["ms"] / r["ms"] if moe else float("nan")
        touched = _fmt_bytes(r["bytes_touched"]) if "bytes_touched" in r else "       -"
        print(f"{r['scope']:<14} {r['arch']:<12} {r['batch']:>5} {r['ms']:>9.3f} "
              f"{r['tokens_per_s']:>10.0f} {touched:>9} {_fmt_bytes(r['bytes_predicted']):>9} "
              f"{r['floor_ms']:>9.3f} {speedup:>6.2f}x")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = sorted({r["scope"] for r in rows})
    fig, axes = plt.subplots(1, len(scopes), figsize=(6 * len(scopes), 4.5))
    for ax, scope in zip(axes if len(scopes) > 1 else [axes], scopes, strict=True):
        for arch in ARCHS:
            pts = [r for r in rows if r["scope"] == scope and r["arch"] == arch]
            ax.plot([p["batch"] for p in pts], [p["ms"] / p["batch"] for p in pts], "o-",
                    label=arch)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per token (one decode step / batch)")
        ax.set_title(scope)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="small", help="matched family for the whole model")
    parser.add_argument("--layer-family", default="227m", help="matched family for the layer")
    parser.add_argument("--batches", default="1,4,16,64,256")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--out", default="docs/benchmarks/decode.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="tiny family, few repeats")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.family, args.layer_family, args.repeats, args.batches = "tiny", "tiny", 3, "1,8,64"
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    bandwidth = gather_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"gather bandwidth {bandwidth / 1e9:.2f} GB/s")
    rows = bench_layers(args.layer_family, batches, args.repeats, bandwidth)
    rows += bench_model(args.family, batches, args.repeats, args.context, bandwidth)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/decode.py " + " ".join(
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "quick"),
        "commit": _commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "gather_bandwidth_bytes_per_s": bandwidth, "bytes_per_weight": BYTES}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
