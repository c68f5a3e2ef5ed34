"""The knowledge-capacity experiment: the fact world, matched sizes, the bits-stored measure,
training and the report."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from ultramem import accounting
from ultramem.config import ConfigError
from ultramem.eval.capacity import (
    CAPACITY_ARCHS,
    CapacityConfig,
    WorldConfig,
    make_world,
    matched_config,
    measure,
    run_capacity,
    train_capacity,
)


def test_world_rows_are_distinct_names_with_uniform_values():
    w = WorldConfig(n_subjects=200, n_relations=3, n_values=16, n_syllables=8, name_len=3)
    rows = make_world(w)
    assert rows.shape == (600, 5) and rows.dtype == torch.int64
    names = rows[:, :3]
    assert int(names.max()) < w.n_syllables
    assert len({tuple(r) for r in names[::3].tolist()}) == 200  # every name differs
    assert rows[:, 3].tolist() == [8, 9, 10] * 200  # relation tokens after the syllables
    values = rows[:, 4] - w.value_offset
    assert 0 <= int(values.min()) and int(values.max()) < 16
    assert len(set(values.tolist())) == 16
    assert torch.equal(rows, make_world(w))  # seeded
    assert not torch.equal(rows, make_world(WorldConfig(**{**w.__dict__, "seed": 1})))


def test_world_refuses_more_names_than_syllables_allow():
    with pytest.raises(ConfigError, match="n_subjects"):
        WorldConfig(n_subjects=100, n_syllables=4, name_len=3)


class _Fixed(nn.Module):
    """Logits that put `confidence` on the true value of each fact (or none: uniform)."""

    def __init__(self, facts, vocab: int, confidence: float | None):
        super().__init__()
        self.answers = {tuple(r[:-1]): int(r[-1]) for r in facts.tolist()}
        self.vocab, self.confidence = vocab, confidence

    def forward(self, x):
        logits = torch.zeros(x.shape[0], x.shape[1], self.vocab)
        if self.confidence is not None:
            for i, row in enumerate(x.tolist()):
                logits[i, -1, self.answers[tuple(row)]] = self.confidence
        return logits, None


def test_bits_stored_is_zero_for_a_uniform_model_and_everything_for_a_sure_one():
    w = WorldConfig(n_subjects=30, n_relations=2, n_values=32, n_syllables=4, name_len=3)
    facts = make_world(w)
    sure = measure(_Fixed(facts, w.vocab_size, 100.0), facts, w, batch=7)
    assert sure.recalled == 60
    assert sure.bits == pytest.approx(60 * 5, rel=1e-6)  # 5 bits per fact, all stored
    blank = measure(_Fixed(facts, w.vocab_size, None), facts, w)
    assert blank.bits == 0 and blank.loss == pytest.approx(math.log(w.vocab_size))
    # Probability p on the true value stores log2(32 p) bits per fact.
    p_true = math.e ** 3 / (math.e ** 3 + w.vocab_size - 1)
    half = measure(_Fixed(facts, w.vocab_size, 3.0), facts, w)
    assert half.bits == pytest.approx(60 * math.log2(32 * p_true), rel=1e-6)


@pytest.mark.parametrize("arch", CAPACITY_ARCHS)
def test_matched_sizes(arch):
    cfg = CapacityConfig(d_model=32, ffn_hidden=128)
    ref = accounting.count_params(matched_config("dense", 1, cfg, cfg.world))["total"]
    for m in (2.0, 4.0):
        c = accounting.count_params(matched_config(arch, m, cfg, cfg.world))
        assert c["total"] == pytest.approx(m * ref, rel=0.03), (arch, m, c)
        if arch == "dense":
            assert c["active"] == c["total"]
        else:  # MoE routers and UltraMem v1 keys grow with the total: documented, bounded
            assert c["active"] == pytest.approx(ref, rel=0.01 if arch not in (
                "moe", "ultramem_v1") else 0.12), (arch, m, c)


def _tiny(tmp_path, **changes) -> CapacityConfig:
    base = dict(world=WorldConfig(n_subjects=48, n_relations=2, n_values=16, n_syllables=6),
                d_model=16, n_heads=2, ffn_hidden=32, epochs=24, batch_size=32, lr=1e-2,
                measure_every=8, out=str(tmp_path / "out"), work=str(tmp_path / "work"))
    return CapacityConfig(**{**base, **changes})


def test_training_stores_facts_and_a_finished_run_is_reused(tmp_path, one_thread):
    cfg = _tiny(tmp_path)
    logs: list[str] = []
    row = train_capacity(cfg, "ultramem_v2", 2.0, tmp_path / "r", logs.append)
    bits = [c["bits"] for c in row["curve"]]
    assert [c["epoch"] for c in row["curve"]] == [8, 16, 24]
    assert bits[-1] > bits[0] > 0 and row["bits"] == bits[-1]
    assert row["bits_per_total"] == pytest.approx(row["bits"] / row["total_params"])
    assert json.loads((tmp_path / "r" / "result.json").read_text())["bits"] == row["bits"]
    # Its retrieval is recorded: one recall per UltraMemV2 layer, each a share.
    ret = row["retrieval"]
    assert len(ret["per_layer"]) == len(ret["per_layer_neg"]) == cfg.n_layers
    assert all(0.0 <= x <= 1.0 for x in ret["per_layer"] + ret["per_layer_neg"])
    assert ret["tokens"] == 48 * 2 * 4  # every token of every fact of this small world
    assert len(ret["out_over_ffn"]) == cfg.n_layers and all(x > 0 for x in ret["out_over_ffn"])
    logs.clear()
    again = train_capacity(cfg, "ultramem_v2", 2.0, tmp_path / "r", logs.append)
    assert again["bits"] == row["bits"] and "reusing" in logs[0]
    changed = train_capacity(_tiny(tmp_path, epochs=8), "ultramem_v2", 2.0, tmp_path / "r",
                             logs.append)
    assert len(changed["curve"]) == 1  # other settings: trained again, not reused


def test_value_lr_scale_reaches_the_tables_and_keeps_old_runs_reusable(tmp_path, one_thread,
                                                                      monkeypatch):
    from ultramem.train import optim

    seen: list[tuple[float, float]] = []
    real = optim.set_lrs

    def spy(opts, train_cfg, step, memory_cfg):
        out = real(opts, train_cfg, step, memory_cfg)
        groups = [g for o in opts.values() for g in o.param_groups]
        tables = {g["lr"] for g in groups if g.get("name") == "values"}
        dense = {g["lr"] for g in groups if g.get("name") != "values"}
        seen.append((dense, tables))
        return out

    monkeypatch.setattr(optim, "set_lrs", spy)
    cfg = _tiny(tmp_path, epochs=2, measure_every=2, value_lr_scale=4.0)
    train_capacity(cfg, "ultramem_v2", 2.0, tmp_path / "r", lambda m: None)
    assert seen and all(len(d) == len(t) == 1 for d, t in seen), seen[:3]
    assert all(t.pop() == pytest.approx(4.0 * d.pop()) for d, t in seen), seen[:3]
    # Settings: the default scale is left out, so runs made before the field existed match.
    assert "value_lr_scale" not in _tiny(tmp_path).settings()
    assert _tiny(tmp_path, value_lr_scale=4.0).settings("pkm")["value_lr_scale"] == 4.0
    # ... and so is it for architectures without tables: their runs are reused across scales.
    for arch in ("dense", "moe"):
        assert _tiny(tmp_path, value_lr_scale=4.0).settings(arch) == _tiny(tmp_path).settings()
    with pytest.raises(ValueError, match="value_lr_scale"):
        _tiny(tmp_path, value_lr_scale=0.0)


def test_run_capacity_writes_the_report(tmp_path, one_thread):
    cfg = _tiny(tmp_path, archs=("dense", "moe"), multiples=(2.0,), dense_multiples=(1.0,),
                epochs=4, measure_every=2, command="ultramem capacity --test")
    result = run_capacity(cfg, log=lambda m: None)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["capacity.json", "capacity.md",
                                                     "capacity.png"]
    md = (out / "capacity.md").read_text()
    assert "ultramem capacity --test" in md and "moe_x2" in md and "dense_x1" in md
    assert "| saturation |" in md and "last fifth" in md
    saved = json.loads((out / "capacity.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["dense_x1", "moe_x2"]
    assert saved["runs"][1]["bits"] == result["runs"][1]["bits"]
    # --report-only: the finished runs of a larger plan, the others named, nothing trained.
    more = _tiny(tmp_path, archs=("dense", "moe", "pkm"), multiples=(2.0,),
                 dense_multiples=(1.0,), epochs=4, measure_every=2, report_only=True, jobs=3)
    again = run_capacity(more, log=lambda m: None)
    assert [r["name"] for r in again["runs"]] == ["dense_x1", "moe_x2"]
    assert again["not_run"] == ["pkm_x2"] and not (tmp_path / "work" / "pkm_x2").exists()
    md = (out / "capacity.md").read_text()
    assert "Not run yet (the plan's other runs): pkm_x2." in md
    assert "Pre-selection recall" not in md  # no UltraMemV2 run
    # The header says how the runs were trained, not the reporting invocation's --jobs 3.
    assert "runs trained 1 run(s) at a time with 1 thread(s) each." in md and "3 run(s)" not in md


@pytest.mark.parametrize("arch", ["ultramem_v2", "moe"])
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, one_thread,
                                                                       monkeypatch, arch):
    """Killed after its epoch-8 checkpoint, the run resumes there (model, both optimizers, the
    fact order) and ends with the same bits, curve and losses as a run never stopped."""
    import ultramem.eval.capacity as capacity
    from ultramem.train import checkpoint as ckpt

    cfg = _tiny(tmp_path, epochs=16, measure_every=8, value_lr_scale=4.0)
    whole = train_capacity(cfg, arch, 2.0, tmp_path / "whole", lambda m: None)
    real_measure, calls = capacity.measure, []

    def dies_at_the_second_measure(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(capacity, "measure", dies_at_the_second_measure)
    run = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_capacity(cfg, arch, 2.0, run, lambda m: None)
    assert not (run / "result.json").exists()
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000008"]
    assert ckpt.load_model(run / "checkpoints" / "step_00000008") is not None  # a real checkpoint
    monkeypatch.setattr(capacity, "measure", real_measure)
    logs: list[str] = []
    resumed = train_capacity(cfg, arch, 2.0, run, logs.append)
    assert any("resuming from epoch 8" in m for m in logs)
    assert resumed["bits"] == whole["bits"] and resumed["recalled"] == whole["recalled"]
    strip = [{k: v for k, v in c.items() if k != "seconds"} for c in whole["curve"]]
    assert [{k: v for k, v in c.items() if k != "seconds"} for c in resumed["curve"]] == strip
    # Finished: the trained model stays, in place of the mid-run checkpoint.
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000016"]
    assert ckpt.load_model(run).cfg.memory == ckpt.load_model(tmp_path / "whole").cfg.memory
    # A checkpoint of other settings is never resumed: the run starts over.
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(capacity, "measure", dies_at_the_second_measure)
        calls.clear()
        train_capacity(cfg, arch, 2.0, tmp_path / "other", lambda m: None)
    monkeypatch.setattr(capacity, "measure", real_measure)
    logs.clear()
    train_capacity(_tiny(tmp_path, epochs=16, measure_every=8, lr=5e-3), arch, 2.0,
                   tmp_path / "other", logs.append)
    assert not any("resuming" in m for m in logs)


def test_report_only_measures_the_retrieval_of_runs_that_predate_its_record(tmp_path,
                                                                              one_thread):
    from ultramem.eval.capacity import fact_retrieval, make_world
    from ultramem.train import checkpoint as ckpt

    cfg = _tiny(tmp_path, archs=("ultramem_v2+both_ends_equal",), multiples=(2.0,), epochs=2,
                measure_every=2)
    run_capacity(cfg, log=lambda m: None)
    path = tmp_path / "work" / "ultramem_v2+both_ends_equal_x2" / "result.json"
    row = json.loads(path.read_text())
    expected = fact_retrieval(ckpt.load_model(path.parent), make_world(cfg.world))
    assert row["retrieval"] == expected and expected["preselect_recall"] > 0.9  # both ends
    del row["retrieval"]  # as written before the record existed
    path.write_text(json.dumps(row))
    report = run_capacity(dataclasses.replace(cfg, report_only=True), log=lambda m: None)
    assert report["runs"][0]["retrieval"] == expected
    md = (tmp_path / "out" / "capacity.md").read_text()
    assert "Pre-selection recall of the trained UltraMemV2 layers" in md
    assert "| ultramem_v2+both_ends_equal_x2 |" in md


def test_both_ends_variant_is_ultramem_v2_with_another_preselection(tmp_path):
    from ultramem.eval.capacity import CAPACITY_VARIANTS

    cfg = _tiny(tmp_path, archs=("ultramem_v2+both_ends_equal",))
    assert cfg.archs[0] in CAPACITY_VARIANTS and cfg.archs[0] not in CAPACITY_ARCHS
    base = matched_config("ultramem_v2", 2.0, cfg, cfg.world)
    both = matched_config("ultramem_v2+both_ends_equal", 2.0, cfg, cfg.world)
    assert accounting.count_params(both) == accounting.count_params(base)
    assert both.memory.preselect == "both_ends" and base.memory.preselect == "rank1"
    kr = base.memory.preselect_k
    assert both.memory.preselect_k == max(1, round(kr / math.sqrt(2)))
    assert both.replace(memory={"preselect": "rank1", "rowcol_topk": None}) == base


def test_cli_errors_are_one_line(tmp_path, capsys):
    from ultramem.cli import main

    assert main(["capacity", "--archs", "dense,nope", "--work", str(tmp_path)]) == 2
    assert "archs: unknown ['nope']" in capsys.readouterr().err
    assert main(["capacity", "--multiples", "2,x", "--work", str(tmp_path)]) == 2
    assert "--multiples: expected comma-separated numbers" in capsys.readouterr().err
    assert main(["capacity", "--subjects", "999999", "--work", str(tmp_path)]) == 2
    assert "world.n_subjects" in capsys.readouterr().err


def test_saturation_verdicts():
    from ultramem.eval.capacity_report import last_fifth_gain, saturation

    def run(points, world_bits=1000.0):
        curve = [{"epoch": e, "bits": b} for e, b in points]
        return {"curve": curve, "bits": curve[-1]["bits"], "world_bits": world_bits}

    flat = run([(20, 300.0), (40, 480.0), (60, 495.0), (80, 498.0), (100, 500.0)])
    assert last_fifth_gain(flat) == pytest.approx(0.004) and saturation(flat) == "levelled off"
    rising = run([(20, 100.0), (40, 200.0), (60, 300.0), (80, 400.0), (100, 500.0)])
    assert last_fifth_gain(rising) == pytest.approx(0.2) and saturation(rising) == "still rising"
    assert saturation(run([(50, 900.0), (100, 995.0)])) == "world filled"
    assert saturation(run([(100, 500.0)])) == "still rising"  # one point: nothing shows it


def _report(commit, runs):
    """A capacity report's JSON with runs (name, epochs, bits[, settings change])."""
    out = []
    for name, epochs, bits, *extra in runs:
        arch, mult = name.rsplit("_x", 1)
        settings = {"world": {"n_subjects": 8}, "lr": 0.01, "epochs": epochs,
                    "measure_every": epochs // 4, **(extra[0] if extra else {})}
        out.append({"name": name, "arch": arch, "multiple": float(mult), "settings": settings,
                    "total_params": 1000, "active_params": 500, "world_bits": 4000.0,
                    "bits": bits, "recalled": 10, "n_facts": 100, "bits_per_total": bits / 1000,
                    "bits_per_active": bits / 500, "cpu_seconds": 1.0,
                    "curve": [{"epoch": epochs, "bits": bits}]})
    return {"commit": commit, "config": {"command": f"ultramem capacity {commit}"}, "runs": out}


def test_passes_gathers_one_model_across_reports_and_judges_the_last_doubling():
    from ultramem.eval.capacity_passes import collect

    table = {"value_lr_scale": 4.0}
    result = collect([
        ("a", _report("c1", [("moe_x2", 100, 1000.0), ("ultramem_v2_x2", 100, 500.0, table),
                             ("dense_x1", 100, 900.0)])),
        ("b", _report("c2", [("moe_x2", 200, 1500.0), ("ultramem_v2_x2", 200, 900.0, table),
                             ("ultramem_v2_x4", 200, 700.0, table)])),
        ("c", _report("c3", [("moe_x2", 400, 1540.0), ("ultramem_v2_x2", 200, 950.0, table),
                             ("ultramem_v2_x2", 800, 1600.0, table),
                             ("moe_x2", 800, 1570.0, {"lr": 0.02})])),
    ])
    rows = {r["name"]: r for r in result["rows"]}
    # Only models at two or more pass counts; another lr is another model.
    assert list(rows) == ["moe_x2", "ultramem_v2_x2"]
    moe, um = rows["moe_x2"], rows["ultramem_v2_x2"]
    assert [p["epochs"] for p in moe["points"]] == [100, 200, 400]
    assert moe["gains"] == pytest.approx([0.5, 0.04 / 1.5])
    assert moe["verdict"] == "at capacity"
    # 200 -> 800 is two doublings: the rate per doubling, and over 5% shows nothing.
    assert um["gains"][-1] == pytest.approx((1600 / 900) ** 0.5 - 1)
    assert um["verdict"] == "not shown (last step > 2x)"
    # The first report's run is used where two hold the same passes; the other is listed.
    assert um["points"][1]["bits"] == 900.0 and um["points"][1]["report"] == "b"
    assert um["also"] == [{"epochs": 200, "bits": 950.0, "report": "c"}]
    # Against the MoE of the same size at the same passes (its tables' lr aside).
    assert um["over_reference"] == pytest.approx({100: 0.5, 200: 0.6})
    assert moe["over_reference"] == {}
    assert [r["commit"] for r in result["reports"]] == ["c1", "c2", "c3"]
    rising = collect([("a", _report("c1", [("moe_x2", 100, 1000.0)])),
                      ("b", _report("c2", [("moe_x2", 200, 1200.0)]))])["rows"][0]
    assert rising["verdict"] == "still rising"
    full = collect([("a", _report("c1", [("moe_x2", 100, 3000.0)])),
                    ("b", _report("c2", [("moe_x2", 200, 3990.0)]))])["rows"][0]
    assert full["verdict"] == "world filled"


def test_ceiling_extrapolates_shrinking_gains_per_doubling_and_only_those():
    from ultramem.eval.capacity_passes import ceiling, collect, markdown

    def pts(*pairs):
        return [{"epochs": e, "bits": b} for e, b in pairs]

    # Gains 400 then 200 per doubling: half each time, so 200 more in all (200 * 0.5 / 0.5).
    c = ceiling(pts((100, 1000.0), (200, 1400.0), (400, 1600.0)), world_bits=4000.0)
    assert c == pytest.approx({"shrink": 0.5, "bits": 1800.0, "capped": False,
                               "to_go": 1800 / 1600 - 1})
    # Capped at the world; growing gains and steps longer than a doubling give none.
    assert ceiling(pts((100, 1000.0), (200, 2000.0), (400, 2900.0)), 4000.0)["bits"] == 4000.0
    assert ceiling(pts((100, 1000.0), (200, 1200.0), (400, 1500.0)), 4000.0) is None
    assert ceiling(pts((100, 1000.0), (200, 1400.0), (800, 1600.0)), 4000.0) is None
    assert ceiling(pts((200, 1400.0), (400, 1600.0)), 4000.0) is None
    # Lost bits on the last doubling: the ceiling is where it ended.
    assert ceiling(pts((100, 1000.0), (200, 1400.0), (400, 1300.0)), 4000.0)["bits"] == 1300.0

    result = collect([
        ("a", _report("c1", [("moe_x2", 100, 1000.0), ("ultramem_v2_x2", 100, 500.0)])),
        ("b", _report("c2", [("moe_x2", 200, 1400.0), ("ultramem_v2_x2", 200, 800.0)])),
        ("c", _report("c3", [("moe_x2", 400, 1600.0), ("ultramem_v2_x2", 400, 1000.0)])),
    ])
    rows = {r["name"]: r for r in result["rows"]}
    # UltraMemV2: gains 300 then 200, shrink 2/3, 400 more: 1400 against the MoE's 1800.
    assert rows["ultramem_v2_x2"]["ceiling"]["bits"] == pytest.approx(1400.0)
    assert rows["ultramem_v2_x2"]["ceiling_over_reference"] == pytest.approx(1400 / 1800)
    md = markdown({"command": "x", "commit": "c", **result})
    assert "| ultramem_v2_x2 | 0.67 | 1.4K | 1.40 | +40% | 0.78 |" in md


def test_capacity_passes_command_reports_real_runs_and_names_bad_input(tmp_path, one_thread,
                                                                        capsys):
    from ultramem.cli import main

    for epochs in (2, 4):
        run_capacity(_tiny(tmp_path, archs=("moe",), multiples=(2.0,), epochs=epochs,
                           measure_every=2, out=str(tmp_path / f"r{epochs}"),
                           work=str(tmp_path / f"w{epochs}")), log=lambda m: None)
    out = tmp_path / "passes"
    assert main(["capacity-passes", str(tmp_path / "r2"), str(tmp_path / "r4" / "capacity.json"),
                 "--out", str(out)]) == 0
    md = (out / "passes.md").read_text()
    assert "| moe_x2 |" in md and "| 2 passes | 4 passes |" in md
    assert f"ultramem capacity-passes {tmp_path / 'r2'}" in md
    saved = json.loads((out / "passes.json").read_text())
    r4 = json.loads((tmp_path / "r4" / "capacity.json").read_text())
    assert saved["rows"][0]["points"][1]["bits"] == r4["runs"][0]["bits"]
    assert (out / "passes.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["capacity-passes", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere: no capacity.json" in capsys.readouterr().err
    assert main(["capacity-passes", str(tmp_path / "r2"), "--out", str(out)]) == 2
    assert "no run of these reports appears at two or more" in capsys.readouterr().err


def test_reports_without_matplotlib_skip_their_plots(monkeypatch, tmp_path):
    import sys

    from ultramem.eval import capacity_passes, capacity_report
    from ultramem.plots import pyplot

    assert pyplot() is not None  # installed for the tests
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    assert pyplot() is None
    one = _report("c1", [("moe_x2", 100, 1000.0)])
    result = capacity_passes.collect([("a", one), ("b", _report("c2", [("moe_x2", 200, 1200.0)]))])
    assert result["rows"] and capacity_passes.plot(result, tmp_path / "p.png") is None
    assert capacity_report.plot(one, tmp_path / "c.png") is None
    assert not list(tmp_path.iterdir())
