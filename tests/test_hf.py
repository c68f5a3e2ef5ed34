"""Hugging Face adapter (`ultramem.hf`): round trip, Auto classes, generate parity, bf16, export.

Offline: everything loads from local folders written by the tests.
"""

import copy
import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
pytest.importorskip("tokenizers", reason="the hf extra (tokenizers) is not installed")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ultramem import LM  # noqa: E402
from ultramem.config import SPARSE_CONFIGS  # noqa: E402
from ultramem.hf import UltraMemConfig, UltraMemForCausalLM, byte_tokenizer, export  # noqa: E402
from ultramem.model import KVCache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    return export(tiny_model, tmp_path_factory.mktemp("hf") / "tiny")


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@torch.no_grad()
def test_round_trip_is_bit_exact(tiny_model, exported):
    loaded = UltraMemForCausalLM.from_pretrained(exported)
    assert isinstance(loaded.model, LM) and loaded.model.cfg == tiny_model.cfg
    _assert_same_state(tiny_model, loaded.model)
    # The buffers that are not saved (RoPE tables) are rebuilt identically.
    assert torch.equal(loaded.model.rope_cos, tiny_model.rope_cos)
    assert torch.equal(loaded.model.rope_sin, tiny_model.rope_sin)
    assert any(k.endswith(".perm") for k in loaded.model.state_dict())  # shuffle saved
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(loaded(idx, use_cache=False).logits, tiny_model(idx)[0])


def _configs(base):
    small = base.replace(n_layers=2)
    cfgs = {kind: small.replace(memory=cls()) for kind, cls in SPARSE_CONFIGS.items()}
    cfgs["ultramem_v1_skip"] = small.replace(memory=SPARSE_CONFIGS["ultramem_v1"](pairs=((0, 1),)))
    cfgs["ultramem_v2_shared_untied"] = small.replace(memory={"share_group": 2},
                                                      tie_embeddings=False)
    cfgs["ultramem_v2_plain_values"] = small.replace(memory={"pre_value_dim": 0})
    cfgs["dense"] = small.replace(memory=None)
    return cfgs


@pytest.mark.parametrize("kind", ["moe", "pkm", "peer", "memory_plus", "ultramem_v1",
                                  "ultramem_v1_skip", "ultramem_v2_shared_untied",
                                  "ultramem_v2_plain_values", "dense"])
@torch.no_grad()
def test_round_trip_every_architecture(tiny_cfg, tmp_path, kind):
    model = LM(_configs(tiny_cfg)[kind], seed=0).eval()
    export(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.cfg == model.cfg
    _assert_same_state(model, loaded.model)
    idx = torch.randint(0, 256, (2, 10))
    assert torch.equal(loaded(idx, use_cache=False).logits, model(idx)[0])


def test_auto_classes(exported):
    meta = json.loads((exported / "config.json").read_text())
    assert meta["model_type"] == "ultramem"
    assert meta["architectures"] == ["UltraMemForCausalLM"]
    config = AutoConfig.from_pretrained(exported)
    assert isinstance(config, UltraMemConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 4, 256)
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=False)
    assert isinstance(model, UltraMemForCausalLM)
    tok = AutoTokenizer.from_pretrained(exported)
    text = "Grüße, 世界!\n\ttab"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 256


def test_byte_tokenizer_covers_every_byte():
    tok = byte_tokenizer()
    every = bytes(range(256)).decode("latin-1")  # 256 characters, some multi-byte in UTF-8
    assert tok(every)["input_ids"] == list(every.encode("utf-8"))
    assert sorted(tok.get_vocab().values()) == list(range(256))


@torch.no_grad()
def test_generate_parity_with_lm(tiny_model, exported):
    hf = AutoModelForCausalLM.from_pretrained(exported)
    prompts = torch.tensor([list(b"The quick brown"), list(b"Memory layers a")])
    ours = tiny_model.generate(prompts, 8, temperature=0)
    out = hf.generate(prompts, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ours)
    # generate() ran on our KVCache, which then holds every token but the last one sampled
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert isinstance(cache, KVCache) and cache.pos == ours.shape[1] - 1

    # Left-padded batch: each row continues as it would alone.
    short = torch.tensor([list(b"Hi")])
    pad = torch.cat([torch.zeros(1, 13, dtype=torch.long), short], dim=1)
    batch = torch.cat([prompts[:1], pad])
    mask = torch.ones_like(batch)
    mask[1, :13] = 0
    got = hf.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got[0], tiny_model.generate(prompts[:1], 5, temperature=0)[0])
    assert torch.equal(got[1, 15:], tiny_model.generate(short, 5, temperature=0)[0, 2:])


@torch.no_grad()
def test_beam_search_reorders_the_cache(exported):
    hf = AutoModelForCausalLM.from_pretrained(exported)
    prompts = torch.tensor([list(b"Beams "), list(b"Search")])
    cached = hf.generate(prompts, max_new_tokens=5, num_beams=3, do_sample=False)
    plain = hf.generate(prompts, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


@torch.no_grad()
def test_labels_give_the_shifted_loss(tiny_model, exported):
    hf = UltraMemForCausalLM.from_pretrained(exported)
    idx = torch.randint(0, 256, (2, 20))
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)
    _, loss = tiny_model(idx, targets)
    assert torch.allclose(hf(idx, labels=idx).loss, loss)


@pytest.mark.parametrize("arg", ["torch_dtype", "dtype"])
@torch.no_grad()
def test_load_in_bfloat16(tiny_model, exported, arg):
    hf = AutoModelForCausalLM.from_pretrained(exported, **{arg: torch.bfloat16})
    params = dict(hf.model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    for name, p in tiny_model.named_parameters():
        assert torch.equal(params[name], p.to(torch.bfloat16)), name
    for name, buf in tiny_model.named_buffers():
        if not buf.is_floating_point():  # the shuffle permutation stays exact
            assert torch.equal(dict(hf.model.named_buffers())[name], buf), name
    assert hf.model.rope_cos.dtype == torch.float32  # RoPE tables keep full precision
    # Same numbers as our LM cast to bfloat16 (with its RoPE tables left in float32).
    ref = copy.deepcopy(tiny_model).to(torch.bfloat16)
    ref.rope_cos, ref.rope_sin = tiny_model.rope_cos.clone(), tiny_model.rope_sin.clone()
    idx = torch.randint(0, 256, (2, 24))
    assert torch.equal(hf(idx, use_cache=False).logits, ref(idx)[0])
    out = hf.generate(idx[:, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 12)


def _write_checkpoint(model, path, tokenizer=None):
    """The checkpoint layout `ultramem generate/export` read: config.json + model.safetensors."""
    from safetensors.torch import save_model

    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "ultramem-checkpoint", "version": 1, "step": 0,
            "model": model.cfg.to_dict(), "tokenizer": tokenizer or {"kind": "bytes"}}
    (path / "config.json").write_text(json.dumps(meta))
    save_model(model, str(path / "model.safetensors"))
    (path / "trainer_state.json").write_text("{}")
    return path


def test_export_command_then_same_greedy_text(tiny_model, tmp_path, capsys):
    from ultramem.cli import main

    ckpt = _write_checkpoint(tiny_model, tmp_path / "ckpt")
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    prompt = "Hello"
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", prompt,
                 "--max-new-tokens", "10"]) == 0
    ours = capsys.readouterr().out.split("\n", 1)[1]  # drop export's line
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    text = tok.decode(model.generate(ids, max_new_tokens=10, do_sample=False)[0])
    assert ours == text + "\n"
    _assert_same_state(tiny_model, model.model)


def test_export_keeps_a_tokenizer_file(tiny_model, tmp_path):
    """A checkpoint whose config.json names a tokenizer.json exports that tokenizer."""
    from ultramem.cli import main

    ckpt = _write_checkpoint(tiny_model, tmp_path / "ckpt",
                             tokenizer={"kind": "bpe", "file": "tokenizer.json"})
    byte_tokenizer().backend_tokenizer.save(str(ckpt / "tokenizer.json"))
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("año")["input_ids"] == list("año".encode())


# -- a complete transformers model: remote code, checkpointing, embeddings, hidden states ------

_FRESH = """
import sys
import torch
from transformers import AutoModelForCausalLM

assert "ultramem" not in sys.modules
folder, expected = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
print(type(model).__module__, type(model).__name__)
ids = torch.tensor([list(b"Hello, memory!")])
assert torch.equal(model(ids, use_cache=False).logits, torch.load(expected))
print("same logits")
"""


def test_exported_folder_loads_with_remote_code_in_a_fresh_process(tiny_model, exported,
                                                                   tmp_path):
    import subprocess
    import sys

    meta = json.loads((exported / "config.json").read_text())
    assert meta["auto_map"] == {"AutoConfig": "configuration_ultramem.UltraMemConfig",
                                "AutoModelForCausalLM": "modeling_ultramem.UltraMemForCausalLM"}
    for name in ("configuration_ultramem.py", "modeling_ultramem.py"):
        assert "from ultramem.hf import" in (exported / name).read_text()
    with torch.no_grad():
        torch.save(tiny_model(torch.tensor([list(b"Hello, memory!")]))[0], tmp_path / "logits.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _FRESH, str(exported), str(tmp_path / "logits.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ultramem.hf", "UltraMemForCausalLM", "same", "logits"]


@torch.no_grad()
def test_inputs_embeds_hidden_states_and_tuples(tiny_model, exported):
    hf = AutoModelForCausalLM.from_pretrained(exported)
    idx = torch.randint(0, 256, (2, 9))
    out = hf(idx, use_cache=False, output_hidden_states=True)
    assert len(out.hidden_states) == hf.config.num_hidden_layers + 1 == tiny_model.cfg.n_layers + 1
    assert torch.equal(out.hidden_states[0], hf.get_input_embeddings()(idx))
    _, _, hidden = tiny_model(idx, output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, hidden, strict=True))
    by_embeds = hf(inputs_embeds=hf.get_input_embeddings()(idx), use_cache=False)
    assert torch.equal(by_embeds.logits, out.logits)
    assert hf(idx, use_cache=False).hidden_states is None  # off by default (config)
    loss, logits = hf(idx, labels=idx, use_cache=False, return_dict=False)
    assert torch.equal(logits, out.logits) and loss.dim() == 0
    logits, cache = hf(idx, return_dict=False)  # use_cache (config default): the KVCache too
    assert isinstance(cache, KVCache) and cache.pos == 9


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5.x renames to activation_*
def test_gradient_checkpointing_enable_gives_the_same_gradients(exported):
    plain = AutoModelForCausalLM.from_pretrained(exported).train()
    ckpt = AutoModelForCausalLM.from_pretrained(exported).train()
    assert plain.supports_gradient_checkpointing and not ckpt.is_gradient_checkpointing
    ckpt.gradient_checkpointing_enable()
    assert ckpt.is_gradient_checkpointing and ckpt.model.activation_checkpointing
    idx = torch.randint(0, 256, (2, 16))
    for model in (plain, ckpt):
        model(idx, labels=idx, use_cache=False).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
    ckpt.gradient_checkpointing_disable()
    assert not ckpt.model.activation_checkpointing and not ckpt.is_gradient_checkpointing


@pytest.mark.parametrize("tied", [True, False])
def test_no_split_modules_and_tied_weights(tiny_cfg, tmp_path, tied):
    from safetensors import safe_open

    model = LM(tiny_cfg.replace(n_layers=2, tie_embeddings=tied), seed=0)
    export(model, tmp_path)
    loaded, info = UltraMemForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    classes = {type(m).__name__ for m in loaded.modules()}
    assert set(loaded._no_split_modules) <= classes
    assert loaded._tied_weights_keys == {} and loaded.all_tied_weights_keys == {}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed.weight" in keys and ("model.head.weight" in keys) is not tied
    # tied: the output layer is the embedding matrix itself, one tensor
    assert (loaded.get_output_embeddings() is None) is tied
    _assert_same_state(model, loaded.model)


def test_plain_construction_initialises_as_lm_and_meta_needs_no_workaround(tiny_cfg):
    cfg = tiny_cfg.replace(n_layers=2)
    built = UltraMemForCausalLM(UltraMemConfig.from_model_config(cfg))
    _assert_same_state(LM(cfg, seed=0), built.model)
    with torch.device("meta"):
        empty = UltraMemForCausalLM(UltraMemConfig.from_model_config(cfg))
    assert all(t.is_meta for t in empty.state_dict().values())


def test_a_checkpoint_missing_tensors_loads_them_fresh(tiny_cfg, tmp_path):
    """Folders written before the pre-selection direction was saved lack `direction_ref`: it
    starts from zero (as `TuckerProductKeys` loads old checkpoints). A missing parameter takes a
    new model's value (seed 0). Every other tensor loads."""
    from safetensors.torch import load_file, save_file

    model = LM(tiny_cfg.replace(n_layers=2), seed=3)
    export(model, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = [k for k in weights if k.endswith("direction_ref")] + ["model.blocks.1.ffn.up.weight"]
    assert len(dropped) == 3
    save_file({k: v for k, v in weights.items() if k not in dropped},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = UltraMemForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(dropped)
    fresh = LM(tiny_cfg.replace(n_layers=2), seed=0).blocks[1].ffn.up.weight
    for key, value in model.state_dict().items():
        got = loaded.model.state_dict()[key]
        if key.endswith("direction_ref"):
            assert torch.equal(got, torch.zeros_like(value))
        elif key == "blocks.1.ffn.up.weight":
            assert torch.equal(got, fresh)
        else:
            assert torch.equal(got, value), key
