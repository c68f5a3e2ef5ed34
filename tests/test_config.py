"""Config validation names the bad field; presets and accounting hold."""

import pytest
import torch

from ultramem import LM, ConfigError, ModelConfig, UltraMemV2Config
from ultramem.accounting import count_params


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"n_keys": 3, "top_m": 16}, "top_m"),
        ({"value_dim": 30, "n_cores": 4}, "value_dim"),
        ({"rowcol_topk": 100}, "rowcol_topk"),
        ({"rowcol_topk": 3, "top_m": 16}, "rowcol_topk"),
        ({"tucker_rank": 0}, "tucker_rank"),
        ({"kind": "nope"}, "kind"),
        ({"value_init": "xavier"}, "value_init"),
        ({"share_group": 3}, "share_group"),
        ({"top_m": 2.5}, "top_m"),
        ({"pre_value_dim": -1}, "pre_value_dim"),
        ({"value_dim": 0}, "value_dim"),
    ],
)
def test_memory_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        UltraMemV2Config(**kwargs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"d_model": 130, "n_heads": 4}, "n_heads"),
        ({"d_model": 96, "n_heads": 32}, "n_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"memory": UltraMemV2Config(layers=(0, 9))}, "memory.layers"),
        ({"n_layers": 2, "memory": UltraMemV2Config(share_group=4)}, "memory.share_group"),
    ],
)
def test_model_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        ModelConfig(**kwargs)


def test_unknown_preset_and_fields():
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})


def test_dict_round_trip():
    cfg = ModelConfig.preset("tiny").replace(memory={"layers": (1, 3)})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def _real_counts(model: LM) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    tables = 0
    for layer in model.memory_layers():
        values, pre_values = layer.tables()
        tables += values.numel() + pre_values.numel()
        tables -= layer.cfg.top_m * (layer.cfg.value_dim + layer.cfg.pre_value_dim)
    if model.value_store is not None:  # counted once per layer above, once in total
        store = model.value_store.values.numel() + model.value_store.pre_values.numel()
        tables -= store * (len(model.memory_layers()) - 1)
    return {"total": total, "active": total - tables}


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_embeddings": False, "qk_norm": False},
        {"memory": {"shared_rank_query": True}},
        {"memory": {"layers": (0, 2)}},
        {"memory": {"share_group": 2}},
        {"memory": None},
    ],
)
def test_count_params_matches_instantiated_model(changes):
    cfg = ModelConfig.preset("tiny").replace(**changes)
    assert count_params(cfg) == _real_counts(LM(cfg))


@pytest.mark.parametrize(
    "name,active,total",
    [("umv2-227m-1.2b", 225e6, 1.18e9), ("umv2-1b-7b", 1079e6, 6.70e9)],
)
def test_paper_presets_within_two_percent_of_table_10(name, active, total):
    counts = count_params(ModelConfig.preset(name))
    assert abs(counts["active"] / active - 1) < 0.02, counts
    assert abs(counts["total"] / total - 1) < 0.02, counts


def test_tiny_preset_is_small():
    counts = count_params(ModelConfig.preset("tiny"))
    assert counts["total"] < 5e6
    assert torch.tensor(counts["active"]) < counts["total"]


def test_old_config_names_still_work():
    """MemoryConfig is UltraMemV2Config's former name: code written against it keeps working."""
    from ultramem import MemoryConfig, UltraMemV2Config

    assert MemoryConfig is UltraMemV2Config
    assert UltraMemV2Config(rowcol_topk=8, top_m=16).preselect_k == 8
