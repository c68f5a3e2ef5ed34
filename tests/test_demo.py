"""`ultramem demo` (what `make demo` runs) end to end at a few steps: it must run, not learn."""

import math

import numpy as np
import pytest

from ultramem.cli import main
from ultramem.data.builtin import fact_world
from ultramem.data.shards import TokenShards
from ultramem.demo import DemoConfig, run_demo


def test_demo_command_runs_and_prints_results(capsys, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--eval-every", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ultramem demo: tiny UltraMemV2 model" in text
    assert "validation loss (unseen docstrings, nats/byte) by step: 1: " in text
    assert "best checkpoint: step " in text and "facts recalled" in text and "sample: " in text
    # a second demo replaces its own directory; a directory it did not write is refused
    assert main(["demo", "--steps", "1", "--out", str(out)]) == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["demo", "--steps", "1", "--out", str(other)]) == 2
    assert "not written by `ultramem demo`" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"


def test_demo_reports_its_best_checkpoint_and_holds_out_prose_only(tmp_path):
    cfg = DemoConfig(steps=3, eval_every=1, n_people=8, out=str(tmp_path / "d"))
    r = run_demo(cfg, show=False)
    steps = [s for s, _ in r["eval_curve"]]
    assert steps == [1, 2, 3] and math.isfinite(r["train_loss"])
    assert r["eval_loss"] == min(loss for _, loss in r["eval_curve"])
    assert r["checkpoint"].endswith(f"step_{r['best_step']:08d}")
    # An untrained byte model sits near log(256) nats; three steps cannot reach 0.
    assert 1.0 < r["eval_loss"] < 8.0
    assert r["eval_bits_per_byte"] == r["eval_loss"] / math.log(2)
    assert 0.0 <= r["fact_recall"] <= 1.0 and r["sample"].startswith("The job of ")
    # every fact document is trained on; validation is unseen docstrings only
    data = tmp_path / "d" / "data"
    val, train = (bytes(np.concatenate(TokenShards(data, split).shards).tolist())
                  .decode("utf-8", "replace") for split in ("val", "train"))
    people = {f.person for f in fact_world(8, seed=0)}
    assert people and all(p in train for p in people)
    assert not any(p in val for p in people) and len(val) > 1000


def test_demo_rejects_bad_settings(capsys, tmp_path):
    assert main(["demo", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not written by"):
        (tmp_path / "f").write_text("x")
        run_demo(DemoConfig(steps=1, out=str(tmp_path / "f")), show=False)
