"""Trainer pieces: schedules, parameter groups, row-sparse optimizers, clipping, NaN guard, CLI."""

from __future__ import annotations

import math

import pytest
import torch

from ultramem import LM, ModelConfig
from ultramem.cli import main as cli_main
from ultramem.config import ConfigError
from ultramem.train.config import TrainConfig, build_configs
from ultramem.train.metrics import read_metrics
from ultramem.train.optim import lr_at, param_groups, value_lr_multiplier
from ultramem.train.sparse import RowAdagrad, RowSparseAdam, Workspace, clip_grads
from ultramem.train.trainer import NonFiniteError, Trainer

SMALL_MODEL = dict(n_layers=2, d_model=64, n_heads=2, ffn_hidden=128, max_seq_len=32,
                   memory=dict(n_keys=16, key_dim=16, top_m=8, value_dim=16, pre_value_dim=16,
                               init_samples=256))


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(**SMALL_MODEL).replace(**changes)


def quick(**changes) -> TrainConfig:
    base = dict(steps=3, batch_size=2, seq_len=16, warmup=1, log_every=1, eval_every=0,
                ckpt_every=0, tensorboard=False, plot=False, device="cpu")
    return TrainConfig(**{**base, **changes})


# ----------------------------------------------------------------------------- schedules


def test_lr_schedules():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.55)  # cosine midpoint between 1 and 0.1
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    wsd = cfg.replace(schedule="wsd", decay_frac=0.2)
    assert lr_at(wsd, 50) == 1.0 and lr_at(wsd, 82) == 1.0
    assert lr_at(wsd, 100) == pytest.approx(0.1)
    assert lr_at(wsd, 91) == pytest.approx(1.0 - 0.9 * 0.5)
    assert value_lr_multiplier(cfg, 0) == 1.0 and value_lr_multiplier(cfg, 99) == 1.0
    v1 = cfg.replace(value_lr_schedule="v1")
    assert value_lr_multiplier(v1, 0) == pytest.approx(4.0)
    assert value_lr_multiplier(v1, 99) == pytest.approx(1.0)
    # auto: UltraMem v1 models follow their own config's schedule, every other model is constant
    v1_memory = ModelConfig.preset("tiny/ultramem_v1").memory
    assert value_lr_multiplier(cfg, 0, v1_memory) == pytest.approx(v1_memory.value_lr_start)
    assert value_lr_multiplier(cfg, 99, v1_memory) == pytest.approx(v1_memory.value_lr_end)
    v2_memory = ModelConfig.preset("tiny").memory
    assert value_lr_multiplier(cfg, 0, v2_memory) == 1.0


def test_value_tables_get_their_own_lr(tmp_path):
    from ultramem.train.optim import build_optimizers, set_lrs

    cfg = TrainConfig(steps=10, warmup=0, lr=1.0, schedule="constant", value_lr_schedule="v1",
                      value_lr_scale=0.5)
    for update in ("sparse", "dense"):
        opts = build_optimizers(LM(small_cfg(), seed=0), cfg.replace(value_update=update))
        assert set_lrs(opts, cfg, 0) == (1.0, pytest.approx(2.0))
        lrs = {g["name"]: g["lr"] for o in opts.values() for g in o.param_groups}
        assert lrs == {"decay": 1.0, "no_decay": 1.0, "values": pytest.approx(2.0)}
        decays = {g["name"]: g["weight_decay"] for o in opts.values() for g in o.param_groups}
        assert decays == {"decay": 0.1, "no_decay": 0.0, "values": 0.0}
        assert isinstance(opts.get("values"), RowSparseAdam) == (update == "sparse")


def test_param_groups_cover_everything_once():
    model = LM(small_cfg(), seed=0)
    groups = param_groups(model)
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    values = {names[id(p)] for p in groups["values"]}
    assert values == {f"blocks.{i}.memory.{t}" for i in range(2) for t in ("values", "pre_values")}
    no_decay = {names[id(p)] for p in groups["no_decay"]}
    assert "blocks.0.attn_norm.weight" in no_decay
    assert "blocks.0.memory.keys.cores" in no_decay
    assert "blocks.0.memory.keys.query_gain" in no_decay
    decay = {names[id(p)] for p in groups["decay"]}
    assert "blocks.0.ffn.up.weight" in decay and "embed.weight" in decay


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ConfigError, match="^steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="nope"):
        build_configs("tiny", None, ["nope=1"])


def test_build_configs_yaml_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\nmodel:\n  n_layers: 2\n  memory:\n    top_m: 8\n"
                 "train:\n  lr: 1.0e-3\n  steps: 7\n")
    model, train, extra = build_configs(None, f, ["lr=3e-4", "model.memory.top_m=4",
                                                  "train.precision=bf16"])
    assert model.n_layers == 2 and model.memory.top_m == 4 and model.memory.n_keys == 64
    assert train.lr == 3e-4 and train.steps == 7 and train.precision == "bf16"
    assert extra["preset"] == "tiny"


# ----------------------------------------------------------------------------- optimizers


def test_row_sparse_adam_equals_adamw_when_every_row_is_touched():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = RowSparseAdam([a], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for step in range(5):
        g = torch.randn(6, 4)
        a.grad = (g.to_sparse(1), g.clone(), g.to_sparse())[step % 3]  # row-sparse, dense, COO
        b.grad = g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_row_sparse_adam_is_lazy():
    """Untouched rows and their state stay put; a row's steps count only when it is read."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    start = p.detach().clone()
    opt = RowSparseAdam([p], lr=0.1, betas=(0.9, 0.99))
    row_ref = torch.nn.Parameter(start[2:3].clone())
    ref = torch.optim.Adam([row_ref], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    for step in range(4):
        g = torch.randn(1, 3)
        rows = torch.tensor([[2, 4]]) if step in (0, 3) else torch.tensor([[2]])
        vals = torch.cat([g, torch.ones(1, 3)]) if rows.shape[1] == 2 else g
        p.grad = torch.sparse_coo_tensor(rows, vals, (5, 3), check_invariants=True)
        opt.step()
        row_ref.grad = g
        ref.step()
    torch.testing.assert_close(p[2:3], row_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(p[[0, 1, 3]], start[[0, 1, 3]])
    assert opt.state[p]["row_steps"].tolist() == [0, 0, 4, 0, 2]
    # Row 4 ran two Adam steps with gradient 1: each moves it by lr * 1 (bias-corrected).
    torch.testing.assert_close(p[4], start[4] - 0.2, rtol=1e-5, atol=1e-5)


def test_row_adagrad_matches_reference():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    start = p.detach().clone()
    opt = RowAdagrad([p], lr=0.5)
    acc = torch.zeros(4)
    expect = start.clone()
    for _ in range(3):
        g = torch.randn(2, 3)
        rows = torch.tensor([1, 3])
        p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), g, (4, 3), check_invariants=True)
        opt.step()
        acc[rows] += g.pow(2).mean(1)
        expect[rows] -= 0.5 * g / (acc[rows].sqrt().unsqueeze(1) + 1e-8)
    torch.testing.assert_close(p.detach(), expect)
    assert torch.equal(p[[0, 2]], start[[0, 2]])


def test_clip_grads_sparse_and_dense():
    a = torch.nn.Parameter(torch.zeros(4, 2))
    b = torch.nn.Parameter(torch.zeros(3))
    # Uncoalesced sparse gradient: row 1 appears twice and sums to (3, 4).
    a.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.tensor([[1.0, 2.0], [2.0, 2.0]]),
                                     (4, 2), check_invariants=True)
    b.grad = torch.tensor([0.0, 0.0, 12.0])
    norm = clip_grads([a, b], max_norm=1.3)
    assert norm == pytest.approx(13.0)
    assert a.grad.to_dense()[1].tolist() == pytest.approx([0.3, 0.4], rel=1e-5)
    assert b.grad.tolist() == pytest.approx([0, 0, 1.2], rel=1e-5)


# ----------------------------------------------------------------------------- trainer


def test_sparse_and_dense_value_updates_agree_on_the_first_step(tmp_path):
    """Step 1 of lazy Adam equals AdamW's (idle rows have zero moments either way)."""
    runs = {}
    for mode in ("sparse", "dense"):
        t = Trainer(small_cfg(), quick(steps=1, value_update=mode, value_grad_clip=0,
                                       grad_clip=0), tmp_path / mode, show_progress=False)
        t.fit()
        runs[mode] = t.model.state_dict()
    for k in runs["sparse"]:
        torch.testing.assert_close(runs["sparse"][k], runs["dense"][k], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    # float32: equal to 1e-6 (bf16 rounds the two batch shapes differently)
    a = Trainer(small_cfg(), quick(steps=1, batch_size=4, precision="fp32"), tmp_path / "a",
                show_progress=False)
    b = Trainer(small_cfg(), quick(steps=1, batch_size=2, grad_accum=2, precision="fp32"),
                tmp_path / "b", show_progress=False)
    a.opts = b.opts = {}  # keep the gradients: compare them, not Adam's sign-like first step
    ra, rb = a.train_step(0), b.train_step(0)
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
    assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    ga = dict(a.model.named_parameters())
    for name, p in b.model.named_parameters():
        g1, g2 = ga[name].grad, p.grad
        g1 = g1.to_dense() if g1.is_sparse else g1
        g2 = g2.to_dense() if g2.is_sparse else g2
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6, msg=name)


def _poison(trainer: Trainer, steps: set[int]):
    """A forward hook that makes the loss NaN on the given (0-based) forward calls."""
    calls = {"n": 0}

    def hook(module, args, output):
        n = calls["n"]
        calls["n"] += 1
        logits, loss = output
        return (logits, loss * float("nan")) if n in steps else output

    return trainer.model.register_forward_hook(hook)


def test_nan_step_is_skipped_counted_and_logged(tmp_path):
    t = Trainer(small_cfg(), quick(steps=4), tmp_path, show_progress=False)
    _poison(t, {1})
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train_step(0)
    t._zero_grad()
    after_first = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert any(not torch.equal(before[k], after_first[k]) for k in before)
    row = t.train_step(1)
    t._zero_grad()
    assert row.get("skipped") is True and row["skipped_steps"] == 1
    for k, v in t.model.state_dict().items():
        if k.endswith("direction_ref"):  # the forward's pre-selection direction (of the cores
            continue  # step 0 left), recorded by the forward itself, not by the skipped update
        assert torch.equal(v, after_first[k]), f"{k} changed on a skipped step"
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values())
    summary = t.fit()  # continues from where the hook left off: steps 3, 4 are fine
    assert summary["skipped_steps"] == 1


def test_nan_run_stops_after_max_bad_steps(tmp_path):
    t = Trainer(small_cfg(), quick(steps=10, max_bad_steps=3), tmp_path, show_progress=False)
    _poison(t, set(range(100)))
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        t.fit()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["skipped"] and math.isnan(r["loss"]) for r in rows)


def test_bf16_autocast_trains(tmp_path):
    t = Trainer(small_cfg(), quick(steps=2, precision="bf16"), tmp_path, show_progress=False)
    summary = t.fit()
    assert math.isfinite(summary["final_loss"]) and summary["skipped_steps"] == 0


CLI_SETS = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.ffn_hidden=128",
            "model.memory.n_keys=16", "model.memory.key_dim=16", "model.memory.top_m=8",
            "model.memory.value_dim=16", "model.memory.pre_value_dim=16",
            "model.memory.init_samples=256", "batch_size=4", "seq_len=32", "log_every=2",
            "eval_every=5", "eval_batches=2", "ckpt_every=5", "warmup=2", "lr=3e-3",
            "device=cpu"]


def _train_argv(out, steps: int, *extra: str) -> list[str]:
    argv = ["train", "--preset", "tiny", "--steps", str(steps), "--out", str(out), "--quiet"]
    for s in CLI_SETS:
        argv += ["--set", s]
    return argv + list(extra)


def test_train_cli_writes_metrics_plot_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_train_argv(out, 10)) == 0
    printed = capsys.readouterr().out
    assert "done: 10 steps" in printed
    assert f"checkpoint: {out / 'checkpoints' / 'step_00000010'}" in printed
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 8, 10]
    for key in ("loss", "lr", "value_lr", "tokens_per_s", "grad_norm", "mem/coverage",
                "mem/tucker_sv2_over_sv1"):
        assert key in rows[-1], key
    assert "eval_loss" in rows[2] and "eval_loss" in rows[-1]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert 0 < rows[-1]["mem/coverage"] <= 1
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000005", "step_00000010"] \
        or sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005",
                                                                       "step_00000010"]


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_train_cli_refuses_an_existing_run_and_overwrite_clears_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_train_argv(out, 10, "--set", "tensorboard=false", "--set", "plot=false")) == 0
    before = _snapshot(out)
    capsys.readouterr()
    # A fresh run into it: refused, one line naming the way out, nothing touched.
    assert cli_main(_train_argv(out, 5)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(out) == before
    assert cli_main(_train_argv(out, 5, "--resume", "--overwrite")) == 2
    assert _snapshot(out) == before
    # --overwrite: the old run is gone, the new one alone is there.
    assert cli_main(_train_argv(out, 5, "--overwrite", "--set", "ckpt_every=0")) == 0
    assert [r["step"] for r in read_metrics(out)] == [2, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005"]


def test_train_cli_overwrite_deletes_only_run_directories(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli_main(_train_argv(out, 2, "--overwrite")) == 2
    assert "holds no run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert cli_main(_train_argv(tmp_path / "empty_is_fine", 2)) == 0


def test_nan_tucker_core_is_a_skipped_step_not_an_exception(tmp_path):
    """A non-finite Tucker core gives a non-finite loss (no linear-algebra error in the
    forward, the penalty or the logged core spectra): the step is skipped like any other."""
    from ultramem.train.trainer import memory_diagnostics

    t = Trainer(small_cfg(), quick(steps=3, log_every=1), tmp_path, show_progress=False)
    with torch.no_grad():
        t.model.memory_layers()[0].keys.cores[0, 0, 0] = float("nan")
    row = t.train_step(0)
    assert row.get("skipped") is True and row["skipped_steps"] == 1
    assert "mem/coverage" in memory_diagnostics(t.model)  # the other diagnostics still log


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lazy_adam_fast_path_equals_its_reference(wd):
    """RowSparseAdam's update (reused buffers, in-place) against the readable form, over steps
    whose row sets overlap, grow and shrink (the workspace is reused and regrown)."""
    from ultramem.train.sparse import lazy_adam_rows, lazy_adam_rows_reference

    torch.manual_seed(0)
    p, m, v = torch.randn(64, 5), torch.zeros(64, 5), torch.zeros(64, 5)
    n = torch.zeros(64, dtype=torch.int64)
    ref = [t.clone() for t in (p, m, v, n)]
    ws = Workspace()
    for u in (10, 40, 3, 64, 25):
        rows = torch.randperm(64)[:u].sort().values
        g = torch.randn(u, 5)
        lazy_adam_rows(p, m, v, n, rows, g, 0.05, 0.9, 0.95, 1e-8, wd, ws)
        lazy_adam_rows_reference(*ref, rows, g, 0.05, 0.9, 0.95, 1e-8, wd)
        for ours, theirs in zip((p, m, v, n), ref, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert torch.equal(n, ref[3]) and int(n.max()) >= 2
