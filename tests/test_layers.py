"""The sparse-layer contract: every registered kind implements it, and a new kind needs only its
config, its layer class and one registry line for the model, init, accounting and diagnostics."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from ultramem import LM, ModelConfig
from ultramem.accounting import count_params, decode_bytes, retrieval_flops
from ultramem.config import ARCHS, SPARSE_CONFIGS
from ultramem.diagnostics import layer_diagnostics
from ultramem.init import balance_table, linear_std, swiglu_output_variance
from ultramem.layers import LAYER_CLASSES, SparseLayer, Table
from ultramem.ops import weighted_lookup

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_kind_is_registered_and_implements_the_contract():
    assert set(LAYER_CLASSES) == set(SPARSE_CONFIGS)
    hooks = ("forward", "retrieve", "init_weights", "dense_params", "sparse_tables")
    for kind, cls in LAYER_CLASSES.items():
        assert issubclass(cls, SparseLayer), kind
        missing = [h for h in hooks if getattr(cls, h) is getattr(SparseLayer, h)]
        assert not missing, (kind, missing)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "dense"])
def test_every_layer_keeps_the_contract(arch):
    model = LM(ModelConfig.preset(f"tiny/{arch}", max_seq_len=16))
    params = {id(p) for p in model.parameters()}
    u = torch.randn(3, 5, model.cfg.d_model)
    for layer in model.memory_layers():
        assert layer.n_slots == len(model.memory_layers())
        scores, rows = layer.retrieve(u)  # [T, picks] (scores per core: [T, picks, c])
        assert rows.shape[0] == 15 and scores.shape[:2] == rows.shape
        assert 0 <= int(rows.min()) and int(rows.max()) < layer.n_rows
        assert layer(u).shape == u.shape
        layer.pop_aux_loss()
        assert layer.pop_aux_loss() is None  # read once
        assert all(id(p) in params for p in layer.value_parameters())
        assert "paper_ffn_var" in layer.init_stats  # set by init_lm through init_weights


# -- a seventh kind, written against the contract alone ------------------------------------


@dataclass(frozen=True)
class RowsConfig:
    """Each token reads the top_k of n_values rows chosen by a linear router."""

    kind: str = "rows"
    ffn_dropped = False
    n_values: int = 48
    top_k: int = 4
    layers: tuple[int, ...] | None = None


class RowsLayer(SparseLayer):
    def __init__(self, cfg: RowsConfig, d_model: int, *, slot: int = 0, n_slots: int = 1,
                 store: None = None):
        super().__init__(cfg, d_model, slot=slot, n_slots=n_slots)
        self.router = nn.Linear(d_model, cfg.n_values, bias=False)
        self.values = nn.Parameter(torch.empty(cfg.n_values, d_model))

    def retrieve(self, u):
        return self.router(self._flat(u)).topk(self.cfg.top_k, dim=-1)

    def forward(self, u):
        scores, rows = self.retrieve(u)
        return weighted_lookup(self.values, rows, scores.softmax(-1)).view(u.shape)

    def value_parameters(self):
        return [self.values]

    def init_weights(self, target_var, n_layers, generator, *, init_tables=True):
        self.router.weight.normal_(std=linear_std(self.d_model), generator=generator)
        self.init_stats = balance_table(self, self.values, target_var, generator,
                                        init_tables=init_tables)
        return self.init_stats

    @staticmethod
    def dense_params(cfg, d_model):
        return d_model * cfg.n_values

    @staticmethod
    def sparse_tables(cfg, d_model, n_layers):
        return [Table(cfg.n_values, d_model, cfg.top_k, n_layers)]


def test_a_new_kind_needs_its_config_its_layer_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(SPARSE_CONFIGS, "rows", RowsConfig)  # its config
    monkeypatch.setitem(LAYER_CLASSES, "rows", RowsLayer)  # the registry line
    cfg = ModelConfig(n_layers=3, d_model=32, n_heads=2, ffn_hidden=64, max_seq_len=16,
                      memory=RowsConfig(layers=(0, 2)))
    model = LM(cfg, seed=0)
    assert [b.memory is not None for b in model.blocks] == [True, False, True]
    # accounting: exact, from the config alone
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    assert retrieval_flops(cfg) == 0
    assert decode_bytes(cfg, 1)["sparse"] == pytest.approx(2 * 2 * 4 * 32)
    # init: balanced against the FFN
    target = swiglu_output_variance(32, 64, 3)
    u = torch.randn(1024, 32)
    with torch.no_grad():
        ratios = [layer(u).var().item() / target for layer in model.memory_layers()]
    assert all(0.75 < r < 1.33 for r in ratios), ratios
    # diagnostics and training
    stats = layer_diagnostics(model.memory_layers()[0], u)
    assert stats["kind"] == "rows" and 0 < stats["fraction_used"] <= 1
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx)[1].backward()
    assert all(p.grad is not None for p in model.parameters())
