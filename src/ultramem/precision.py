"""Which number format the compute path uses, decided from what the machine can do.

`precision="auto"` (the training default) means bf16 matmuls where the hardware runs them faster
than float32 (CUDA devices with bf16 support; CPUs with AVX-512 BF16 or AMX tiles), float32
elsewhere. "bf16" here is mixed precision: weights, gradients and optimizer state stay float32
(the master copy) and `torch.autocast` runs the matmuls in bf16, while the parts whose results
decide something discrete or accumulate many terms stay float32 on purpose: retrieval scoring and
top-m (`ultramem.retrieval`), norms, softmax and the loss.
"""

from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 matmul instructions (AVX-512 BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 matmuls beat float32 on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bf16" where bf16 is fast on `device`, else "fp32"; others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str):
    """The forward's context: bf16 autocast for "bf16", nothing for "fp32"."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def float32_region(device_type: str = "cpu"):
    """A region where autocast is off: code inside runs in the dtypes it is given."""
    return torch.autocast(device_type, enabled=False)
