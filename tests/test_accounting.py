"""The cost model: exact parameter counts for every architecture, and decode bytes that agree
with the rows and experts a real forward pass touches."""

import pytest
import torch

from ultramem import LM, ModelConfig
from ultramem.accounting import count_params, decode_bytes, sparse_tables, summarize
from ultramem.config import ARCHS
from ultramem.layers import MoELayer

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = [f"tiny/{a}" for a in ARCHS]


def _instantiated(model: LM) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,changes", [
    *[(n, {}) for n in TINY],
    ("tiny/pkm", {"memory": {"query_norm": "batch", "value_dim": 64}}),
    ("tiny/pkm", {"memory": {"query_norm": "rms"}, "tie_embeddings": False}),
    ("tiny/ultramem_v1", {"memory": {"virtual_blocks": 9, "n_heads": 3, "n_cores": 1}}),
    ("tiny/moe", {"memory": {"layers": (1, 2)}}),
    ("tiny/ultramem_v2", {"memory": {"share_group": 2}}),
    ("tiny/ultramem_v2", {"memory": {"pre_value_dim": 0}}),
])
def test_total_params_match_instantiated_model(name, changes):
    cfg = ModelConfig.preset(name, **changes)
    s = summarize(cfg)
    assert s["total_params"] == count_params(cfg)["total"] == _instantiated(LM(cfg, init=False))


def test_active_params_by_hand():
    # MoE: everything but the unread experts; one expert is 3 * h * w parameters.
    cfg = ModelConfig.preset("tiny/moe")
    moe, h, L = cfg.memory, cfg.d_model, cfg.n_layers
    c = count_params(cfg)
    assert c["total"] - c["active"] == L * (moe.n_experts - moe.top_k) * 3 * h * moe.expert_hidden
    # Dense: active == total.
    c = count_params(ModelConfig.preset("tiny/dense"))
    assert c["total"] == c["active"]
    # Memory+: each layer reads heads * top_k rows of the one shared table.
    cfg = ModelConfig.preset("tiny/memory_plus")
    m = cfg.memory
    c = count_params(cfg)
    rows = m.n_values * h
    assert c["total"] - c["active"] == rows - 2 * m.n_heads * m.top_k * h


def test_flops_per_token_by_hand():
    cfg = ModelConfig.preset("tiny/dense")
    h, L, ctx = cfg.d_model, cfg.n_layers, cfg.max_seq_len
    matmul = cfg.vocab_size * h + L * (4 * h * h + 3 * h * cfg.ffn_hidden)  # head, attn, FFN
    norms = h + L * (2 * h + 2 * cfg.head_dim)  # gains: counted as active, 2 FLOPs each
    assert summarize(cfg)["flops_per_token"] == 2 * (matmul + norms) + 2 * L * ctx * h
    moe = ModelConfig.preset("tiny/moe")
    e = moe.memory
    diff = summarize(moe)["flops_per_token"] - summarize(moe.replace(memory=None))[
        "flops_per_token"]
    per_layer = 2 * (h * e.n_experts + e.top_k * 3 * h * e.expert_hidden - 3 * h * moe.ffn_hidden)
    assert diff == L * per_layer  # router + k experts instead of the FFN


def test_flops_and_decode_bytes_formulas():
    cfg = ModelConfig.preset("tiny/ultramem_v2")
    s = summarize(cfg)
    assert s["flops_per_token"] > 2 * s["active_params"]
    mem = cfg.memory
    one = s["decode_bytes"](1)
    read = cfg.n_layers * mem.top_m * (mem.value_dim + mem.pre_value_dim)
    assert one["sparse"] == pytest.approx(2 * read)  # B = 1: the floor m * (Dv + Dp) * b
    assert one["total"] == pytest.approx(one["sparse"] + one["dense"])
    assert decode_bytes(cfg, 1, bytes_per_weight=4)["sparse"] == pytest.approx(4 * read)
    big = s["decode_bytes"](10**6)  # every row of every table
    assert big["sparse"] == pytest.approx(2 * sum(t.params for t in sparse_tables(cfg)))
    # MoE: k experts at B = 1, the whole bank once B >> E / k.
    moe = ModelConfig.preset("tiny/moe")
    e = moe.memory
    expert = 3 * moe.d_model * e.expert_hidden
    assert decode_bytes(moe, 1)["sparse"] == pytest.approx(2 * moe.n_layers * e.top_k * expert)
    assert decode_bytes(moe, 256)["sparse"] == pytest.approx(
        2 * moe.n_layers * e.n_experts * expert, rel=1e-6)


def _touched(model: LM, idx) -> int:
    """Distinct sparse rows (experts for an MoE) the last position of idx reads, summed over
    tables: counted from the layers' own selections on their real inputs."""
    layers = model.memory_layers()
    inputs = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, i=i: inputs.__setitem__(i, a[0][:, -1].detach()))
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(idx)
        for h in hooks:
            h.remove()
        shared, total = set(), 0
        for i, layer in enumerate(layers):
            rows = (layer.route(inputs[i])[2] if isinstance(layer, MoELayer)
                    else layer.retrieve(inputs[i])[1])
            if layer.cfg.kind == "memory_plus":  # one table read by every layer
                shared |= set(rows.flatten().tolist())
            else:
                total += rows.unique().numel()
    return total + len(shared)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "dense"])
def test_decode_bytes_match_measured_touched_rows(arch):
    cfg = ModelConfig.preset(f"tiny/{arch}", max_seq_len=16)
    model = LM(cfg, seed=0)
    (table,) = sparse_tables(cfg)
    gen = torch.Generator().manual_seed(0)
    report = []
    for batch in (1, 8, 64):
        # The model gives an expectation: average the touched rows over a few decode steps.
        counts = []
        for _ in range(4):
            idx = torch.randint(0, 256, (batch, 6), generator=gen)
            idx[:, -1] = torch.randperm(256, generator=gen)[:batch]  # distinct current tokens
            counts.append(_touched(model, idx))
        measured = sum(counts) / len(counts) * table.width * 2
        expected = decode_bytes(cfg, batch)["sparse"]
        report.append(f"B={batch}: {measured / expected - 1:+.3f}")
        assert measured == pytest.approx(expected, rel=0.10)
    print(f"{arch} measured/expected sparse decode bytes - 1: {', '.join(report)}")
