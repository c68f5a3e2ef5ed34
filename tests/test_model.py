"""LM end to end: gradients reach every parameter, errors are clear, bf16 autocast runs,
activation checkpointing changes nothing but memory."""

import copy

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


# -- activation checkpointing -----------------------------------------------------------------

_CKPT_CASES = {
    # aux losses popped after each forward; the pre-selection direction advances with the cores
    "ultramem_v2": ("tiny", {"n_layers": 2, "memory": {"tucker_penalty": 0.01, "tucker_tau": 0.0,
                                                        "balance_loss": 0.01}}),
    "moe": ("tiny/moe", {"n_layers": 2, "memory": {"balance_loss": 0.01, "z_loss": 0.001}}),
    # BatchNorm query norms update running statistics in every training forward
    "pkm_batchnorm": ("tiny/pkm", {"memory": {"query_norm": "batch"}}),
    "ultramem_v1_skip": ("tiny/ultramem_v1", {}),  # outputs handed to a later block
}


def _saved_bytes(model, idx):
    """Bytes autograd keeps for the backward of one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return total


@pytest.mark.parametrize("case", sorted(_CKPT_CASES))
def test_activation_checkpointing_gives_the_same_training_steps(case):
    """Two SGD steps with and without checkpointing: equal losses, gradients, weights and buffers
    (recomputation must not count an aux loss twice nor advance BatchNorm statistics or the
    pre-selection direction twice), and less memory kept for the backward."""
    name, changes = _CKPT_CASES[case]
    plain = LM(ModelConfig.preset(name).replace(**changes), seed=0)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, ckpt)]
    idx = torch.randint(0, 256, (2, 24))
    for _ in range(2):
        losses = []
        for model, opt in zip((plain, ckpt), opts, strict=True):
            opt.zero_grad()
            _, loss = model(idx, idx)
            loss.backward()
            losses.append(loss)
        assert torch.equal(losses[0], losses[1])
        assert (plain.aux_loss is None) == (ckpt.aux_loss is None)
        for (n, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
        for opt in opts:
            opt.step()
    for (n, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=n)
    assert _saved_bytes(ckpt, idx) < 0.5 * _saved_bytes(plain, idx)


def test_activation_checkpointing_is_off_without_gradients(tiny_model):
    idx = torch.randint(0, 256, (1, 8))
    tiny_model.activation_checkpointing = True
    try:
        with torch.no_grad():
            logits, _ = tiny_model(idx)
        assert torch.equal(logits, tiny_model.eval()(idx)[0])
    finally:
        tiny_model.activation_checkpointing = False


# -- inputs_embeds and hidden states --------------------------------------------------------------


def test_inputs_embeds_and_hidden_states(tiny_model):
    idx, tgt = _batch(tiny_model.cfg, b=2, t=12)
    with torch.no_grad():
        logits, loss = tiny_model(idx, tgt)
        logits2, loss2, hidden = tiny_model(inputs_embeds=tiny_model.embed(idx), targets=tgt,
                                            output_hidden_states=True)
    assert torch.equal(logits2, logits) and torch.equal(loss2, loss)
    assert len(hidden) == tiny_model.cfg.n_layers + 1
    assert all(h.shape == (2, 12, tiny_model.cfg.d_model) for h in hidden)
    assert torch.equal(hidden[0], tiny_model.embed(idx))
    assert torch.equal(torch.nn.functional.linear(hidden[-1], tiny_model.embed.weight), logits)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model(idx, inputs_embeds=tiny_model.embed(idx))
    with pytest.raises(ValueError, match="d_model=128"):
        tiny_model(inputs_embeds=torch.zeros(1, 4, 64))


def test_train_config_switch_is_applied_by_the_trainer(tmp_path):
    from ultramem.train.config import TrainConfig
    from ultramem.train.trainer import Trainer

    cfg = ModelConfig.preset("tiny").replace(n_layers=2, max_seq_len=32)
    states = {}
    for on in (False, True):
        train_cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup=1, eval_every=0,
                                ckpt_every=0, tensorboard=False, plot=False, device="cpu",
                                precision="fp32", activation_checkpointing=on)
        trainer = Trainer(cfg, train_cfg, tmp_path / str(on), show_progress=False)
        assert trainer.model.activation_checkpointing is on
        trainer.fit()
        states[on] = trainer.model.state_dict()
    for key, value in states[False].items():
        torch.testing.assert_close(states[True][key], value, rtol=1e-5, atol=1e-6, msg=key)
