"""GPU check of the fused Triton memory read: parity with the reference, and achieved bandwidth.

Run where CUDA and triton are present (it exits with a message elsewhere):

    python benchmarks/gpu_kernels.py               # table + runs/benchmarks/gpu_kernels.json

For each batch it times the fused read (forward, and forward + backward, deterministic and
atomic) against the embedding_bag path on the same device, reports the bytes each must move
(the gathered value and pre-value rows, plus inputs and outputs) as GB/s, and the device's copy
bandwidth (a large device-to-device copy) as the ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _time_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    src = torch.empty(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), 20)
    return 2 * n_bytes / (ms / 1e3)  # read + write


def _cases(values, pre, rows, scores, xp, grad) -> dict:
    from ultramem.ops import memory_read
    from ultramem.ops.triton_lookup import fused_memory_read

    def fused(atomic: bool = False):
        return fused_memory_read(values, pre, rows, scores, xp, atomic=atomic)

    def bag():
        return memory_read(values, pre, rows, scores, xp, impl="fast")

    return {
        "fused_fwd": fused,
        "bag_fwd": bag,
        "fused_fwd_bwd": lambda: fused().backward(grad),
        "fused_fwd_bwd_atomic": lambda: fused(atomic=True).backward(grad),
        "bag_fwd_bwd": lambda: bag().backward(grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--value-dim", type=int, default=768)
    parser.add_argument("--pre-value-dim", type=int, default=384)
    parser.add_argument("--top-m", type=int, default=128)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--batches", default="1,16,256,4096")
    parser.add_argument("--out", default="runs/benchmarks/gpu_kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs CUDA; nothing measured")
    from ultramem.ops import gather_dot_reference, weighted_lookup_reference
    from ultramem.ops.triton_lookup import fused_memory_read

    dev = "cuda"
    n, dv, dp, m, c = args.rows, args.value_dim, args.pre_value_dim, args.top_m, args.cores
    values = torch.randn(n, dv, device=dev, requires_grad=True)
    pre = torch.randn(n, dp, device=dev, requires_grad=True)
    ceiling = copy_bandwidth()
    rows_out = []
    for t in (int(b) for b in args.batches.split(",")):
        rows = torch.randint(0, n, (t, m), device=dev)
        scores = torch.randn(t, m, c, device=dev, requires_grad=True)
        xp = torch.randn(t, dp, device=dev, requires_grad=True)
        grad = torch.randn(t, dv, device=dev)
        with torch.no_grad():
            ref = weighted_lookup_reference(values, rows, gather_dot_reference(pre, rows, xp)
                                            .unsqueeze(-1) * scores)
            err = (fused_memory_read(values, pre, rows, scores, xp) - ref).abs().max().item()
        moved = t * m * (dv + dp) * 4 + t * (dp + dv + m * c) * 4
        result = {"batch": t, "max_abs_err": err, "bytes": moved}
        for name, fn in _cases(values, pre, rows, scores, xp, grad).items():
            ms = _time_ms(fn)
            result[f"{name}_ms"] = ms
            result[f"{name}_gbps"] = moved / (ms / 1e3) / 1e9
        rows_out.append(result)
        print(f"T={t:>5} err={err:.1e} fused fwd {result['fused_fwd_ms']:.3f} ms "
              f"({result['fused_fwd_gbps']:.0f} GB/s) | bag fwd {result['bag_fwd_ms']:.3f} ms | "
              f"fused fwd+bwd {result['fused_fwd_bwd_ms']:.3f} ms, atomic "
              f"{result['fused_fwd_bwd_atomic_ms']:.3f} ms | bag fwd+bwd "
              f"{result['bag_fwd_bwd_ms']:.3f} ms")
    print(f"device copy bandwidth {ceiling / 1e9:.0f} GB/s ({torch.cuda.get_device_name()})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                          "copy_bandwidth": ceiling, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
