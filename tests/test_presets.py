"""Matched preset families: equal activated parameters, total within 3%, and the presets table."""

import pytest

from ultramem import ModelConfig
from ultramem.accounting import count_params
from ultramem.cli import main
from ultramem.config import ARCHS, FAMILIES, PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


REFERENCE = {"tiny": "moe", "small": "moe", "mini": "moe", "227m": "ultramem_v2"}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_matched(family):
    ref = count_params(ModelConfig.preset(f"{family}/{REFERENCE[family]}"))
    lines = []
    for arch in ARCHS:
        cfg = ModelConfig.preset(f"{family}/{arch}")
        c = count_params(cfg)
        da = c["active"] / ref["active"] - 1
        dt = c["total"] / ref["total"] - 1
        lines.append(f"{arch}: active {da:+.4f} total {dt:+.4f}")
        assert abs(da) < 0.001, arch  # same activated parameters
        if arch != "dense":
            assert abs(dt) < 0.03, arch
        else:
            assert cfg.memory is None
    print(family, "; ".join(lines))


def test_family_members_exist_and_share_the_backbone():
    for family in FAMILIES:
        cfgs = [ModelConfig.preset(f"{family}/{a}") for a in ARCHS]
        kinds = [c.memory.kind if c.memory is not None else "dense" for c in cfgs]
        assert kinds == list(ARCHS)
        backbone = {(c.vocab_size, c.n_layers, c.d_model, c.n_heads, c.max_seq_len) for c in cfgs}
        assert len(backbone) == 1


def test_227m_family_follows_table_10():
    assert ModelConfig.preset("227m/ultramem_v2") == ModelConfig.preset("umv2-227m-1.2b")
    moe = ModelConfig.preset("227m/moe").memory
    assert (moe.n_experts, moe.top_k, moe.renormalize) == (64, 8, False)
    v1 = ModelConfig.preset("227m/ultramem_v1").memory
    assert v1.pairs == ((2, 5), (6, 9), (10, 13), (14, 17)) and v1.n_heads == 2
    assert (v1.key_dim, v1.top_m, v1.value_dim) == (192, 80, 384)
    mp = ModelConfig.preset("227m/memory_plus").memory
    assert len(mp.layers) == 4 and (mp.key_dim, mp.n_heads, mp.top_k) == (384, 2, 80)
    for arch in ARCHS:  # paper: 227M activated, 1.18B total
        c = count_params(ModelConfig.preset(f"227m/{arch}"))
        assert c["active"] == pytest.approx(227e6, rel=0.02)
        if arch != "dense":
            assert c["total"] == pytest.approx(1.18e9, rel=0.02)


def test_mini_members_build_and_run():
    """The mini family trains the corpus study: every member builds and gives finite logits."""
    import torch

    from ultramem.model import LM

    torch.manual_seed(0)
    tokens = torch.randint(0, 4096, (1, 16))
    for arch in ARCHS:
        model = LM(ModelConfig.preset(f"mini/{arch}")).eval()
        with torch.no_grad():
            logits = model(tokens)
        logits = logits if torch.is_tensor(logits) else logits[0]
        assert logits.shape == (1, 16, 4096) and torch.isfinite(logits).all(), arch


def test_presets_command_prints_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n{name} " in out
    assert "GFLOP/tok" in out and "B=64" in out
    assert main(["presets", "--family", "tiny/"]) == 0
    out = capsys.readouterr().out
    assert "tiny/moe" in out and "small/moe" not in out


def test_presets_command_rejects_an_unknown_family(capsys):
    assert main(["presets", "--family", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "227m" in err
    assert main(["presets", "--family", "tiny"]) == 0
    assert "tiny/moe" in capsys.readouterr().out


def test_20b_preset_is_the_227m_backbone_with_20b_of_tables():
    """Counted from the config alone: instantiating it would allocate 80 GB of tables."""
    from ultramem.accounting import sparse_tables

    big, base = ModelConfig.preset("umv2-227m-20b"), ModelConfig.preset("umv2-227m-1.2b")
    assert big.replace(memory={"n_keys": base.memory.n_keys}) == base
    tables = sum(t.params for t in sparse_tables(big))
    assert 20e9 <= tables < 20.1e9
    mem = big.memory
    assert tables == len(big.memory_blocks) * mem.n_keys**2 * (mem.value_dim + mem.pre_value_dim)
