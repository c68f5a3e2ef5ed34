"""The serving path (`ultramem.serve`): decode step parity, bf16 retrieval, static KV cache, CLI."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_model

from ultramem import LM
from ultramem.cli import main
from ultramem.model import KVCache
from ultramem.serve import (
    Int8Linear,
    PackedLinear,
    UltraMemV2Decode,
    decoding,
    packed_bf16_supported,
    prepare_for_serving,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_cfg(tiny_cfg, **memory):
    return tiny_cfg.replace(n_layers=1, memory={"layers": (0,), **memory})


@pytest.mark.parametrize("memory", [{}, {"shared_rank_query": True}, {"pre_value_dim": 0},
                                    {"n_cores": 1, "tucker_rank": 3}, {"share_group": 2},
                                    {"preselect": "both_ends"}])
@torch.no_grad()
def test_decode_step_equals_forward(tiny_cfg, memory):
    cfg = tiny_cfg.replace(n_layers=2, memory=memory)
    model = LM(cfg, seed=0).eval()
    u = torch.randn(2, 5, cfg.d_model)
    for layer in model.memory_layers():
        ref_scores, ref_rows = layer.retrieve(u)
        ref = layer(u)
        step = UltraMemV2Decode(layer)
        scores, rows, _ = step.retrieve(u.reshape(-1, cfg.d_model))
        assert torch.equal(rows, ref_rows)
        assert (scores - ref_scores).abs().max().item() < 1e-5
        out = step(u)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


@torch.no_grad()
def test_decode_step_used_only_without_grad_and_refreshed(tiny_cfg):
    model = LM(_layer_cfg(tiny_cfg), seed=0)
    layer = model.memory_layers()[0]
    u = torch.randn(4, tiny_cfg.d_model)
    calls = []
    step = UltraMemV2Decode(layer)
    layer.decode_step = lambda x: calls.append(1) or step(x)
    layer(u)
    with torch.enable_grad():
        layer(u)
    assert len(calls) == 1
    layer.decode_step = step
    before = step(u)
    layer.keys.cores.mul_(-1.5)  # an in-place change (as an optimizer step) invalidates caches
    after = step(u)
    layer.decode_step = None
    assert not torch.equal(before, after)
    assert (after - layer(u)).abs().max().item() < 1e-5


@torch.no_grad()
def test_bf16_serving_retrieves_the_fp32_rows(tiny_cfg):
    cfg = tiny_cfg.replace(n_layers=1)
    fp32 = LM(cfg, seed=0).eval()
    layer32 = fp32.memory_layers()[0]
    served = prepare_for_serving(copy.deepcopy(fp32), "bf16")
    layer16 = served.memory_layers()[0]
    assert served.embed.weight.dtype == torch.bfloat16
    assert layer16.keys.keys.dtype == torch.float32  # retrieval stays float32
    assert layer16.tables()[0].dtype == torch.bfloat16
    u = torch.randn(512, cfg.d_model).bfloat16()  # the bf16 residual stream
    _, ref_rows = layer32.retrieve(u.float())
    _, rows, _ = layer16.decode_step.retrieve(u)
    same = (rows.sort(1).values == ref_rows.sort(1).values).all(1).float().mean().item()
    assert same >= 0.99
    ref = layer32(u.float())
    out = layer16(u)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def _served(tiny_cfg, dtype: str):
    """(float32 model, its served copy, float32 logits, served logits) on a fixed batch."""
    model = LM(tiny_cfg, seed=0).eval()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    served = prepare_for_serving(copy.deepcopy(model), dtype)
    return model, served, model(idx)[0], served(idx)[0]


@torch.no_grad()
def test_bf16_model_logits_close(tiny_cfg):
    model, served, ref, out = _served(tiny_cfg, "bf16")
    if packed_bf16_supported():
        assert isinstance(served.blocks[0].ffn.up, PackedLinear)
        assert isinstance(served.head, PackedLinear)
    assert out.dtype == torch.bfloat16
    # Measured 5.9% (a plain .to(bfloat16) of the same model: 7.5%; the dense model: 0.9%): the
    # bf16 residual stream moves memory-layer inputs, and a near-tie retrieval flips a row.
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.1
    with pytest.raises(ValueError, match="dtype"):
        prepare_for_serving(model, "fp8")


def _has_int8_kernel() -> bool:
    try:
        torch.ops.aten._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16),
                                           torch.ones(8, 32, dtype=torch.int8),
                                           torch.ones(8, dtype=torch.bfloat16))
    except (RuntimeError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _has_int8_kernel(), reason="no _weight_int8pack_mm kernel")
@torch.no_grad()
def test_int8_serving_logit_error_small(tiny_cfg):
    _, served, ref, out = _served(tiny_cfg, "int8")
    assert isinstance(served.blocks[0].attn.qkv, Int8Linear)
    assert isinstance(served.head, Int8Linear)  # tied embeddings: an int8 copy for the head
    # as bf16 (measured 7%): retrieval flips from the bf16 residual dominate the int8 error
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.1
    lin = torch.nn.Linear(64, 48, bias=False)
    x = torch.randn(3, 64)
    err = (Int8Linear(lin.weight)(x) - lin(x)).norm() / lin(x).norm()
    assert err.item() < 2e-2


@pytest.mark.skipif(not packed_bf16_supported(), reason="no oneDNN bf16")
@torch.no_grad()
def test_packed_linear_equals_bf16_linear():
    lin = torch.nn.Linear(96, 40, bias=False).bfloat16()
    packed = PackedLinear(lin.weight)
    for shape in [(1, 96), (7, 96), (2, 3, 96)]:
        x = torch.randn(shape).bfloat16()
        ref = lin(x).float()
        assert (packed(x).float() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


@torch.no_grad()
def test_static_cache_generate_equals_uncached(tiny_model):
    idx = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(4))
    a = tiny_model.generate(idx, 12, temperature=0)
    b = tiny_model.generate(idx, 12, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    assert all(layer.decode_step is None for layer in tiny_model.memory_layers())
    served = prepare_for_serving(copy.deepcopy(tiny_model), "fp32")
    assert torch.equal(served.generate(idx, 12, temperature=0), a)
    assert all(layer.decode_step is not None for layer in served.memory_layers())


@torch.no_grad()
def test_generate_allocates_the_cache_once(tiny_model, monkeypatch):
    made = []
    grown = []
    orig_init, orig_reserve = KVCache.__init__, KVCache.reserve

    def init(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        made.append(self)

    def reserve(self, total):
        cap = self.capacity
        orig_reserve(self, total)
        if self.capacity != cap:
            grown.append(total)

    monkeypatch.setattr(KVCache, "__init__", init)
    monkeypatch.setattr(KVCache, "reserve", reserve)
    idx = torch.randint(0, 256, (2, 70))
    tiny_model.generate(idx, 30, temperature=0)
    assert len(made) == 1 and made[0].capacity == 100
    assert grown == []


@torch.no_grad()
def test_decoding_context_keeps_prepared_steps(tiny_cfg):
    model = prepare_for_serving(LM(tiny_cfg, seed=0), "fp32")
    steps = [layer.decode_step for layer in model.memory_layers()]
    with decoding(model):
        pass
    assert [layer.decode_step for layer in model.memory_layers()] == steps
    plain = LM(tiny_cfg, seed=0)
    with decoding(plain):
        assert all(layer.decode_step is not None for layer in plain.memory_layers())
    assert all(layer.decode_step is None for layer in plain.memory_layers())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_generate_command_dtype(tiny_model, tmp_path, capsys, dtype):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    meta = {"format": "ultramem-checkpoint", "version": 1, "step": 0,
            "model": tiny_model.cfg.to_dict(), "tokenizer": {"kind": "bytes"}}
    (ckpt / "config.json").write_text(json.dumps(meta))
    save_model(tiny_model, str(ckpt / "model.safetensors"))
    (ckpt / "trainer_state.json").write_text("{}")
    args = ["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "5", "--prompt", "ab",
            "--dtype", dtype]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("ab") and len(out.encode()) >= len("ab\n")
    if dtype == "fp32":
        ids = torch.tensor([list(b"ab")])
        with torch.no_grad():
            cont = tiny_model.generate(ids, 5, temperature=0)[0, 2:].tolist()
        assert out == "ab" + bytes(cont).decode("utf-8", errors="replace") + "\n"


@torch.no_grad()
def test_hf_generate_allocates_prompt_plus_new(tiny_model):
    pytest.importorskip("transformers")
    from ultramem.hf import UltraMemForCausalLM

    hf = UltraMemForCausalLM.from_lm(tiny_model)
    idx = torch.randint(0, 256, (2, 10))
    out = hf.generate(idx, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert isinstance(cache, KVCache) and cache.capacity == 16
    assert torch.equal(out.sequences, tiny_model.generate(idx, 6, temperature=0))
    assert all(layer.decode_step is None for layer in tiny_model.memory_layers())
