"""LM end to end: gradients reach every parameter, errors are clear, bf16 autocast runs."""

import pytest
import torch

from ultramem import LM, ModelConfig


def _batch(cfg, b=2, t=32):
    idx = torch.randint(0, cfg.vocab_size, (b, t))
    return idx, torch.roll(idx, -1, 1)


def _assert_all_grads(model):
    missing = []
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and g.is_sparse:
            g = g.to_dense()
        if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0:
            missing.append(name)
    assert not missing, f"parameters without a finite nonzero gradient: {missing}"


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"memory": {"shared_rank_query": True}},
        {"memory": {"pre_value_dim": 0}},
        {"memory": {"share_group": 2, "pre_value_dim": 0}},
        {"memory": {"share_group": 2}},
        {"memory": {"sparse_grad": True}},
        {"memory": {"tucker_penalty": 0.001, "balance_loss": 0.001, "tucker_tau": 0.0}},
        {"tie_embeddings": False},
    ],
)
def test_every_parameter_gets_a_finite_nonzero_gradient(changes):
    cfg = ModelConfig.preset("tiny").replace(**changes)
    model = LM(cfg)
    idx, tgt = _batch(cfg)
    _, loss = model(idx, tgt)
    loss.backward()
    _assert_all_grads(model)
    blocks = model.blocks
    assert all(hasattr(b, name) for b in blocks for name in ("attn", "ffn", "memory"))
    assert len(model.memory_layers()) == cfg.n_layers


def test_query_projection_has_no_dead_half():
    # The reference code computes 2*r*Dk query outputs but reads only 2*Dk of them.
    model = LM(ModelConfig.preset("tiny"))
    idx, tgt = _batch(model.cfg)
    model(idx, tgt)[1].backward()
    for layer in model.memory_layers():
        per_output = layer.query.weight.grad.abs().sum(1)  # [2 r Dk]
        assert (per_output > 0).all()


def test_aux_losses_only_with_gradients_enabled():
    cfg = ModelConfig.preset("tiny").replace(memory={"balance_loss": 0.01})
    model = LM(cfg)
    idx, tgt = _batch(cfg)
    _, loss = model(idx, tgt)
    assert model.aux_loss is not None and model.aux_loss.item() > 0
    with torch.no_grad():
        _, eval_loss = model(idx, tgt)
    assert model.aux_loss is None
    assert loss.item() == pytest.approx(eval_loss.item() + 0.0, abs=1.0)
    assert loss.item() > eval_loss.item()


def test_bf16_autocast_forward(tiny_model):
    idx, tgt = _batch(tiny_model.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = tiny_model(idx, tgt)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(loss)
    _, ref = tiny_model(idx, tgt)
    assert abs(loss.item() - ref.item()) < 0.1


def test_clear_errors_on_bad_input(tiny_model):
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tiny_model(torch.zeros(1, 4))
    layer = tiny_model.memory_layers()[0]
    with pytest.raises(ValueError, match="d_model=128"):
        layer(torch.randn(3, 64))


def test_memory_layer_accepts_any_leading_shape(tiny_model):
    layer = tiny_model.memory_layers()[0]
    u = torch.randn(2, 5, 128)
    torch.testing.assert_close(layer(u), layer(u.reshape(10, 128)).reshape(2, 5, 128))


def test_memory_only_in_listed_blocks():
    cfg = ModelConfig.preset("tiny").replace(memory={"layers": (1, 3)})
    model = LM(cfg)
    assert [b.memory is not None for b in model.blocks] == [False, True, False, True]


def test_causal(tiny_model):
    idx, _ = _batch(tiny_model.cfg, b=1, t=16)
    logits, _ = tiny_model(idx)
    idx2 = idx.clone()
    idx2[0, 10:] = (idx2[0, 10:] + 1) % 256
    logits2, _ = tiny_model(idx2)
    torch.testing.assert_close(logits[0, :10], logits2[0, :10])


def test_loss_falls_when_training(tiny_cfg):
    model = LM(tiny_cfg.replace(n_layers=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_rope_tables_stay_float32_when_casting(tiny_cfg):
    model = LM(tiny_cfg.replace(n_layers=1)).to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.rope_sin.dtype == torch.float32
    assert model.embed.weight.dtype == torch.bfloat16
    logits, _ = model(torch.randint(0, 256, (1, 8)))
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("name,changes", [
    ("tiny", {}),
    ("tiny", {"memory": {"tucker_penalty": 0.001, "tucker_tau": 0.0}}),  # svdvals of the cores
    ("tiny", {"memory": {"tucker_rank": 3, "tucker_penalty": 0.001, "balance_loss": 0.01}}),
    ("tiny/ultramem_v1", {}),  # Tucker penalty on by default
])
def test_nan_in_a_tucker_core_gives_a_nan_loss_not_an_exception(name, changes):
    # The trainer skips a step with a non-finite loss; an exception would end the run instead.
    cfg = ModelConfig.preset(name, max_seq_len=32).replace(**changes)
    model = LM(cfg)
    layer = model.memory_layers()[0]
    keys = layer.keys if hasattr(layer, "keys") else layer.heads[0]
    with torch.no_grad():
        keys.cores[0, 0, 0] = float("nan")
    idx, tgt = _batch(cfg, t=16)
    _, loss = model(idx, tgt)
    loss.backward()
    assert torch.isnan(loss)
