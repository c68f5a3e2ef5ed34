"""KV-cache incremental decoding and sampling (`LM.forward(cache=...)`, `LM.generate`)."""

import pytest
import torch

from ultramem import LM
from ultramem.model import KVCache, sample_next

TOL = 1e-5  # float32; the measured max difference is ~2e-6 on logits of magnitude ~3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(tiny_cfg) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, tiny_cfg.vocab_size, (3, 40), generator=gen)


@torch.no_grad()
def test_cached_logits_match_full_forward(tiny_model, prompts):
    full, _ = tiny_model(prompts)  # [3, 40, V]
    cache = KVCache.for_model(tiny_model, 3, capacity=4)  # small capacity: growth is exercised
    parts = [tiny_model(prompts[:, :10], cache=cache)[0]]  # prefill
    for i in range(10, 22):  # one token at a time
        parts.append(tiny_model(prompts[:, i : i + 1], cache=cache)[0])
    parts.append(tiny_model(prompts[:, 22:], cache=cache)[0])  # a chunk after cached tokens
    assert cache.pos == 40
    inc = torch.cat(parts, dim=1)
    assert inc.shape == full.shape
    assert (inc - full).abs().max().item() < TOL


@torch.no_grad()
def test_left_padded_batch_matches_unpadded_rows(tiny_model, prompts):
    lengths = [40, 25, 12]
    pad = torch.zeros_like(prompts)
    mask = torch.zeros_like(prompts)
    for r, n in enumerate(lengths):
        pad[r, 40 - n :] = prompts[r, :n]
        mask[r, 40 - n :] = 1
    padded, _ = tiny_model(pad, attention_mask=mask)
    for r, n in enumerate(lengths):
        alone, _ = tiny_model(prompts[r : r + 1, :n])
        assert (padded[r, 40 - n :] - alone[0]).abs().max().item() < TOL
    out = tiny_model.generate(pad, 4, temperature=0, attention_mask=mask)
    for r, n in enumerate(lengths):
        alone = tiny_model.generate(prompts[r : r + 1, :n], 4, temperature=0)
        assert torch.equal(out[r, 40:], alone[0, n:])


@torch.no_grad()
def test_greedy_generate_cached_equals_uncached(tiny_model, prompts):
    a = tiny_model.generate(prompts[:, :8], 8, temperature=0)
    b = tiny_model.generate(prompts[:, :8], 8, temperature=0, use_cache=False)
    assert a.shape == (3, 16)
    assert torch.equal(a[:, :8], prompts[:, :8])
    assert torch.equal(a, b)


@torch.no_grad()
def test_generation_past_max_seq_len(tiny_cfg):
    model = LM(tiny_cfg.replace(max_seq_len=24, n_layers=2, memory={"layers": (1,)}), seed=0)
    idx = torch.randint(0, 256, (2, 8))
    cached = model.generate(idx, 30, temperature=0)
    plain = model.generate(idx, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 38)
    # Identical while the whole sequence fits; after that the two keep different windows.
    assert torch.equal(cached[:, :25], plain[:, :25])
    with pytest.raises(ValueError, match="max_seq_len"):
        cache = KVCache.for_model(model, 2)
        model(torch.zeros(2, 20, dtype=torch.long), cache=cache)
        model(torch.zeros(2, 5, dtype=torch.long), cache=cache)


@torch.no_grad()
def test_reorder_cache_follows_rows(tiny_model, prompts):
    cache = KVCache.for_model(tiny_model, 3)
    tiny_model(prompts[:, :20], cache=cache)
    cache.reorder_cache(torch.tensor([2, 0]))
    step, _ = tiny_model(prompts[[2, 0], 20:21], cache=cache)
    full, _ = tiny_model(prompts[[2, 0], :21])
    assert (step[:, -1] - full[:, -1]).abs().max().item() < TOL
    with pytest.raises(ValueError, match="batch"):
        tiny_model(prompts[:, 21:22], cache=cache)


@torch.no_grad()
def test_eos_stops_generation(tiny_model, prompts):
    greedy = tiny_model.generate(prompts[:1, :8], 6, temperature=0)
    eos = int(greedy[0, 10])  # the third generated token
    out = tiny_model.generate(prompts[:1, :8], 6, temperature=0, eos_token_id=eos)
    first = (greedy[0, 8:] == eos).nonzero()[0].item()
    assert out.shape[1] == 8 + first + 1
    assert torch.equal(out[0], greedy[0, : 8 + first + 1])


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 0.0), torch.zeros(2000, 1, dtype=torch.long))
    draws = sample_next(logits, 1.0, generator=gen)
    assert set(draws.unique().tolist()) == {0, 1, 2, 3}
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).unique().tolist()) == {0, 1}
    # top_p=0.7: tokens 0 and 1 (0.5 < 0.7 <= 0.8); 0.85 also admits token 2.
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=gen).unique().tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.85, generator=gen).unique().tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, top_p=1e-3, generator=gen).unique().tolist()) == {0}
    # Low temperature sharpens towards the argmax; frequencies follow the probabilities.
    cold = sample_next(logits, 0.05, generator=gen)
    assert (cold == 0).float().mean() > 0.99
    assert abs((draws == 0).float().mean().item() - 0.5) < 0.05
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)


@torch.no_grad()
def test_sampled_generate_is_reproducible(tiny_model, prompts):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return tiny_model.generate(prompts[:2, :8], 6, temperature=1.0, top_k=50, top_p=0.9,
                                   generator=g)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def _kind_configs(base):
    from ultramem.config import SPARSE_CONFIGS

    small = base.replace(n_layers=2)
    cfgs = {kind: small.replace(memory=cls()) for kind, cls in SPARSE_CONFIGS.items()}
    cfgs["ultramem_v1_skip"] = small.replace(memory=SPARSE_CONFIGS["ultramem_v1"](pairs=((0, 1),)))
    cfgs["ultramem_v2_shared"] = small.replace(memory={"share_group": 2})
    cfgs["dense"] = small.replace(memory=None)
    return cfgs


@pytest.mark.parametrize("kind", ["ultramem_v2", "moe", "pkm", "peer", "memory_plus",
                                  "ultramem_v1", "ultramem_v1_skip", "ultramem_v2_shared", "dense"])
@torch.no_grad()
def test_cache_matches_full_forward_every_architecture(tiny_cfg, kind):
    model = LM(_kind_configs(tiny_cfg)[kind], seed=0).eval()
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx)
    cache = KVCache.for_model(model, 2)
    parts = [model(idx[:, :5], cache=cache)[0]]
    parts += [model(idx[:, i : i + 1], cache=cache)[0] for i in range(5, 12)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < TOL


def _write_checkpoint(model, path, tokenizer=None):
    """The checkpoint layout `ultramem generate` reads: config.json + model.safetensors."""
    import json

    from safetensors.torch import save_model

    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "ultramem-checkpoint", "version": 1, "step": 0,
            "model": model.cfg.to_dict(), "tokenizer": tokenizer or {"kind": "bytes"}}
    (path / "config.json").write_text(json.dumps(meta))
    save_model(model, str(path / "model.safetensors"))
    (path / "trainer_state.json").write_text("{}")
    return path


def test_generate_command_batches_prompts(tiny_model, tmp_path, capsys):
    from ultramem.cli import main

    ckpt = _write_checkpoint(tiny_model, tmp_path / "ckpt")
    prompts = ["The capital", "ab", "héllo"]
    args = ["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "6"]
    for p in prompts:
        args += ["--prompt", p]
    assert main(args) == 0
    expected = ""
    for i, prompt in enumerate(prompts, 1):
        ids = torch.tensor([list(prompt.encode())])
        alone = tiny_model.generate(ids, 6, temperature=0)[0, ids.shape[1] :].tolist()
        expected += f"--- sample {i} ---\n"
        expected += prompt + bytes(alone).decode("utf-8", errors="replace") + "\n"
    assert capsys.readouterr().out == expected


def test_import_without_transformers():
    """`import ultramem` and the CLI work where the hf extra is not installed."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import ultramem\n"
            "from ultramem.cli import build_parser\n"
            "build_parser()\n"
            "assert 'ultramem.hf' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_checkpoint_loader_returns_the_recorded_tokenizer(tiny_model, tmp_path):
    """generate and export load through `ultramem.train.checkpoint`: the model, the byte
    tokenizer for a bytes checkpoint, and a one-line error naming a missing BPE file."""
    import json

    from ultramem.commands.generate import load_checkpoint
    from ultramem.data.tokenizer import ByteTokenizer
    from ultramem.train.checkpoint import CheckpointError

    ckpt = _write_checkpoint(tiny_model, tmp_path / "ckpt")
    loaded, tok = load_checkpoint(ckpt)
    assert loaded.cfg == tiny_model.cfg and isinstance(tok, ByteTokenizer) and tok.path is None
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["tokenizer"] = {"kind": "bpe", "file": "tokenizer.json"}
    (ckpt / "config.json").write_text(json.dumps(meta))
    (ckpt / "checksums.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_checkpoint(ckpt)
