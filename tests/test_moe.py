"""MoE: the grouped fast path equals a per-token loop, one expert equals the dense FFN, and the
router and auxiliary losses behave as documented."""

import pytest
import torch

from ultramem import LM, ModelConfig
from ultramem.config import ConfigError, MoEConfig
from ultramem.diagnostics import layer_inputs
from ultramem.layers import MoELayer, SwiGLU
from ultramem.layers.moe import ROW_BUCKET, _grouped_mm_runs, needs_row_buckets, pad_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(**kw) -> MoELayer:
    cfg = MoEConfig(**{"n_experts": 8, "top_k": 3, "expert_hidden": 12, **kw})
    layer = MoELayer(cfg, d_model=16)
    layer.init_weights(target_var=1.0, n_layers=2, generator=torch.Generator().manual_seed(0))
    return layer.double()


def _grads(layer, x, fn):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
     .view_as(out)).sum().backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in layer.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("impl", ["grouped", "padded"])
@pytest.mark.parametrize("style", ["olmoe", "mixtral"])
def test_grouped_matches_per_token_loop(style, impl):
    kw = {} if style == "olmoe" else {"top_k": 2, "renormalize": True}
    layer = _layer(**kw)
    layer.impl = impl
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    out, gx, gp = _grads(layer, x, layer)
    ref, rgx, rgp = _grads(layer, x, layer.forward_reference)
    err = (out - ref).abs().max().item()
    print(f"MoE {style} {impl}: max |fast - loop| output {err:.2e}")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-10, atol=1e-12)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], rtol=1e-10, atol=1e-12, msg=name)
    assert gp["router.weight"].abs().sum() > 0  # the router learns through its weights


def _f32_layer(**kw) -> MoELayer:
    # grouped_mm wants float32/bfloat16 rows of 16-byte multiples: d_model 16, expert_hidden 8.
    return _layer(expert_hidden=8, **kw).float()


@pytest.mark.parametrize("impl", ["grouped_mm", "grouped", "padded"])
@pytest.mark.parametrize("style", ["olmoe", "mixtral"])
def test_float32_paths_match_per_token_loop(style, impl):
    kw = {} if style == "olmoe" else {"top_k": 2, "renormalize": True}
    layer = _f32_layer(**kw)
    layer.impl = impl
    x = torch.randn(3, 11, 16)
    out, gx, gp = _grads(layer, x, layer)
    ref, rgx, rgp = _grads(layer, x, layer.forward_reference)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-6)
    for name in gp:
        assert gp[name].abs().sum() > 0, name  # every parameter gets a gradient
        torch.testing.assert_close(gp[name], rgp[name], rtol=1e-5, atol=1e-6, msg=name)


def test_auto_takes_grouped_mm_where_it_runs_else_the_loop():
    layer = _f32_layer()
    w6, w8, w12 = (torch.empty(8, 16, w) for w in (6, 8, 12))
    assert layer.choose_impl(torch.empty(4, 16), w8) == "grouped_mm"
    assert layer.choose_impl(torch.empty(4, 16, dtype=torch.bfloat16), w8) == "grouped_mm"
    assert layer.choose_impl(torch.empty(4, 16), w12) == "grouped_mm"  # 48-byte rows
    assert layer.choose_impl(torch.empty(4, 16), w6) == "grouped"  # 24-byte rows
    assert layer.choose_impl(torch.empty(4, 16, dtype=torch.bfloat16), w12) == "grouped"
    assert layer.choose_impl(torch.empty(4, 16, dtype=torch.float64), w8) == "grouped"
    layer.impl = "padded"
    assert layer.choose_impl(torch.empty(4, 16), w8) == "padded"
    layer.impl = "nonsense"
    with pytest.raises(ValueError, match="nonsense"):
        layer(torch.randn(4, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_auto_path_matches_per_token_loop(bf16):
    # On CUDA, "auto" takes F.grouped_mm where the device runs it (probed: bf16 on Hopper).
    layer = _f32_layer().cuda()
    x = torch.randn(2, 13, 16, device="cuda")
    ref, rgx, rgp = _grads(layer, x, layer.forward_reference)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out, gx, gp = _grads(layer, x, layer)
    dtype = torch.bfloat16 if bf16 else torch.float32
    impl = layer.choose_impl(x.view(-1, 16).to(dtype), layer.gate.to(dtype))
    print(f"CUDA {torch.cuda.get_device_name()} {dtype}: auto -> {impl}")
    assert impl == ("grouped_mm" if _grouped_mm_runs(x.device, dtype) else "grouped")
    tol = 3e-2 if bf16 else 1e-5
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.float(), rgx, rtol=tol, atol=tol)
    for name in gp:
        assert gp[name].abs().sum() > 0, name
        torch.testing.assert_close(gp[name], rgp[name], rtol=5 * tol, atol=5 * tol, msg=name)


def test_skewed_loads_and_plain_sum_loss_are_exact():
    layer = _f32_layer()
    x = torch.randn(200, 16)
    with torch.no_grad():  # one hot expert: every path still equals the loop
        layer.router.weight[5] += 50 * x.mean(0) / x.mean(0).norm()
    _, _, experts = layer.route(x)
    assert torch.bincount(experts.reshape(-1), minlength=8).max() >= 100  # mean 75
    ref = layer.forward_reference(x)
    for impl in ("auto", "grouped_mm", "grouped", "padded"):
        layer.impl = impl
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6, msg=impl)
    layer.impl = "auto"
    layer(x).sum().backward()  # an expanded (stride 0) output gradient reaches grouped_mm
    assert layer.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["auto", "grouped", "padded"])
def test_bf16_autocast_matches_float32_within_bf16_tolerance(impl):
    layer = _f32_layer()
    layer.impl = impl
    x = torch.randn(2, 13, 16)
    ref, rgx, rgp = _grads(layer, x, layer.forward_reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, gx, gp = _grads(layer, x, layer)
        logits, _, _ = layer.route(x)
    assert logits.dtype == torch.float32  # the router stays float32 under autocast
    assert all(p.dtype == torch.float32 for p in gp.values())
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gx.float(), rgx, rtol=3e-2, atol=3e-2)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], rtol=5e-2, atol=5e-2, msg=name)


@pytest.mark.parametrize("impl", ["auto", "grouped"])
def test_bf16_row_buckets_match_float32(impl):
    """Enough tokens that bf16 groups are padded to ROW_BUCKET rows: same results."""
    layer = _f32_layer()
    layer.impl = impl
    x = torch.randn(2, 70, 16)  # 140 tokens x top-3 = 420 rows >= ROW_BUCKET x 8 experts
    assert needs_row_buckets(torch.empty(420, 16, dtype=torch.bfloat16), 8)
    assert not needs_row_buckets(torch.empty(420, 16), 8)
    assert 420 >= ROW_BUCKET * 8
    ref, rgx, rgp = _grads(layer, x, layer.forward_reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, gx, gp = _grads(layer, x, layer)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gx.float(), rgx, rtol=3e-2, atol=3e-2)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], rtol=5e-2, atol=5e-2, msg=name)


def test_pad_groups_aligns_every_group_and_keeps_rows():
    counts = torch.tensor([3, 0, 5, 1])
    expert = torch.repeat_interleave(torch.arange(4), counts)
    xs = torch.arange(9.0).unsqueeze(1).expand(9, 2)
    rows, scales, padded, dest = pad_groups(xs, torch.arange(9.0), expert, counts, 4)
    assert padded.tolist() == [4, 0, 8, 4] and rows.shape == (9 + 4 * 3, 2)
    assert dest.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12]
    torch.testing.assert_close(rows[dest], xs)
    torch.testing.assert_close(scales[dest], torch.arange(9.0))
    keep = torch.zeros(rows.shape[0], dtype=torch.bool)
    keep[dest] = True
    assert (rows[~keep] == 0).all()


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_no_grad_matches_loop_also_with_bf16_weights(batch, dtype):
    layer = _f32_layer()
    x = torch.randn(batch, 16)
    with torch.no_grad():
        ref = layer.forward_reference(x)
        layer.to(dtype)
        for impl in ("auto", "grouped_mm", "grouped", "padded"):
            layer.impl = impl
            out = layer(x.to(dtype))
            assert out.dtype == dtype and layer.pop_aux_loss() is None
            tol = 1e-5 if dtype == torch.float32 else 4e-2
            torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol, msg=impl)


def test_bf16_weights_with_odd_widths_take_the_loop():
    layer = _layer().to(torch.bfloat16)  # expert_hidden 12: bf16 rows of 24 bytes
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        ref = layer.forward_reference(x)
    assert layer.choose_impl(x, layer.gate) == "grouped"
    torch.testing.assert_close(out, ref, rtol=4e-2, atol=4e-2)


def test_one_expert_is_the_dense_ffn():
    layer = _layer(n_experts=1, top_k=1, balance_loss=0.0, z_loss=0.0)
    ffn = SwiGLU(16, 12).double()
    with torch.no_grad():
        ffn.gate.weight.copy_(layer.gate[0].T)
        ffn.up.weight.copy_(layer.up[0].T)
        ffn.down.weight.copy_(layer.down[0].T)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    out, gx, gp = _grads(layer, x, layer)
    ref, rgx, _ = _grads(ffn, x, ffn)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gp["down"][0], ffn.down.weight.grad.T)


def test_routing_is_dropless_and_weights_follow_the_style():
    x = torch.randn(64, 16, dtype=torch.float64)
    olmoe = _layer()
    _, w, experts = olmoe.route(x)
    assert experts.shape == (64, 3)
    assert all(len(set(row)) == 3 for row in experts.tolist())  # k distinct experts per token
    assert (w.sum(-1) < 1).all()  # OLMoE: softmax probabilities, not renormalised
    mixtral = _layer(top_k=2, renormalize=True)
    _, w, _ = mixtral.route(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(64, dtype=w.dtype))
    assert MoEConfig.mixtral(32).n_experts == 8 and MoEConfig.mixtral(32).top_k == 2


def test_auxiliary_losses_formula_and_only_with_grad():
    layer = _layer()
    x = torch.randn(40, 16, dtype=torch.float64)
    layer(x)
    loss = layer.pop_aux_loss()
    logits, _, experts = layer.route(x)
    frac = torch.bincount(experts.reshape(-1), minlength=8).double() / experts.numel()
    balance = 0.01 * 8 * (frac * logits.softmax(-1).mean(0)).sum()
    z = 0.001 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(loss, balance + z)
    assert layer.pop_aux_loss() is None  # popped
    with torch.no_grad():
        layer(x)
    assert layer.pop_aux_loss() is None


def test_lm_adds_moe_aux_loss_to_training_loss():
    cfg = ModelConfig.preset("tiny/moe", max_seq_len=16)
    model = LM(cfg)
    idx = torch.randint(0, 256, (2, 16))
    _, loss = model(idx, idx)
    aux = model.aux_loss
    assert aux is not None and aux.item() > 0
    with torch.no_grad():
        _, plain = model(idx, idx)
    assert model.aux_loss is None
    torch.testing.assert_close(loss - aux, plain, rtol=1e-5, atol=1e-5)
    assert all(b.ffn is None for b in model.blocks)  # the MoE replaces every FFN


@pytest.mark.parametrize("layers", [None, (1, 2)])
def test_lm_averages_the_moe_aux_losses_over_its_moe_layers(layers):
    # OLMoE's convention: the loss weights apply to the mean over layers, not the sum.
    cfg = ModelConfig.preset("tiny/moe", max_seq_len=16).replace(memory={"layers": layers})
    model = LM(cfg)
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx)
    aux = model.aux_loss
    inputs = layer_inputs(model, idx)
    per_layer = []
    for i, layer in enumerate(model.memory_layers()):
        logits, _, experts = layer.route(inputs[i])
        frac = torch.bincount(experts.reshape(-1), minlength=64).float() / experts.numel()
        balance = 0.01 * 64 * (frac * logits.softmax(-1).mean(0)).sum()
        z = 0.001 * torch.logsumexp(logits, -1).pow(2).mean()
        per_layer.append(balance + z)
    assert len(per_layer) == (4 if layers is None else 2)
    torch.testing.assert_close(aux, torch.stack(per_layer).mean())


def test_moe_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^top_k"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="^balance_loss"):
        MoEConfig(balance_loss=-1.0)
