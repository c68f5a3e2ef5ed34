"""The fast weighted lookup and gather-dot agree with their references, values and gradients."""

import pytest
import torch

from ultramem.ops import gather_dot, memory_read, weighted_lookup


def _grads(fn, impl, table, rows, other, grad_out, sparse):
    table = table.detach().clone().requires_grad_(True)
    other = other.detach().clone().requires_grad_(True)
    out = fn(table, rows, other, impl=impl, sparse_grad=sparse)
    (out * grad_out).sum().backward()
    g_table = table.grad.to_dense() if table.grad.is_sparse else table.grad
    return out.detach(), g_table, other.grad, table.grad.is_sparse


def _rows_with_repeats(t, m, n):
    rows = torch.randint(0, n, (t, m))
    rows[1] = rows[0]  # whole tokens repeated
    rows[2, :2] = 3  # a row repeated within one token
    return rows


@pytest.mark.parametrize("slices", [0, 1, 2, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_weighted_lookup_matches_reference(slices, sparse):
    t, m, n, d = 7, 5, 11, 8
    table = torch.randn(n, d, dtype=torch.float64)
    rows = _rows_with_repeats(t, m, n)
    shape = (t, m) if slices == 0 else (t, m, slices)
    weights = torch.randn(*shape, dtype=torch.float64)
    grad_out = torch.randn(t, d, dtype=torch.float64)
    ref = _grads(weighted_lookup, "reference", table, rows, weights, grad_out, False)
    fast = _grads(weighted_lookup, "fast", table, rows, weights, grad_out, sparse)
    for a, b in zip(ref[:3], fast[:3], strict=True):
        torch.testing.assert_close(a, b)
    assert fast[3] == sparse
    assert fast[1].abs().sum() > 0 and fast[2].abs().sum() > 0


@pytest.mark.parametrize("sparse", [False, True])
def test_gather_dot_matches_reference(sparse):
    t, m, n, d = 6, 4, 9, 5
    table = torch.randn(n, d, dtype=torch.float64)
    rows = _rows_with_repeats(t, m, n)
    x = torch.randn(t, d, dtype=torch.float64)
    grad_out = torch.randn(t, m, dtype=torch.float64)
    ref = _grads(gather_dot, "reference", table, rows, x, grad_out, False)
    fast = _grads(gather_dot, "fast", table, rows, x, grad_out, sparse)
    for a, b in zip(ref[:3], fast[:3], strict=True):
        torch.testing.assert_close(a, b)


def test_sparse_gradient_holds_only_touched_rows():
    table = torch.randn(1000, 4, requires_grad=True)
    rows = torch.tensor([[3, 7], [7, 999]])
    weighted_lookup(table, rows, torch.ones(2, 2), sparse_grad=True).sum().backward()
    assert table.grad.is_sparse
    assert sorted(table.grad.coalesce().indices()[0].tolist()) == [3, 7, 999]


def test_gradcheck_fast_path():
    table = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([[0, 2, 2], [5, 0, 1]])
    w = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: weighted_lookup(a, rows, b), (table, w))
    assert torch.autograd.gradcheck(lambda a, b: gather_dot(a, rows, b), (table, x))


def test_mixed_precision_inputs_follow_table_dtype():
    table = torch.randn(10, 8)
    rows = torch.randint(0, 10, (3, 2))
    out = weighted_lookup(table, rows, torch.randn(3, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    dots = gather_dot(table, rows, torch.randn(3, 8, dtype=torch.bfloat16))
    assert dots.dtype == torch.float32


def test_bad_shapes_raise():
    table = torch.randn(10, 6)
    with pytest.raises(ValueError, match="rows"):
        weighted_lookup(table, torch.zeros(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="divisible"):
        weighted_lookup(table, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, 4))
    with pytest.raises(ValueError, match="tokens"):
        gather_dot(table, torch.zeros(2, 2, dtype=torch.long), torch.ones(3, 6))


@pytest.mark.parametrize("impl", ["reference", "fast", "auto"])
def test_memory_read_plain_values_weights_by_scores_alone(impl):
    """pre_values None (pre_value_dim=0): y = sum_s G_k(s) value[s][slice k], a_s = 1."""
    t, m, n, d, c = 5, 4, 13, 6, 2
    values = torch.randn(n, d, dtype=torch.float64)
    rows = _rows_with_repeats(t, m, n)
    scores = torch.randn(t, m, c, dtype=torch.float64)
    got = memory_read(values, None, rows, scores, None, impl=impl)
    sliced = values[rows].view(t, m, c, d // c)  # [T, m, c, Dv / c]
    want = (scores.unsqueeze(-1) * sliced).sum(1).reshape(t, d)
    torch.testing.assert_close(got, want)
    # ... and with pre-values all-ones in the one dimension they'd be the same read.
    ones = torch.ones(n, 1, dtype=torch.float64)
    torch.testing.assert_close(
        memory_read(values, ones, rows, scores, torch.ones(t, 1, dtype=torch.float64),
                    impl=impl), want)
