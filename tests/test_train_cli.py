"""`ultramem train` flags generated from the config dataclasses (commands/train.py).

Every field of TrainConfig, ModelConfig and each memory kind is a flag listed in `--help` with
its type and default; a flag sets the field `--set` would; precedence is preset < --config file <
flags and --set (in command-line order); bad values and fields of another memory kind end with
one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ultramem.cli import build_parser, main
from ultramem.commands import config_flags
from ultramem.commands import train as train_cmd
from ultramem.config import SPARSE_CONFIGS, ModelConfig
from ultramem.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(train_cmd.__file__).resolve().parent.parent


def _yaml(value) -> str:
    """A default as --help writes it."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, tuple | list):
        return json.dumps(value)
    return str(value)


def help_entries(capsys) -> dict[str, dict[str, str]]:
    """`ultramem train --help` as {group title: {flag: its entry's text, whitespace joined}}."""
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    groups: dict[str, dict[str, str]] = {}
    group, flags, body = "", [], []

    def close():
        for flag in flags:
            groups.setdefault(group, {})[flag] = " ".join(" ".join(body).split())

    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            close()
            group, flags, body = line[:-1], [], []
        elif re.match(r"  (-\S+)", line):
            close()
            flags, body = re.findall(r"(?:^|, )(--?[\w.-]+)", line.strip()), [line]
        elif flags:
            body.append(line)
    close()
    return groups


def entry(groups: dict[str, dict[str, str]], group_start: str, flag: str) -> str:
    group = next(g for g in groups if g.startswith(group_start))
    assert flag in groups[group], f"{flag} not listed under {group!r}"
    return groups[group][flag]


def dashed(name: str) -> str:
    return name.replace("_", "-")


def test_help_lists_every_train_and_model_field_with_its_default(capsys):
    groups = help_entries(capsys)
    for f in dataclasses.fields(TrainConfig):
        text = entry(groups, "train fields", f"--train.{dashed(f.name)}")
        shown = config_flags.cli_train_defaults().get(f.name, f.default)
        assert f"default: {_yaml(shown)}" in text, (f.name, text)
        assert str(f.type) in text, (f.name, text)
    for f in dataclasses.fields(ModelConfig):
        if f.name == "memory":
            continue
        text = entry(groups, "model fields", f"--model.{dashed(f.name)}")
        assert f"default: {_yaml(f.default)}" in text and str(f.type) in text, (f.name, text)
    # a documented field shows its documentation
    assert "peak learning rate" in entry(groups, "train fields", "--lr")
    assert "slots read per token" in entry(groups, "model.memory fields of kind ultramem_v2",
                                           "--model.memory.top-m")


@pytest.mark.parametrize("kind", list(SPARSE_CONFIGS))
def test_help_lists_every_memory_field_under_its_kind(kind, capsys):
    groups = help_entries(capsys)
    cls = SPARSE_CONFIGS[kind]
    for f in dataclasses.fields(cls):
        if f.name == "kind":
            continue
        text = entry(groups, f"model.memory fields of kind {kind} ",
                     f"--model.memory.{dashed(f.name)}")
        assert f"default: {_yaml(f.default)}" in text, (kind, f.name, text)
    assert kind in entry(groups, "model fields", "--model.memory.kind")


@pytest.mark.parametrize("module, name", [
    ("train/config.py", "TrainConfig"), ("config.py", "ModelConfig"),
    *[("config.py", cls.__name__) for cls in SPARSE_CONFIGS.values()]])
def test_fields_read_from_source_match_the_dataclasses(module, name):
    # --help reads the classes with `ast` (importing TrainConfig loads torch); hold it to them.
    cls = TrainConfig if name == "TrainConfig" else getattr(
        sys.modules["ultramem.config"], name)
    read, _ = config_flags.read_fields(ROOT / module, name)
    real = dataclasses.fields(cls)
    assert [f.name for f in read] == [f.name for f in real]
    for got, f in zip(read, real, strict=True):
        assert got.type == str(f.type), f.name
        if f.default is not dataclasses.MISSING:
            assert got.default == _yaml(f.default), f.name


def test_help_is_fast_and_loads_no_torch():
    code = ("import sys, time\n"
            "t = time.perf_counter()\n"
            "from ultramem.cli import main\n"
            "try:\n"
            "    main(['train', '--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "assert 'torch' not in sys.modules\n"
            "print(time.perf_counter() - t, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                          capture_output=True, text=True)
    assert float(done.stderr.strip().splitlines()[-1]) < 5.0  # ~0.1 s idle; generous when busy


def parse(*argv: str, out: str = "runs/unused"):
    """(model config, train config, extra) that `ultramem train ARGV` would train, untrained."""
    args = build_parser("train").parse_args(["train", "--out", out, *argv])
    return train_cmd.configs_of(args)


def test_nested_flags_set_their_fields():
    model, train, _ = parse("--lr", "1e-3", "--train.batch-size", "4", "--seq_len", "64",
                            "--model.n-layers", "2", "--model.memory.top-m", "32",
                            "--model.memory.layers", "[0, 1]", "--model.memory.n_keys", "32",
                            "--tensorboard", "false", "--activation-checkpointing",
                            "--train.value-update", "dense", "--train.steps", "9")
    assert (train.lr, train.batch_size, train.seq_len, train.steps) == (1e-3, 4, 64, 9)
    assert train.tensorboard is False and train.activation_checkpointing is True
    assert train.value_update == "dense"
    assert model.n_layers == 2
    assert (model.memory.top_m, model.memory.layers, model.memory.n_keys) == (32, (0, 1), 32)
    assert train.threads == 1  # the CLI's default, not the class's 0


def test_set_still_works_and_the_later_of_flag_and_set_wins():
    model, train, _ = parse("--set", "model.memory.top_m=8", "--set", "lr=2e-3")
    assert (model.memory.top_m, train.lr) == (8, 2e-3)
    assert parse("--set", "lr=2e-3", "--lr", "5e-3")[1].lr == 5e-3
    assert parse("--lr", "5e-3", "--set", "train.lr=2e-3")[1].lr == 2e-3
    assert parse("--train.steps", "5", "--steps", "7")[1].steps == 7  # the shortcut applies last


def test_precedence_preset_then_file_then_flags(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("preset: tiny\nmodel:\n  n_layers: 2\n  memory:\n    top_m: 8\n"
                   "train:\n  lr: 0.01\n  batch_size: 4\n")
    preset = ModelConfig.preset("tiny")
    model, train, extra = parse("--config", str(run))
    assert (model.n_layers, model.memory.top_m, train.lr, train.batch_size) == (2, 8, 0.01, 4)
    assert model.d_model == preset.d_model  # untouched: the preset's
    model, train, _ = parse("--config", str(run), "--model.memory.top-m", "12", "--lr", "1e-3")
    assert (model.n_layers, model.memory.top_m, train.lr, train.batch_size) == (2, 12, 1e-3, 4)
    # --preset beats the file's preset; the file's fields still apply on top of it
    run.write_text("preset: tiny\nmodel:\n  n_layers: 2\n")
    model, _, extra = parse("--config", str(run), "--preset", "tiny/moe")
    assert extra["preset"] == "tiny/moe" and model.n_layers == 2
    assert model.memory.kind == "moe"


def test_a_new_memory_kind_starts_from_its_defaults():
    model, _, _ = parse("--model.memory.kind", "moe", "--model.memory.n-experts", "8",
                        "--model.memory.top-k", "2")
    assert model.memory == SPARSE_CONFIGS["moe"](n_experts=8, top_k=2)
    model, _, _ = parse("--set", "model.memory=false")
    assert model.memory is None


def one_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "abc"], "ultramem train: lr: must be a number, got 'abc'"),
    (["--train.steps", "true"], "ultramem train: steps: must be an integer, got True"),
    (["--model.n-layers", "2.5"], "n_layers: must be an integer, got 2.5"),
    (["--model.memory.n-experts", "8"],
     "model.memory.n_experts: not a field of memory kind 'ultramem_v2'"),
    (["--preset", "tiny/moe", "--model.memory.top-m", "8"],
     "model.memory.top_m: not a field of memory kind 'moe'"),
    (["--model.memory.kind", "nosuch"], "--model.memory.kind: invalid choice: 'nosuch'"),
    (["--model.nosuch", "1"], "unrecognized arguments: --model.nosuch 1"),
])
def test_bad_flags_are_one_line(flags, expected, tmp_path, capsys):
    out = tmp_path / "run"
    line = one_error(["train", "--out", str(out), *flags], capsys)
    assert expected in line, line
    assert not out.exists()


def test_a_run_saves_what_the_flags_set(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--quiet", "--steps", "1", "--device", "cpu",
            "--model.n-layers", "2", "--model.d-model", "64", "--model.n-heads", "2",
            "--model.ffn-hidden", "128", "--model.max-seq-len", "32",
            "--model.memory.n-keys", "16", "--model.memory.key-dim", "16",
            "--model.memory.top-m", "8", "--model.memory.value-dim", "16",
            "--model.memory.pre-value-dim", "16", "--model.memory.init-samples", "256",
            "--batch-size", "2", "--seq-len", "32", "--tensorboard", "false", "--plot", "false",
            "--eval-every", "0", "--warmup", "1", "--lr", "1e-3"]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["train"]["batch_size"] == 2
    assert saved["model"]["n_layers"] == 2 and saved["model"]["memory"]["top_m"] == 8
