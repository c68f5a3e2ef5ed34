"""`ultramem study` end to end, CI-sized (a few steps: it must run, not win), and `ultramem eval`
on one of its checkpoints. Everything is written under tmp_path, never into docs/."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ultramem.cli import main
from ultramem.config import ARCHS
from ultramem.eval.study import ABLATIONS, StudyConfig, run_configs, run_study

CI = ["--family", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "48", "--n", "2",
      "--text-chars", "600", "--task-size", "ci", "--train-docs", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def study_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out, work = root / "out", root / "work"
    assert main(["study", *CI, "--out", str(out), "--work", str(work)]) == 0
    return out, work


def test_tiny_study_runs_end_to_end(study_dirs):
    out, work = study_dirs
    md = (out / "tiny.md").read_text()
    data = json.loads((out / "tiny.json").read_text())
    names = [r["name"] for r in data["runs"]]
    assert names == list(ARCHS) + [f"ultramem_v2+{a}" for a in ABLATIONS]
    for name in names:
        assert f"| {name} |" in md
    for section in ("## Loss", "## Task accuracy", "## Parametric memory", "## UltraMemV2 vs MoE",
                    "## Ablations of UltraMemV2", "ultramem study --family tiny --steps 2",
                    "the runs' own training and evaluation:"):
        assert section in md
    assert data["commit"] and data["wall_seconds"] > 0
    assert (out / "tiny_loss.png").stat().st_size > 0 and (out / "tiny_tasks.png").stat().st_size
    for r in data["runs"]:
        assert r["settings"]["steps"] == 2 and len(r["tasks"]) == 8
        assert 0 < r["text"]["bits_per_byte"] < 12
        assert r["final_loss"] == r["final_loss"]  # finite, not NaN
    # Matched family: equal activated parameters across the archs (not the ablations).
    active = {r["params"]["active"] for r in data["runs"] if "+" not in r["name"]}
    assert max(active) / min(active) < 1.01


def test_study_reuses_finished_runs_and_checks_names(study_dirs, tmp_path):
    out, work = study_dirs
    cfg = StudyConfig(family="tiny", steps=2, archs=("dense",), ablations=(), out=str(tmp_path),
                      work=str(work), batch_size=2, seq_len=48, n_examples=2, text_chars=600,
                      task_size="ci", train_docs=8, threads=1)
    logs: list[str] = []
    run_study(cfg, log=logs.append)
    assert any("dense: reusing" in line for line in logs)
    with pytest.raises(ValueError, match="archs"):
        StudyConfig(archs=("dense", "nope"))
    with pytest.raises(ValueError, match="ablations"):
        StudyConfig(ablations=("no_such_ablation",))


def test_eps_and_warmup_are_settings_only_when_they_differ_from_earlier_studies(study_dirs,
                                                                                tmp_path):
    import shutil

    _, work = study_dirs
    mine = tmp_path / "work"
    shutil.copytree(work, mine)  # a changed setting starts a run over: not in the shared fixture
    base = dict(family="tiny", steps=2, archs=("dense",), ablations=(), out=str(tmp_path),
                work=str(mine), batch_size=2, seq_len=48, n_examples=2, text_chars=600,
                task_size="ci", train_docs=8, threads=1)
    logs: list[str] = []
    run_study(StudyConfig(**base, eps=1e-8), log=logs.append)  # the earlier default: reused
    assert any("dense: reusing" in line for line in logs)
    logs.clear()
    run_study(StudyConfig(**base, eps=1e-15, warmup=1), log=logs.append)
    assert any("dense: training" in line for line in logs)
    run = mine / "tiny" / "dense"
    train = json.loads((run / "config.json").read_text())["train"]
    assert train["eps"] == 1e-15 and train["warmup"] == 1
    settings = json.loads((run / "eval.json").read_text())["settings"]
    assert settings["eps"] == 1e-15 and settings["warmup"] == 1
    with pytest.raises(ValueError, match="warmup"):
        StudyConfig(steps=10, warmup=11)
    with pytest.raises(ValueError, match="eps"):
        StudyConfig(eps=-1.0)


def test_report_only_reports_the_finished_runs_and_names_the_others(study_dirs, tmp_path,
                                                                    capsys):
    out, work = study_dirs
    flags = [*CI, "--work", str(work), "--report-only"]
    # The study's runs plus one that never ran (a third seed of dense): reported, not trained.
    assert main(["study", *flags, "--out", str(tmp_path / "r"), "--archs", "dense,moe",
                 "--ablations", "none", "--seeds", "2", "--seeded", "dense"]) == 0
    data = json.loads((tmp_path / "r" / "tiny.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["dense", "moe"]
    assert data["not_run"] == ["dense@seed1"] and not (work / "tiny" / "dense_seed1").exists()
    md = (tmp_path / "r" / "tiny.md").read_text()
    assert "**Partial report**: 2 of 3 runs" in md and "dense@seed1" in md
    rows = {r["name"]: r for r in json.loads((out / "tiny.json").read_text())["runs"]}
    assert data["runs"][1]["text"] == rows["moe"]["text"]  # the finished run's own figures
    # Nothing finished (other settings) or nothing prepared: a one-line error, exit 2.
    assert main(["study", *flags, "--steps", "3", "--out", str(tmp_path / "x")]) == 2
    assert "report_only: none of the" in capsys.readouterr().err
    assert main(["study", *CI, "--work", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "no prepared data" in capsys.readouterr().err


def test_an_archive_carries_finished_runs_to_another_machine(study_dirs, tmp_path, capsys):
    """--archive: finished runs' records (no checkpoint) are kept there; a new work folder with
    the same archive reports from it alone and trains only the runs it lacks."""
    _, work = study_dirs
    archive = tmp_path / "archive"
    flags = [*CI, "--ablations", "none", "--archive", str(archive)]
    # The fixture's finished runs are archived as the study reuses them.
    assert main(["study", *flags, "--archs", "dense,moe", "--work", str(work),
                 "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in archive.iterdir()) == ["data.json", "dense", "moe"]
    assert sorted(p.name for p in (archive / "moe").iterdir()) == [
        "eval.json", "metrics.jsonl", "study.json"]
    # Another machine: an empty work folder. The report comes from the archive, nothing trains.
    new = tmp_path / "new"
    capsys.readouterr()
    assert main(["study", *flags, "--archs", "dense,moe", "--work", str(new),
                 "--out", str(tmp_path / "b"), "--report-only"]) == 0
    assert "restored 2 finished run(s)" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / d / "tiny.json").read_text())["runs"] for d in "ab")
    assert [r["text"] for r in b] == [r["text"] for r in a] and len(b) == 2
    assert not (new / "tiny" / "data").exists() and (tmp_path / "b" / "tiny_loss.png").is_file()
    # Training there trains only the run the archive lacks, which is then archived too.
    assert main(["study", *flags, "--archs", "dense,moe,pkm", "--work", str(new),
                 "--out", str(tmp_path / "c")]) == 0
    log = capsys.readouterr().out
    assert "dense: reusing" in log and "moe: reusing" in log and "pkm: training" in log
    assert json.loads((archive / "pkm" / "eval.json").read_text())["settings"]["steps"] == 2
    # Other settings never restore: a run of 3 steps is not the archived 2-step one.
    assert main(["study", *flags, "--archs", "dense", "--steps", "3", "--work",
                 str(tmp_path / "other"), "--report-only"]) == 2


def test_the_archive_says_when_this_machines_data_differs(tmp_path):
    from ultramem.eval.study import archive_data_meta

    meta = {"tokenizer": {"kind": "bpe"}, "vocab_size": 4096, "n_documents": 10,
            "splits": {"train": {"n_tokens": 1000}, "val": {"n_tokens": 10}}, "sources": ["/a"]}
    cfg = StudyConfig(archive=str(tmp_path / "arch"))
    logs: list[str] = []
    archive_data_meta(cfg, meta, logs.append)  # the first machine writes it
    archive_data_meta(cfg, {**meta, "sources": ["/elsewhere"]}, logs.append)  # same data
    assert logs == []
    changed = {**meta, "splits": {"train": {"n_tokens": 1001}, "val": {"n_tokens": 10}}}
    archive_data_meta(cfg, changed, logs.append)
    assert len(logs) == 1 and "train_tokens 1000 there, 1001 here" in logs[0]
    assert json.loads((tmp_path / "arch" / "data.json").read_text()) == meta  # kept


def test_an_archive_git_ignores_is_named(tmp_path):
    """Records archived into a git-ignored folder would never be committed: the study says so.
    The committed result archives under docs/results/ are not ignored."""
    import shutil
    import subprocess

    from ultramem.eval.study import archive_ignored_by_git

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    assert archive_ignored_by_git(tmp_path / "ignored" / "runs")
    assert not archive_ignored_by_git(tmp_path / "kept" / "runs")
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():
        assert not archive_ignored_by_git(repo / "docs" / "results" / "any-study" / "runs")


def test_an_unknown_family_is_named(capsys):
    assert main(["study", "--family", "huge"]) == 2
    assert "family must be one of ['mini', 'small', 'tiny'], got 'huge'" in capsys.readouterr().err


def test_seed_repeats_reuse_seed_zero_and_report_the_spread(study_dirs, tmp_path):
    """--seeds 2 --seeded moe,ultramem_v2: the seed-0 runs are reused, the repeats train with
    seed 1 on the same data, and the report judges UltraMemV2 vs MoE against their spread."""
    _, work = study_dirs
    out = tmp_path / "out"
    assert main(["study", *CI, "--archs", "moe,ultramem_v2", "--ablations", "none", "--seeds",
                 "2", "--seeded", "moe,ultramem_v2", "--out", str(out), "--work",
                 str(work)]) == 0
    data = json.loads((out / "tiny.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert list(runs) == ["moe", "ultramem_v2", "moe@seed1", "ultramem_v2@seed1"]
    assert runs["moe@seed1"]["settings"]["seed"] == 1
    assert runs["moe@seed1"]["settings"]["data_seed"] == runs["moe"]["settings"]["seed"] == 0
    assert (work / "tiny" / "ultramem_v2_seed1" / "eval.json").is_file()
    # Another training seed gives another model (the losses differ), on the same eval examples.
    assert runs["moe@seed1"]["final_loss"] != runs["moe"]["final_loss"]
    md = (out / "tiny.md").read_text()
    assert "## Seed spread" in md and "| moe | 2 |" in md
    assert "Mean over seeds (UltraMemV2 2, MoE 2)" in md
    assert "**The held-out loss claim**: UltraMemV2 minus MoE" in md and "| held-out loss |" in md
    assert "## Training loss against the MoE of the same seed" in md
    assert "| ultramem_v2@seed1 | moe@seed1 |" in md and set(data["paired_gaps"]) == {
        "ultramem_v2", "ultramem_v2@seed1"}
    assert runs["moe@seed1"]["commit"] and "- runs trained (finished) at commit: `" in md
    assert runs["moe@seed1"]["threads"] == 1 and "CPU-hours (each run's hours x its threads)" in md
    with pytest.raises(ValueError, match="seeded"):
        StudyConfig(archs=("moe",), ablations=(), seeded=("dense",))
    with pytest.raises(ValueError, match="seeds"):
        StudyConfig(seeds=0)


def test_report_calls_a_winner_only_outside_the_seed_range():
    from ultramem.eval.report import _compare

    assert _compare([2.60, 2.62], [2.61, 2.65], lower=True) == "within seed noise"
    assert _compare([2.60, 2.61], [2.63, 2.65], lower=True) == "UltraMemV2"
    assert _compare([10.0, 12.0], [13.0, 15.0], lower=False) == "MoE"
    assert _compare([2.60], [2.61], lower=True) == "UltraMemV2"  # one seed: the means decide
    assert _compare([0.0, 0.0, 0.0], [0.0, 0.0], lower=False) == "tie"


def test_the_loss_claim_sets_the_difference_against_the_seed_spread():
    from ultramem.eval.report import loss_claim

    apart = loss_claim([3.90, 3.91, 3.92], [3.95, 3.96, 3.97])
    assert "-0.0500 nats/token (mean over 3 and 3 seeds)" in apart
    assert "spread (max - min) UltraMemV2 0.0200, MoE 0.0200" in apart
    assert "a gap of 0.0300" in apart and "**UltraMemV2 is better**, by 0.0500" in apart
    assert "2.5x the larger spread" in apart
    assert "**MoE is better**" in loss_claim([3.99, 4.00], [3.90, 3.95])
    noise = loss_claim([3.90, 3.94], [3.92, 3.93])
    assert "**within seed noise**" in noise and "|difference| < 0.0300" in noise
    named = loss_claim([3.90, 3.91], [3.95, 3.96], names=("`ultramem_v2+both_ends`", "MoE"))
    assert named.startswith("`ultramem_v2+both_ends` minus MoE") and "**`ultramem_v2+" in named
    one = loss_claim([3.90], [3.92, 3.93])
    assert "no seed spread" in one and "better" not in one


def test_moving_mean_of_the_loss_plot():
    from ultramem.eval.report import moving_mean

    assert moving_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_mean([1.0, 3.0], 1) == [1.0, 3.0]
    from ultramem.eval.report import _same_seed_moe

    assert _same_seed_moe("ultramem_v2@seed1") == "moe@seed1"
    assert _same_seed_moe("ultramem_v2+fixed_init@seed2") == "moe@seed2"
    assert _same_seed_moe("dense") == "moe"


def test_paired_gap_summarizes_a_run_against_the_moe_on_the_same_batches():
    from ultramem.eval.report import SMOOTH_POINTS, paired_gap

    # 200 logged steps (window 200 // SMOOTH_POINTS = 4): ahead by 0.2 until step 50, then
    # behind by 0.1; the MoE's batch-to-batch swings are shared and cancel in the difference.
    steps = list(range(1, 201))
    theirs = {k: 3.0 + (0.5 if k % 2 else -0.5) for k in steps}
    mine = {k: theirs[k] + (-0.2 if k <= 50 else 0.1) for k in steps}
    mine[999] = 1.0  # logged by one run only: not compared
    gap = paired_gap(mine, theirs)
    assert gap["window"] == 200 // SMOOTH_POINTS == 4
    assert gap["lead"] == pytest.approx(-0.2) and 1 <= gap["lead_step"] <= 50
    # The trailing mean of 4 is still below 0 at step 52 ((-0.2 * 2 + 0.1 * 2) / 4), not at 53.
    assert gap["last_ahead_step"] == 52
    assert gap["part_means"] == pytest.approx([-0.2, 0.1, 0.1, 0.1])
    assert (gap["first_step"], gap["last_step"]) == (1, 200)
    behind = paired_gap({k: v + 0.3 for k, v in theirs.items()}, theirs, parts=2)
    assert behind["last_ahead_step"] is None and behind["part_means"] == pytest.approx([0.3, 0.3])
    assert paired_gap({1: 2.0}, {2: 2.0}) is None


def test_ablation_table_averages_the_same_seven_tasks_as_the_accuracy_table():
    """The one-seed ablation table's mean accuracy is the accuracy table's "mean of 7" (the
    fact world is reported on its own, as facts recalled), not a mean that mixes it in."""
    from ultramem.eval.report import MEAN_ACC, _ablations, _accuracy
    from ultramem.tasks import LONG_CONTEXT

    tasks = [*LONG_CONTEXT, "facts"]

    def run(name: str, acc: float, facts: int) -> dict:
        scores = {t: {"accuracy": acc, "answer_nll": 1.0} for t in LONG_CONTEXT}
        scores["facts"] = {"accuracy": 0.0, "answer_nll": 5.0, "recalled": facts}
        return {"name": name, "params": {"total": 8_000_000, "active": 2_000_000},
                "final_loss": 3.0, "text": {"bits_per_byte": 1.4}, "tasks": scores}

    study = {"runs": [run("ultramem_v2", 0.5, 7), run("ultramem_v2+both_ends_equal", 0.75, 9)]}
    table = "\n".join(_ablations(study, tasks))
    assert MEAN_ACC in table
    assert "| ultramem_v2 | 8.00M | 3.000 | 1.400 | 50.0 | 1.000 | 7 |" in table
    assert "| ultramem_v2+both_ends_equal | 8.00M | 3.000 | 1.400 | 75.0 | 1.000 | 9 |" in table
    assert "| 50.0 |" in "\n".join(_accuracy(study, tasks))


def test_ablation_configs_change_one_thing():
    runs = run_configs(StudyConfig(family="small", archs=("ultramem_v2",)))
    base = runs["ultramem_v2"].memory
    assert runs["ultramem_v2+plain_values"].memory.pre_value_dim == 0
    assert dataclasses.replace(runs["ultramem_v2+plain_values"].memory,
                               pre_value_dim=base.pre_value_dim) == base
    assert runs["ultramem_v2+fixed_init"].memory.value_init == "fixed"
    assert runs["ultramem_v2+shared_query"].memory.shared_rank_query
    assert runs["ultramem_v2+half_layers"].memory_blocks == (1, 3, 5, 7)  # four of eight
    assert base.value_init == "paper" and not base.shared_rank_query and base.layers is None
    assert base.preselect == "rank1" and base.preselect_k == 32
    both, equal = runs["ultramem_v2+both_ends"].memory, runs["ultramem_v2+both_ends_equal"].memory
    assert both.preselect == equal.preselect == "both_ends" and both.preselect_k == 32
    assert equal.preselect_k == 23  # 2 * 23^2 = 1058 candidates against the paper's 32^2 = 1024


def test_eval_command_on_a_study_checkpoint(study_dirs, tmp_path, capsys):
    _, work = study_dirs
    rc = main(["eval", "--checkpoint", str(work / "tiny" / "ultramem_v2"), "--tasks",
               "needle,kv_retrieval", "--size", "ci", "--n", "3", "--text-chars", "300",
               "--out", str(tmp_path / "ev")])
    assert rc == 0
    result = json.loads((tmp_path / "ev.json").read_text())
    assert set(result["tasks"]) == {"needle", "kv_retrieval"}
    assert result["tasks"]["needle"]["n"] == 3 and result["tasks"]["kv_retrieval"]["n"] == 6
    assert "held-out bits per byte" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2


def test_a_killed_run_resumes_from_its_checkpoint(study_dirs, tmp_path, monkeypatch):
    """A study killed mid-run continues from the run's last checkpoint, and the resumed run ends
    exactly where an uninterrupted one does (same final loss, same metrics log)."""
    from ultramem.train.metrics import read_metrics
    from ultramem.train.trainer import Trainer

    _, work = study_dirs

    def cfg(work_dir):
        return StudyConfig(family="tiny", steps=4, archs=("ultramem_v2",), ablations=(),
                           out=str(tmp_path / "out"), work=str(work_dir), batch_size=2,
                           seq_len=48, n_examples=2, text_chars=600, task_size="ci",
                           train_docs=8, threads=1)

    # Both work dirs share the study's data (prepared once, identical for the same settings).
    for w in ("whole", "killed"):
        (tmp_path / w / "tiny").mkdir(parents=True)
        (tmp_path / w / "tiny" / "data").symlink_to(work / "tiny" / "data")
    whole = run_study(cfg(tmp_path / "whole"), log=lambda _: None)["runs"][0]

    real_step = Trainer.train_step

    def dies_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg(tmp_path / "killed"), log=lambda _: None)
    run_dir = tmp_path / "killed" / "tiny" / "ultramem_v2"
    assert not (run_dir / "eval.json").exists() and (run_dir / "study.json").is_file()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    logs: list[str] = []
    resumed = run_study(cfg(tmp_path / "killed"), log=logs.append)["runs"][0]
    assert any("ultramem_v2: resuming from step 3" in line for line in logs)
    assert resumed["resumed_from_step"] == 3 and whole["resumed_from_step"] == 0
    assert resumed["final_loss"] == whole["final_loss"]
    assert resumed["val_loss"] == whole["val_loss"]
    losses = [[r["loss"] for r in read_metrics(d / "tiny" / "ultramem_v2")]
              for d in (tmp_path / "whole", tmp_path / "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    # Other settings: the killed run's checkpoint is not reused, the run starts over.
    (run_dir / "eval.json").unlink()
    logs.clear()
    monkeypatch.setattr(Trainer, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_study(dataclasses.replace(cfg(tmp_path / "killed"), lr=1e-3), log=logs.append)
    assert not any("resuming" in line for line in logs)
    assert len(read_metrics(run_dir)) == 3  # steps 1..3 of the new run, none of the old


def test_parallel_jobs_give_the_sequential_rows_and_the_ablation_tables(study_dirs, tmp_path):
    """--jobs 2 trains runs in worker processes: the same rows as one at a time (each run is
    its own seeded process), and the report judges ablations repeated over seeds and prints the
    pre-selection recall of every UltraMemV2 run."""
    _, work = study_dirs
    args = [*CI, "--archs", "ultramem_v2", "--ablations", "both_ends,both_ends_equal",
            "--seeds", "2", "--seeded", "ultramem_v2,ultramem_v2+both_ends_equal"]
    out = tmp_path / "par"
    assert main(["study", *args, "--jobs", "2", "--out", str(out), "--work", str(work)]) == 0
    par = {r["name"]: r for r in json.loads((out / "tiny.json").read_text())["runs"]}
    assert list(par) == ["ultramem_v2", "ultramem_v2+both_ends", "ultramem_v2+both_ends_equal",
                         "ultramem_v2@seed1", "ultramem_v2+both_ends_equal@seed1"]
    # the same repeat trained alone, in this process, in a fresh work dir with the same data
    import shutil

    solo = tmp_path / "solo" / "tiny"
    solo.mkdir(parents=True)
    shutil.copytree(work / "tiny" / "data", solo / "data")
    assert main(["study", *CI, "--archs", "none", "--ablations", "both_ends_equal", "--seeds",
                 "2", "--seeded", "ultramem_v2+both_ends_equal", "--out", str(tmp_path / "o2"),
                 "--work", str(tmp_path / "solo")]) == 0
    seq = {r["name"]: r for r in json.loads((tmp_path / "o2" / "tiny.json").read_text())["runs"]}
    name = "ultramem_v2+both_ends_equal@seed1"
    assert seq[name]["final_loss"] == par[name]["final_loss"]
    assert seq[name]["text"] == par[name]["text"]
    md = (out / "tiny.md").read_text()
    assert "## Ablations over seeds" in md and "`both_ends_equal` (2)" in md
    assert "## Retrieval recall" in md
    for r in par.values():
        assert 0 <= r["retrieval"]["preselect_recall"] <= 1
        assert len(r["retrieval"]["per_layer"]) == 4  # tiny: a memory layer in each of 4 blocks


def test_a_corpus_study_trains_on_the_corpus_and_measures_its_heldout_split(tmp_path):
    """--corpus: the mix holds the corpus's training split plus task-mix copies, the study
    lives apart from the built-in one, and held-out loss is on the corpus's held-out text."""
    root = tmp_path / "corpus"
    export = root / "export" / "english"
    export.mkdir(parents=True)
    train = [f"corpus training prose number {i}. " * 30 for i in range(40)]
    (export / "train.jsonl").write_text(
        "".join(json.dumps({"id": f"t{i}", "text": d}) + "\n" for i, d in enumerate(train)))
    heldout = "HELDOUT corpus text, never trained on. " * 20
    (export / "heldout.jsonl").write_text(json.dumps({"id": "h", "text": heldout}) + "\n")
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["study", "--family", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len",
                 "48", "--n", "2", "--task-size", "ci", "--train-docs", "2", "--threads", "1",
                 "--archs", "dense", "--ablations", "none",
                 "--corpus", "english", "--corpus-root", str(root), "--task-share", "0.5",
                 "--out", str(out), "--work", str(work)]) == 0
    mix = (work / "tiny-english" / "data_mix.jsonl").read_text()
    assert "HELDOUT" not in mix
    data = json.loads((out / "tiny-english.json").read_text())
    assert data["name"] == "tiny-english" and data["config"]["corpus"] == "english"
    row = data["runs"][0]
    assert row["settings"]["corpus"] == "english"
    assert row["text"]["bytes"] == len(heldout.encode())  # all of it, and nothing else
    assert "Trained on the `english` corpus" in (out / "tiny-english.md").read_text()
    meta = json.loads((work / "tiny-english" / "data" / "meta.json").read_text())
    corpus_bytes = sum(len(d) for d in train)
    assert meta["n_documents"] > len(train)  # the corpus and the task documents
    assert meta["splits"]["train"]["n_tokens"] > corpus_bytes  # bytes tokenizer (tiny)
    with pytest.raises(Exception, match="corpus"):
        StudyConfig(corpus="no-such-corpus")


def test_logged_train_seconds_sums_every_process_of_a_run():
    from ultramem.eval.study import logged_train_seconds

    # Steps 1-20 logged every 10 by one process, 21-30 by a resumed one; an eval-only row
    # (no tokens_per_s) does not start a new interval.
    rows = [{"step": 10, "tokens_per_s": 100.0}, {"step": 20, "tokens_per_s": 50.0},
            {"step": 20, "eval_loss": 1.0}, {"step": 30, "tokens_per_s": 200.0}]
    assert logged_train_seconds(rows, tokens_per_step=10) == pytest.approx(1 + 2 + 0.5)
    assert logged_train_seconds([], 10) == 0.0
