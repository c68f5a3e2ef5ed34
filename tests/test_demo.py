"""`ultramem demo` (what `make demo` runs) end to end at a few steps: it must run, not learn."""

import math

from ultramem.cli import main
from ultramem.demo import DemoConfig, run_demo


def test_demo_command_runs_and_prints_results(capsys):
    assert main(["demo", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "ultramem demo: tiny UltraMemV2 model" in out
    assert "facts recalled" in out and "sample: " in out


def test_demo_results_are_measured():
    r = run_demo(DemoConfig(steps=3, eval_every=2, n_people=8), show=False)
    assert r["steps"] == 3 and math.isfinite(r["train_loss"]) and math.isfinite(r["eval_loss"])
    # An untrained byte model sits near log(256) nats; three steps cannot reach 0.
    assert 1.0 < r["eval_loss"] < 8.0
    assert r["eval_bits_per_byte"] == r["eval_loss"] / math.log(2)
    assert 0.0 <= r["fact_recall"] <= 1.0 and r["sample"].startswith("The job of ")
