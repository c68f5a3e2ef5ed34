"""Memory diagnostics: known values on hand-made usage, sane values on real layers."""

import json
import math

import pytest
import torch

from ultramem import LM, ModelConfig
from ultramem.cli import main
from ultramem.config import ARCHS
from ultramem.diagnostics import (
    expert_load,
    gini,
    kl_to_uniform,
    layer_diagnostics,
    model_diagnostics,
    row_counts,
    usage_stats,
)
from ultramem.train.config import TrainConfig
from ultramem.train.metrics import read_metrics
from ultramem.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_usage_statistics_on_known_distributions():
    uniform = torch.full((10,), 3.0)
    assert kl_to_uniform(uniform) == pytest.approx(0.0, abs=1e-12)
    assert gini(uniform) == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.zeros(10)
    one_hot[4] = 7.0
    assert kl_to_uniform(one_hot) == pytest.approx(math.log(10))
    assert gini(one_hot) == pytest.approx(0.9)
    half = torch.tensor([1.0, 1.0, 0.0, 0.0])
    stats = usage_stats(half)
    assert stats["fraction_used"] == 0.5
    assert stats["kl_uniform"] == pytest.approx(math.log(2))
    assert stats["gini"] == pytest.approx(0.5)
    assert row_counts(torch.tensor([[0, 2], [2, 2]]), 4).tolist() == [1.0, 0.0, 3.0, 0.0]


def test_expert_load_counts_assignments():
    model = LM(ModelConfig.preset("tiny/moe", max_seq_len=16))
    layer = model.memory_layers()[0]
    u = torch.randn(50, 128)
    load = expert_load(layer, u)
    _, _, experts = layer.route(u)
    assert load.sum().item() == pytest.approx(1.0)
    e = int(experts[0, 0])
    assert load[e].item() == pytest.approx((experts == e).sum().item() / experts.numel())


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "dense"])
def test_model_diagnostics_per_layer(arch):
    cfg = ModelConfig.preset(f"tiny/{arch}", max_seq_len=16)
    model = LM(cfg).train()
    stats = model_diagnostics(model, torch.randint(0, 256, (4, 16)))
    assert len(stats) == len(model.memory_layers())
    assert model.training  # mode restored
    for s in stats:
        assert 0 < s["fraction_used"] <= 1
        assert 0 <= s["gini"] < 1 and 0 <= s["kl_uniform"] <= s["kl_uniform_max"]
        if arch != "moe":
            assert s["score_std"] > 0
    if arch.startswith("ultramem"):
        sv = torch.tensor(stats[0]["tucker_singular_values"])
        assert sv.shape[-1] == 2 and (sv[..., 0] >= sv[..., 1]).all()


def test_diagnostics_see_collapsed_usage():
    # Tokens that are all the same read the same rows: usage concentrates and the stats say so.
    model = LM(ModelConfig.preset("tiny/ultramem_v2", max_seq_len=16))
    layer = model.memory_layers()[0]
    same = torch.randn(1, 128).expand(64, 128)
    varied = torch.randn(64, 128)
    a, b = layer_diagnostics(layer, same), layer_diagnostics(layer, varied)
    assert a["fraction_used"] == pytest.approx(16 / layer.cfg.n_values)
    assert a["fraction_used"] < b["fraction_used"]
    assert a["kl_uniform"] > b["kl_uniform"] and a["gini"] > b["gini"]


def test_output_shares_find_a_dead_layer():
    from ultramem.diagnostics import output_share_summary, output_shares

    torch.manual_seed(0)
    model = LM(ModelConfig.preset("tiny/ultramem_v2", max_seq_len=16))
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    alive = output_shares(model, idx)
    assert len(alive) == len(model.memory_layers()) and all(s > 0.01 for s in alive)
    with torch.no_grad():
        model.memory_layers()[0].out_proj.weight.mul_(1e-6)  # the first layer's output ~ 0
    dead = output_shares(model, idx)
    assert dead[0] < 1e-5 and dead[1:] == pytest.approx(alive[1:], rel=0.2)
    summary = output_share_summary(model, idx)
    assert summary["mem/out_over_ffn_min"] == dead[0] and summary["mem/silent_layers"] == 1
    assert output_share_summary(LM(model.cfg), idx)["mem/silent_layers"] == 0
    # An MoE replaces the FFN: no FFN to compare with.
    moe = LM(ModelConfig.preset("tiny/moe", max_seq_len=16))
    assert set(output_shares(moe, idx)) == {None} and output_share_summary(moe, idx) == {}


def test_adam_grad_over_eps_is_the_gradient_over_eps_and_finds_a_starved_layer():
    from ultramem.diagnostics import adam_eps_summary, adam_grad_over_eps

    torch.manual_seed(0)
    model = LM(ModelConfig.preset("tiny/ultramem_v2", max_seq_len=16))
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    layers = model.memory_layers()
    with torch.no_grad():  # the first layer collapsed: three factors of its product near 0
        for lin in (layers[0].query, layers[0].pre_proj, layers[0].out_proj):
            lin.weight.mul_(1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8)
    assert adam_grad_over_eps(model, opt) == [None] * len(layers)  # no state yet
    _, loss = model(idx, idx)
    loss.backward()
    # After one step v_hat = g^2: the ratio is the median |gradient| over eps.
    expected = []
    for layer in layers:
        tables = {id(t) for t in layer.value_parameters()}
        grads = [p.grad.flatten() for p in layer.parameters() if id(p) not in tables]
        expected.append(float(torch.cat(grads).abs().median()) / 1e-8)
    opt.step()
    ratios = adam_grad_over_eps(model, opt)
    assert ratios == pytest.approx(expected, rel=1e-5)
    assert ratios[0] < 1 < min(ratios[1:])  # the collapsed layer's gradients are below eps
    assert adam_eps_summary(model, opt) == {"mem/grad_over_eps_min": ratios[0]}
    opt.param_groups[0]["eps"] = 0.0  # no eps: no damping to report
    assert adam_grad_over_eps(model, opt) == [None] * len(layers)


def _two_layer_run(steps: int, **train) -> tuple[ModelConfig, TrainConfig]:
    """A two-block UltraMemV2 model and a few-step train config that evaluates at its end."""
    cfg = ModelConfig.preset("tiny").replace(
        n_layers=2, d_model=64, n_heads=2, ffn_hidden=128,
        memory={"n_keys": 16, "key_dim": 16, "top_m": 8, "value_dim": 16, "pre_value_dim": 16,
                "init_samples": 256})
    tcfg = TrainConfig(steps=steps, batch_size=2, seq_len=32, warmup=1, eval_every=steps,
                       eval_batches=1, log_every=1, tensorboard=False, plot=False,
                       device="cpu", threads=1, **train)
    return cfg, tcfg


def test_trainer_warns_when_a_sparse_layer_is_silent(tmp_path):
    cfg, tcfg = _two_layer_run(2, ckpt_every=0, lr=1e-6)
    trainer = Trainer(cfg, tcfg, tmp_path / "run", show_progress=False)
    with torch.no_grad():  # the second layer collapsed: its output ~1e-9 of the FFN's
        for lin in (trainer.model.memory_layers()[1].pre_proj,
                    trainer.model.memory_layers()[1].out_proj):
            lin.weight.mul_(1e-4)
    with pytest.warns(UserWarning, match=r"step 2: 1 sparse layer\(s\) silent"):
        trainer.fit()
    last = read_metrics(tmp_path / "run")[-1]
    assert last["mem/silent_layers"] == 1 and last["mem/out_over_ffn_min"] < 1e-3


def test_trainer_logs_recall_and_diagnose_prints_it(tmp_path, capsys):
    cfg, tcfg = _two_layer_run(4, ckpt_every=4)
    run = tmp_path / "run"
    Trainer(cfg, tcfg, run, show_progress=False).fit()
    rows = read_metrics(run)
    last = rows[-1]
    assert all(r["mem/grad_over_eps_min"] > 0 for r in rows if "loss" in r)
    assert 0 < last["mem/preselect_recall"] <= 1 and 0 <= last["mem/neg_quadrant_share"] <= 1
    assert 0 < last["mem/out_over_ffn_min"] <= last["mem/out_over_ffn_mean"]
    assert main(["diagnose", "--checkpoint", str(run), "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "64 tokens; 2 sparse layers" in out and "ultramem_v2" in out and "recall" in out
    assert "out/ffn" in out and "grad/eps" in out
    assert main(["diagnose", "--checkpoint", str(run), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert len(layers) == 2
    assert all(0 < s["preselect_recall"] <= 1 and len(s["tucker_singular_values"]) == 2
               and s["out_over_ffn"] > 0 for s in layers)
    # The optimizer state read back from the step-4 checkpoint gives what the trainer logged.
    assert min(s["grad_over_eps"] for s in layers) == pytest.approx(
        last["mem/grad_over_eps_min"], rel=1e-6)
    assert main(["diagnose", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "ultramem diagnose:" in capsys.readouterr().err
