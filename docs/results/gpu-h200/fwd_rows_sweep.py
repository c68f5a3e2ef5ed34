"""Run as .devcheck/fwd_sweep.py on the H200 (session 2026-12-04 16:00 UTC, run 2; run 1 had RS = (2, 4, 8)).

The old kernel module is the fused read at fde4171 with its op namespace renamed so both register:
    git show fde4171:src/ultramem/ops/triton_lookup.py | sed 's/"ultramem::/"ultramem_old::/g' > .devcheck/triton_lookup_old.py
Then, from the repository root, with OUT set to a folder: PYTHONPATH=src python3 .devcheck/fwd_sweep.py
"""
"""Old forward kernel (fde4171) against the new one, side by side, and torch.compile parity."""
import json, os, sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".devcheck")
from gpu_kernels import _time_ms  # noqa
import triton_lookup_old as old  # noqa
import ultramem.ops.triton_lookup as new  # noqa
from ultramem.ops import gather_dot_reference, weighted_lookup_reference

n, dv, dp, m, c = 1 << 20, 768, 384, 128, 2
RS = (2, 4)
values = torch.randn(n, dv, device="cuda")
pre = torch.randn(n, dp, device="cuda")
out = []
for t in (1, 4, 16, 64, 256, 1024, 4096):
    rows = torch.randint(0, n, (t, m), device="cuda")
    scores = torch.randn(t, m, c, device="cuda")
    xp = torch.randn(t, dp, device="cuda")
    moved = t * m * (dv + dp) * 4 + t * (dp + dv + m * c) * 4
    with torch.no_grad():
        ref = weighted_lookup_reference(values, rows, gather_dot_reference(pre, rows, xp).unsqueeze(-1) * scores)
        rec = {"batch": t, "bytes": moved,
               "old_ms": _time_ms(lambda: old.fused_memory_read(values, pre, rows, scores, xp))}
        for r in RS:
            new.FWD_ROWS = r
            y = new.fused_memory_read(values, pre, rows, scores, xp)
            rec[f"new_R{r}_err"] = (y - ref).abs().max().item()
            rec[f"new_R{r}_ms"] = _time_ms(lambda: new.fused_memory_read(values, pre, rows, scores, xp))
            rec[f"new_R{r}_nosplit_ms"] = _time_ms(lambda: new._forward(values, pre, rows, scores, xp, splits=1))
        new.FWD_ROWS = 2
    out.append(rec)
    print(f"T={t:>5} old {rec['old_ms']:.3f} ms ({moved/rec['old_ms']/1e6:.0f} GB/s) | " + " | ".join(
        f"R={r} {rec[f'new_R{r}_ms']:.3f} ({moved/rec[f'new_R{r}_ms']/1e6:.0f} GB/s) nosplit {rec[f'new_R{r}_nosplit_ms']:.3f} err {rec[f'new_R{r}_err']:.1e}"
        for r in RS), flush=True)
# torch.compile through the triton_op, forward and backward
t = 64
rows = torch.randint(0, n // 64, (t, m), device="cuda")
v2 = values[: n // 64].clone().requires_grad_(True); p2 = pre[: n // 64].clone().requires_grad_(True)
sc = torch.randn(t, m, c, device="cuda", requires_grad=True); x2 = torch.randn(t, dp, device="cuda", requires_grad=True)
f = lambda: new.fused_memory_read(v2, p2, rows, sc, x2)
ye = f(); ye.sum().backward(); ge = v2.grad.clone(); v2.grad = None
yc = torch.compile(f)(); yc.sum().backward(); gc = v2.grad.clone()
print("compile parity y", (ye - yc).abs().max().item(), "grad", (ge - gc).abs().max().item())
json.dump(out, open(os.environ["OUT"] + "/fwd_sweep2.json", "w"), indent=1)
