"""Every baseline trains in `LM`, reads only what it should, and is placed where its config says."""

import json

import pytest
import torch
import torch.nn.functional as F

from ultramem import LM, ModelConfig
from ultramem.config import (
    ARCHS,
    PRESETS,
    ConfigError,
    MemoryPlusConfig,
    PEERConfig,
    PKMConfig,
    UltraMemV1Config,
)
from ultramem.init import swiglu_output_variance
from ultramem.model import KVCache
from ultramem.retrieval import product_key_topk

pytestmark = pytest.mark.usefixtures("one_thread")


SPARSE = [a for a in ARCHS if a != "dense"]


def _tiny(arch: str, **changes) -> ModelConfig:
    return ModelConfig.preset(f"tiny/{arch}", max_seq_len=32, **changes)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_falls_over_50_steps(arch):
    torch.manual_seed(0)
    model = LM(_tiny(arch), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A learnable stream: a repeating pattern of 24 tokens with random phase per sequence.
    pattern = torch.randint(0, 256, (24,))
    data = torch.stack([pattern.roll(int(s)) for s in torch.randint(0, 24, (4,))])
    data = torch.cat([data, data], 1)[:, :33]
    losses = []
    for _ in range(50):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"{arch}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("arch", SPARSE)
def test_every_parameter_gets_a_gradient(arch):
    model = LM(_tiny(arch))
    idx = torch.randint(0, 256, (4, 16))
    _, loss = model(idx, idx)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_placement_follows_the_config():
    model = LM(_tiny("pkm"))
    assert [b.memory is not None for b in model.blocks] == [False, False, True, False]
    assert [b.ffn is not None for b in model.blocks] == [True, True, False, True]  # replaced
    keep = LM(_tiny("pkm", memory={"replace_ffn": False, "layers": (0, 3)}))
    assert [b.memory is not None for b in keep.blocks] == [True, False, False, True]
    assert all(b.ffn is not None for b in keep.blocks)
    v2 = LM(_tiny("ultramem_v2"))
    assert all(b.memory is not None and b.ffn is not None for b in v2.blocks)


def test_ultramem_v1_skip_layer_writes_after_the_write_block():
    cfg = _tiny("ultramem_v1", memory={"pairs": ((0, 2),)})
    model = LM(cfg)
    idx = torch.randint(0, 256, (2, 12))
    outs = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0].detach()))
             for i, b in enumerate(model.blocks)]
    model(idx)
    before = dict(outs)
    with torch.no_grad():
        model.blocks[0].memory.out_proj.weight.mul_(3.0)
    model(idx)
    for h in hooks:
        h.remove()
    assert torch.equal(before[0], outs[0]) and torch.equal(before[1], outs[1])
    assert not torch.allclose(before[2], outs[2])


def test_ultramem_v1_rejects_two_skip_outputs_into_one_block():
    # The model hands one skip-layer output to a block: a second one would be dropped silently.
    with pytest.raises(ConfigError, match=r"^pairs: \(0, 2\) and \(1, 2\) both hand"):
        UltraMemV1Config(pairs=((0, 2), (1, 2)))
    # A block's own layer and one skip-layer output into it are both added.
    model = LM(_tiny("ultramem_v1", memory={"pairs": ((0, 2), (2, 2))}))
    idx = torch.randint(0, 256, (2, 12))
    model(idx, idx)[1].backward()
    for layer in model.memory_layers():
        assert layer.out_proj.weight.grad.abs().sum() > 0


def test_ultramem_v1_forward_matches_reference():
    cfg = UltraMemV1Config(n_keys=6, key_dim=8, n_heads=2, top_m=5, value_dim=6, init_samples=64)
    model_cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, ffn_hidden=8, memory=cfg)
    layer = LM(model_cfg).memory_layers()[0].double()
    x = torch.randn(9, 16, dtype=torch.float64)
    scores, slots = layer.retrieve_virtual(x)  # [T, H*m, c], [T, H*m]
    n, e, dv, c = cfg.n_values, cfg.virtual_blocks, cfg.value_dim, cfg.n_cores
    pooled = torch.zeros(9, e, dv, dtype=torch.float64)
    for t in range(9):
        for s in range(slots.shape[1]):
            block, row = divmod(int(slots[t, s]), n)
            for k in range(c):
                sl = slice(k * dv // c, (k + 1) * dv // c)
                pooled[t, block, sl] += scores[t, s, k] * layer.values[row, sl]
    ref = layer.out_proj(pooled.reshape(9, e * dv))
    torch.testing.assert_close(layer(x), ref)
    assert slots.max() >= n  # virtual slots beyond the physical rows are used


def test_ultramem_v1_penalty_and_value_lr_schedule():
    cfg = _tiny("ultramem_v1")
    model = LM(cfg)
    layer = model.memory_layers()[0]
    layer(torch.randn(4, cfg.d_model))
    assert layer.pop_aux_loss() is not None  # Tucker penalty on by default
    mem = cfg.memory
    assert mem.value_lr_scale(0, 100) == 4.0 and mem.value_lr_scale(100, 100) == 1.0
    assert mem.value_lr_scale(50, 100) == pytest.approx(2.5)
    assert layer.value_parameters() == [layer.values]


def test_product_key_topk_is_exact():
    s1, s2 = torch.randn(5, 3, 20), torch.randn(5, 3, 20)
    scores, cells = product_key_topk(s1, s2, 7)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [5, 3, 400]
    best = full.topk(7, dim=-1)
    torch.testing.assert_close(scores, best.values)
    torch.testing.assert_close(full.gather(-1, cells), best.values)


def _reference_pkm_family(layer, x):
    """Per-token loop over heads and selections, straight from the papers' formulas."""
    scores, cells = layer.pk(x, layer.cfg.top_k)  # [T, H, k]
    outs = []
    for t in range(x.shape[0]):
        acc = 0.0
        for h in range(scores.shape[1]):
            w = scores[t, h].softmax(-1)
            for j, cell in enumerate(cells[t, h].tolist()):
                if isinstance(layer.cfg, PEERConfig):
                    acc = acc + w[j] * F.gelu(layer.down[cell] @ x[t]) * layer.up[cell]
                elif isinstance(layer.cfg, MemoryPlusConfig):
                    acc = acc + w[j] * layer.store.values[cell]
                else:
                    acc = acc + w[j] * layer.values[cell]
        if isinstance(layer.cfg, MemoryPlusConfig):
            acc = layer.out_proj(acc * F.silu(layer.gate_proj(x[t])))
        elif isinstance(layer.cfg, PKMConfig) and layer.out_proj is not None:
            acc = layer.out_proj(acc)
        outs.append(acc)
    return torch.stack(outs)


@pytest.mark.parametrize("arch,changes", [
    ("pkm", {}), ("pkm", {"value_dim": 48, "query_norm": "rms"}), ("peer", {}),
    ("memory_plus", {}),
])
def test_product_key_layers_match_reference_loop(arch, changes):
    model = LM(_tiny(arch, memory={"n_keys": 12, "top_k": 4, **changes}))
    layer = model.memory_layers()[0].double()
    if arch == "memory_plus":
        model.value_store.double()
    x = torch.randn(5, 128, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _reference_pkm_family(layer, x))


def test_memory_plus_layers_share_one_table():
    model = LM(_tiny("memory_plus"))
    a, b = model.memory_layers()
    assert a.store is b.store is model.value_store
    tables = [k for k in model.state_dict() if k.endswith("values")]
    assert tables == ["value_store.values"]


@pytest.mark.parametrize("arch", ["pkm", "peer", "memory_plus", "ultramem_v1"])
def test_sparse_grad_touches_only_read_rows(arch):
    model = LM(_tiny(arch, memory={"sparse_grad": True}))
    layer = model.memory_layers()[0]
    x = torch.randn(3, 128)
    layer(x).sum().backward()
    _, rows = layer.retrieve(x)
    for table in layer.value_parameters():
        grad = table.grad
        assert grad.is_sparse
        touched = set(grad.coalesce().indices()[0].tolist())
        assert touched == set(rows.flatten().tolist())


def test_batch_norm_query_option_trains():
    model = LM(_tiny("pkm", memory={"query_norm": "batch"}))
    idx = torch.randint(0, 256, (4, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.memory_layers()[0].pk.norm.weight.grad is not None


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith(("tiny", "small"))])
def test_config_round_trips_through_json(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("make,field", [
    (lambda: PKMConfig(key_dim=63), "key_dim"),
    (lambda: PKMConfig(n_keys=8, top_k=9), "top_k"),
    (lambda: PKMConfig(query_norm="group"), "query_norm"),
    (lambda: PEERConfig(layers=(1, 1)), "layers"),
    (lambda: UltraMemV1Config(pairs=((3, 1),)), "pairs"),
    (lambda: UltraMemV1Config(virtual_blocks=3), "virtual_blocks"),
    (lambda: ModelConfig(n_layers=2, memory=UltraMemV1Config(pairs=((0, 2),))), "memory.pairs"),
    (lambda: ModelConfig(n_layers=2, memory=PEERConfig(layers=(2,))), "memory.layers"),
    (lambda: ModelConfig.from_dict({"memory": {"kind": "pkm", "top_m": 3}}), "memory.top_m"),
    (lambda: ModelConfig.from_dict({"memory": {"kind": "hash"}}), "memory.kind"),
])
def test_config_errors_name_the_field(make, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        make()


@pytest.mark.parametrize("arch", ["pkm", "peer", "memory_plus"])
def test_init_balances_output_variance_against_the_ffn(arch):
    cfg = _tiny(arch)
    model = LM(cfg, seed=3)
    target = swiglu_output_variance(cfg.d_model, cfg.ffn_hidden, cfg.n_layers)
    u = torch.randn(2048, cfg.d_model)
    with torch.no_grad():
        ratios = [layer(u).var().item() / target for layer in model.memory_layers()]
    print(f"{arch}: sparse/FFN output variance at init {[f'{r:.2f}' for r in ratios]}")
    assert all(0.75 < r < 1.33 for r in ratios)


@pytest.mark.parametrize("arch", SPARSE)
def test_incremental_decoding_matches_full_forward(arch):
    # Sparse layers act per token, and the skip-layer hand-over must work one token at a time.
    model = LM(_tiny(arch)).eval()
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.for_model(model, 2)
        steps = [model(idx[:, :5], cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", SPARSE)
def test_layers_accept_any_leading_shape_and_check_width(arch):
    layer = LM(_tiny(arch)).memory_layers()[0]
    u = torch.randn(2, 3, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(u), layer(u.reshape(6, 128)).view(2, 3, 128))
        with pytest.raises(ValueError, match="last dim"):
            layer(torch.randn(4, 64))
