"""Serving value tables from disk: memory-mapped fp32 and int8 tables match the in-RAM model."""

import pytest
import torch

from ultramem import LM, ModelConfig
from ultramem.offload import load_offloaded, mmap_safetensors, quantize_int8, write_int8_tables
from ultramem.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = ModelConfig.preset("tiny").replace(n_layers=2)
    model = LM(cfg, seed=3).eval()
    root = tmp_path_factory.mktemp("ckpt")
    path = save_checkpoint(root, 1, model=model, config={"model": cfg.to_dict()})
    return model, path


def test_mmap_reads_the_same_tensors(checkpoint):
    model, path = checkpoint
    tensors = mmap_safetensors(path / "model.safetensors")
    state = model.state_dict()
    for name, t in tensors.items():
        assert torch.equal(t, state[name]), name


def test_offloaded_model_matches_in_memory_model(checkpoint):
    model, path = checkpoint
    served = load_offloaded(path)
    assert all(layer.table_source is not None for layer in served.memory_layers())
    assert not any("values" in n for n, _ in served.named_parameters())
    idx = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(served(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-5)
        # cached decoding goes through the same path
        out = served.generate(idx[:, :5], 6, temperature=0)
        assert torch.equal(out, model.generate(idx[:, :5], 6, temperature=0))


def test_int8_tables_are_close(checkpoint):
    model, path = checkpoint
    write_int8_tables(path)
    served = load_offloaded(path, int8=True)
    assert served.memory_layers()[0].table_source.quantized
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref, got = model(idx)[0], served(idx)[0]
    rel = (got - ref).norm() / ref.norm()
    assert 0 < rel < 0.01, rel


def test_plain_values_offload(tmp_path):
    """pre_value_dim=0: no pre-value table in the checkpoint; mmap and int8 serving still work."""
    cfg = ModelConfig.preset("tiny").replace(n_layers=2, memory={"pre_value_dim": 0})
    model = LM(cfg, seed=4).eval()
    path = save_checkpoint(tmp_path, 1, model=model, config={"model": cfg.to_dict()})
    assert not any("pre_values" in k for k in mmap_safetensors(path / "model.safetensors"))
    idx = torch.randint(0, 256, (2, 16))
    served = load_offloaded(path)
    with torch.no_grad():
        torch.testing.assert_close(served(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-5)
    write_int8_tables(path)
    with torch.no_grad():
        ref, got = model(idx)[0], load_offloaded(path, int8=True)(idx)[0]
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.01


def test_quantize_int8_round_trip():
    t = torch.randn(100, 16) * torch.rand(100, 1)
    q, s = quantize_int8(t, chunk=7)
    back = q.float() * s.unsqueeze(1)
    assert q.dtype == torch.int8
    assert ((back - t).abs() <= s.unsqueeze(1) / 2 + 1e-7).all()


def test_offload_rejects_other_kinds(tmp_path):
    cfg = ModelConfig.preset("tiny/moe")
    path = save_checkpoint(tmp_path, 1, model=LM(cfg), config={"model": cfg.to_dict()})
    with pytest.raises(ValueError, match="UltraMemV2"):
        load_offloaded(path)
