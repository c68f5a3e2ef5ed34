"""The fused Triton memory read against the reference ops (interpreter on CPU, tiny shapes)."""

import importlib.util

import pytest
import torch

from ultramem.ops import gather_dot_reference, memory_read, weighted_lookup_reference

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (extra 'triton')"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n=24, dv=12, dp=6, t=5, m=4, c=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n // 2, (t, m), generator=gen)
    rows[1] = rows[0]  # repeated tokens
    rows[2, :2] = 1  # a row repeated within a token
    tensors = [torch.randn(n, dv, generator=gen), torch.randn(n, dp, generator=gen),
               torch.randn(t, m, c, generator=gen), torch.randn(t, dp, generator=gen)]
    values, pre_values, scores, xp = (z.to(DEVICE).requires_grad_(True) for z in tensors)
    grad_y = torch.randn(t, dv, generator=gen).to(DEVICE)
    return values, pre_values, rows.to(DEVICE), scores, xp, grad_y


def _run(fn, inputs):
    values, pre_values, rows, scores, xp, grad_y = inputs
    for z in (values, pre_values, scores, xp):
        z.grad = None
    y = fn(values, pre_values, rows, scores, xp)
    (y * grad_y).sum().backward()
    return [y.detach()] + [z.grad.clone() for z in (values, pre_values, scores, xp)]


def _reference(values, pre_values, rows, scores, xp):
    a = gather_dot_reference(pre_values, rows, xp)
    return weighted_lookup_reference(values, rows, a.unsqueeze(-1) * scores)


@pytest.mark.parametrize("shape", [dict(), dict(c=1, dv=8), dict(c=4, dv=16, dp=5), dict(dv=300),
                                   dict(dv=1100, m=5)])  # 2 forward, 5 backward Dv tiles
@pytest.mark.parametrize("atomic", [False, True])
def test_fused_read_matches_reference(shape, atomic):
    from ultramem.ops.triton_lookup import fused_memory_read

    inputs = _inputs(**shape)
    want = _run(_reference, inputs)
    got = _run(lambda *a: fused_memory_read(*a, atomic=atomic), inputs)
    for name, w, g in zip(["y", "values", "pre_values", "scores", "xp"], want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)
        assert g.abs().sum() > 0, name


def test_deterministic_backward_is_bitwise_reproducible():
    from ultramem.ops.triton_lookup import fused_memory_read

    inputs = _inputs(t=6, m=5)
    first = _run(fused_memory_read, inputs)
    second = _run(fused_memory_read, inputs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_auto_dispatch_and_op_registration():
    from ultramem.ops import triton_lookup  # noqa: F401  (registers the op)

    inputs = _inputs()
    got = _run(lambda *a: memory_read(*a, impl="triton"), inputs)
    want = _run(lambda *a: memory_read(*a, impl="fast"), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert hasattr(torch.ops.ultramem, "fused_lookup")
    # the registered op is callable through torch.ops, with autograd attached
    values, pre_values, rows, scores, xp, grad_y = inputs
    y, a = torch.ops.ultramem.fused_lookup(values, pre_values, rows, scores, xp, False)
    assert y.shape == (5, 12) and a.shape == (5, 4) and y.requires_grad
    torch.testing.assert_close(y, got[0], rtol=0, atol=0)


@pytest.mark.parametrize("splits", [2, 3])
def test_forward_split_over_slots_matches_reference(splits):
    """Few tokens split their slots over several programs (as on a GPU at batch 1); the partial
    sums must add up to the reference, and every slot's pre-value activation must be written."""
    from ultramem.ops.triton_lookup import _forward

    values, pre_values, rows, scores, xp, _ = _inputs(t=3, m=11, dv=20)
    with torch.no_grad():
        y, a = _forward(values, pre_values, rows, scores, xp, splits=splits)
        want_a = gather_dot_reference(pre_values, rows, xp)
        want_y = weighted_lookup_reference(values, rows, want_a.unsqueeze(-1) * scores)
    torch.testing.assert_close(a, want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
