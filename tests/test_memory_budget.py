"""The training memory breakdown (`ultramem.memory_budget`): arithmetic by hand on a tiny config,
the static parts against the tensors of a built model and its optimizers after a real step, and
the activation estimate against the bytes autograd actually saves."""

import pytest
import torch

from ultramem import accounting
from ultramem import memory_budget as mb
from ultramem.config import ModelConfig
from ultramem.model import LM
from ultramem.train.config import TrainConfig
from ultramem.train.optim import build_optimizers


def _cfg(**mem) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(memory={"n_keys": 16, **mem})


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_static_parts_by_hand():
    cfg = _cfg()
    # tiny: 4 blocks, each with an UltraMemV2 layer of 16 x 16 = 256 rows, Dv = Dp = 32
    rows, width, copies = 256, 64, 4
    dense = accounting.dense_params(cfg)
    for opt, table_state in (("adam", 8 * rows * width * copies + 8 * rows * 2 * copies),
                             ("adagrad", 4 * rows * 2 * copies)):
        got = mb.training_memory(cfg, TrainConfig(value_optimizer=opt))
        assert got["dense_weights"] == got["dense_grads"] == 4 * dense
        assert got["dense_optimizer"] == 8 * dense
        assert got["tables"] == 4 * rows * width * copies
        assert got["table_optimizer"] == table_state
        assert got["buffers"] == (8 * rows + 4 * 2) * copies + 4 * cfg.max_seq_len * cfg.head_dim
    dense_run = mb.training_memory(cfg, TrainConfig(value_update="dense"))
    assert dense_run["table_grads"] == 4 * rows * width * copies
    assert dense_run["table_optimizer"] == 8 * rows * width * copies


def test_sparse_table_grads_by_hand():
    cfg = _cfg()
    table = accounting.sparse_tables(cfg)[0]
    train = TrainConfig(batch_size=2, seq_len=8)
    u = table.rows * (1 - (1 - table.picks / table.rows) ** 16)  # distinct rows of 16 tokens
    assert mb.training_memory(cfg, train)["table_grads"] == pytest.approx(
        table.copies * u * (4 * 64 + 2 * 8))
    accum = mb.training_memory(cfg, train.replace(grad_accum=3))["table_grads"]
    u3 = table.rows * (1 - (1 - table.picks / table.rows) ** 48)
    assert accum == pytest.approx(table.copies * (3 * u + u3) * (4 * 64 + 2 * 8))
    parts = mb.training_memory(cfg, train)
    assert parts["total"] == pytest.approx(
        sum(v for k, v in parts.items() if k not in ("total", "resume_peak")))


@pytest.mark.parametrize("value_optimizer", ["adam", "adagrad", "dense"])
def test_static_parts_match_built_model(value_optimizer):
    cfg = _cfg()
    dense_update = value_optimizer == "dense"
    train = TrainConfig(batch_size=2, seq_len=16,
                        value_update="dense" if dense_update else "sparse",
                        value_optimizer="adam" if dense_update else value_optimizer)
    model = LM(cfg.replace(memory={"sparse_grad": not dense_update}), seed=0)
    opts = build_optimizers(model, train)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    for opt in opts.values():
        opt.step()
    tables = {id(p) for g in opts["main"].param_groups if g.get("name") == "values"
              for p in g["params"]}
    if "values" in opts:
        tables |= {id(p) for p in opts["values"].param_groups[0]["params"]}
    params = list(model.parameters())
    got = mb.training_memory(cfg, train)
    assert got["dense_weights"] == _nbytes(p for p in params if id(p) not in tables)
    assert got["tables"] == _nbytes(p for p in params if id(p) in tables)
    assert got["buffers"] == _nbytes(model.buffers())
    assert got["dense_grads"] == _nbytes(p.grad for p in params if id(p) not in tables)

    def state_bytes(opt, keep):
        return _nbytes(v for p, s in opt.state.items() if keep(p) for k, v in s.items()
                       if torch.is_tensor(v) and k != "step")  # AdamW's scalar steps: not counted

    assert got["dense_optimizer"] == state_bytes(opts["main"], lambda p: id(p) not in tables)
    table_state = state_bytes(opts["main"], lambda p: id(p) in tables)
    if "values" in opts:
        table_state += state_bytes(opts["values"], lambda p: True)
    assert got["table_optimizer"] == table_state
    if dense_update:
        assert got["table_grads"] == _nbytes(p.grad for p in params if id(p) in tables)


def _saved_bytes(cfg: ModelConfig, tokens: int, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves in one bf16 forward (weights excluded)."""
    model = LM(cfg.replace(memory={"sparse_grad": True}), seed=0)
    model.activation_checkpointing = checkpointing
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("cfg", [
    _cfg(),
    ModelConfig.preset("umv2-227m-1.2b").replace(n_layers=2, vocab_size=256, max_seq_len=256,
                                                 memory={"n_keys": 24}),
], ids=["tiny", "227m-2-blocks"])
def test_activation_estimate_matches_saved_tensors(cfg):
    tokens = 128
    measured = _saved_bytes(cfg, tokens, checkpointing=False)
    est = mb.activation_bytes(cfg, tokens, checkpointing=False)
    assert est["saved"] + est["weight_copies"] == pytest.approx(measured, rel=0.05)
    measured_ckpt = _saved_bytes(cfg, tokens, checkpointing=True)
    est_ckpt = mb.activation_bytes(cfg, tokens, checkpointing=True)
    head_copy = 2 * cfg.vocab_size * cfg.d_model  # the blocks' copies come back in recompute
    assert est_ckpt["saved"] + head_copy == pytest.approx(measured_ckpt, rel=0.1)
    assert est_ckpt["total"] < est["total"]


def test_breakdown_table_compares_with_dense_adamw():
    cfg = ModelConfig.preset("umv2-227m-1.2b").replace(vocab_size=256)
    runs = mb.breakdown(cfg, TrainConfig(batch_size=4, seq_len=512))
    assert list(runs) == ["RowSparseAdam tables", "dense AdamW tables"]
    table = mb.breakdown_table(cfg, TrainConfig(value_optimizer="adagrad"))
    assert "RowAdagrad tables" in table and "dense AdamW tables" in table
    assert len(table.splitlines()) == 2 + len(mb.ROWS)
