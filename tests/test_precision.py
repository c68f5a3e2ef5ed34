"""The fast (bf16 mixed-precision) compute path: chosen from the hardware, float32 where it
decides something (retrieval), and the same rows retrieved as in float32."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ultramem import LM, ModelConfig
from ultramem import precision as precision_mod
from ultramem.model import attention
from ultramem.train.config import TrainConfig
from ultramem.train.trainer import Trainer


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_has_fast_bf16", lambda: True)
    assert precision_mod.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision_mod, "cpu_has_fast_bf16", lambda: False)
    assert precision_mod.resolve_precision("auto", "cpu") == "fp32"
    assert precision_mod.resolve_precision("bf16", "cpu") == "bf16"
    assert precision_mod.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        precision_mod.resolve_precision("fp16", "cpu")
    assert TrainConfig().precision == "auto"


def _memory_inputs(model: LM, idx: torch.Tensor) -> list[torch.Tensor]:
    """The input u of every memory layer in a float32 forward of idx."""
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
             for layer in model.memory_layers()]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("grad", [False, True])
def test_bf16_autocast_retrieves_the_float32_rows(grad):
    model = LM(ModelConfig.preset("tiny"), seed=0)
    idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    same, total = 0, 0
    for layer, u in zip(model.memory_layers(), _memory_inputs(model, idx), strict=True):
        with torch.set_grad_enabled(grad):
            ref_scores, ref_rows = layer.retrieve(u)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                scores, rows = layer.retrieve(u)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, ref_scores)
        same += int((rows.sort(-1).values == ref_rows.sort(-1).values).all(-1).sum())
        total += rows.shape[0]
    assert same / total >= 0.99


def test_bf16_autocast_top_m_has_no_ties():
    model = LM(ModelConfig.preset("tiny"), seed=0)
    idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
    for layer, u in zip(model.memory_layers(), _memory_inputs(model, idx), strict=True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores, _ = layer.retrieve(u)
        summed = scores.sum(-1)  # [T, m], sorted descending
        ties = (summed[:, 1:] == summed[:, :-1]).float().mean().item()
        assert ties < 0.01, f"{ties:.1%} of adjacent top-m scores tie"


def test_cpu_bf16_attention_with_gradients_matches_float32():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=gen) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, None, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in leaves)


def _small_train(**changes) -> TrainConfig:
    base = dict(steps=6, batch_size=4, seq_len=32, warmup=1, lr=3e-3, eval_every=6,
                eval_batches=2, ckpt_every=0, log_every=1, tensorboard=False, plot=False,
                device="cpu", threads=1)
    return TrainConfig(**{**base, **changes})


def _tiny_model() -> ModelConfig:
    return ModelConfig.preset("tiny").replace(
        n_layers=2, d_model=64, n_heads=2, ffn_hidden=128, memory={
            "n_keys": 16, "key_dim": 16, "top_m": 8, "value_dim": 16, "pre_value_dim": 16,
            "init_samples": 256})


def test_trainer_resolves_and_records_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_has_fast_bf16", lambda: True)
    fast = Trainer(_tiny_model(), _small_train(), tmp_path / "auto", show_progress=False)
    assert fast.precision == "bf16"
    summary = fast.fit()
    assert summary["precision"] == "bf16" and math.isfinite(summary["eval_loss"])
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["precision"] == "bf16"
    monkeypatch.setattr(precision_mod, "cpu_has_fast_bf16", lambda: False)
    plain = Trainer(_tiny_model(), _small_train(), tmp_path / "plain", show_progress=False)
    assert plain.precision == "fp32"


def test_bf16_and_fp32_train_to_similar_losses(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        t = Trainer(_tiny_model(), _small_train(precision=precision, steps=12),
                    tmp_path / precision, show_progress=False)
        summary = t.fit()
        losses[precision] = summary["eval_loss"]
    # Same data and seed: the two paths differ by bf16 rounding only.
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"], losses
