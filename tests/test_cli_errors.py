"""Every command on bad input, damaged files and reruns: one clear line, nothing lost.

Each bad input runs the CLI in-process (`ultramem.cli.main`) and must end with exit code 2 (130
for Ctrl-C), exactly one line on stderr naming the cause and the file or field, no traceback,
and every file that existed before unchanged (nothing new either). A subprocess is used where a
real process matters: Ctrl-C, and what `import ultramem` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ultramem import LM, ModelConfig
from ultramem.cli import COMMANDS, build_parser, main
from ultramem.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.ffn_hidden=128",
         "model.max_seq_len=32", "model.memory.n_keys=16", "model.memory.key_dim=16",
         "model.memory.top_m=8", "model.memory.value_dim=16", "model.memory.pre_value_dim=16",
         "model.memory.init_samples=256", "batch_size=4", "seq_len=32", "tensorboard=false",
         "plot=false", "eval_every=0", "warmup=1", "log_every=1", "device=cpu", "ckpt_every=2"]
SETS = [arg for s in SMALL for arg in ("--set", s)]
STEP2, STEP4 = "step_00000002", "step_00000004"


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ultramem ARGV`, argparse's exits included."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and directory (None) under roots."""
    return {str(p): (p.read_bytes() if p.is_file() else None)
            for root in roots for p in sorted(root.rglob("*"))}


def assert_one_error(code: int, err: str, *names: str, exit_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(out), "--steps", "4", "--quiet", *SETS]) == 0
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [STEP2, STEP4]
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def text(tmp_path) -> Path:
    (tmp_path / "held.txt").write_text("The capital of France is Paris. " * 4)
    return tmp_path / "held.txt"


# --------------------------------------------------------------------- bad flags and configs


def _bad_inputs(tmp: Path, run: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    """name -> (argv, what the one line must name); the files they read are in tmp."""
    new = tmp / "new"
    ck = run / "checkpoints" / STEP4
    gen = ["generate", "--checkpoint", ck, "--prompt", "ab"]
    cases = {
        "set float as string": (["train", "--out", new, "--set", "lr=abc"], ("lr", "abc")),
        "set bool for int": (["train", "--out", new, "--set", "steps=true"], ("steps", "True")),
        "set memory not a dict": (["train", "--out", new, "--set", "model.memory=5"],
                                  ("model.memory",)),
        "set unknown field": (["train", "--out", new, "--set", "nosuch=1"], ("nosuch",)),
        "set threads negative": (["train", "--out", new, "--threads", "-1"], ("threads",)),
        "unknown device": (["train", "--out", new, "--set", "device=tpu"], ("device", "tpu")),
        "yaml syntax error": (["train", "--out", new, "--config", tmp / "bad.yaml"],
                              ("bad.yaml", "line")),
        "missing config file": (["train", "--out", new, "--config", tmp / "nope.yaml"],
                                ("nope.yaml",)),
        "train --out is a file": (["train", "--out", tmp / "file.txt"], ("file.txt",)),
        "missing data dir": (["train", "--out", new, "--data", tmp / "nodata"], ("nodata",)),
        "generate missing checkpoint": (["generate", "--checkpoint", tmp / "nope", "--prompt",
                                         "a"], ("nope",)),
        "export missing checkpoint": (["export", "--checkpoint", tmp / "nope", "--out", new],
                                      ("nope",)),
        "eval missing checkpoint": (["eval", "--checkpoint", tmp / "nope"], ("nope",)),
        "empty prompt": (["generate", "--checkpoint", ck, "--prompt", "ab", "--prompt", ""],
                         ("--prompt 2", "empty")),
        "bad int flag": ([*gen, "--max-new-tokens", "abc"], ("--max-new-tokens", "abc")),
        "zero new tokens": ([*gen, "--max-new-tokens", "0"], ("--max-new-tokens",)),
        "negative temperature": ([*gen, "--temperature", "-1"], ("--temperature",)),
        "top-p out of range": ([*gen, "--top-p", "2"], ("--top-p",)),
        "top-k zero": ([*gen, "--top-k", "0"], ("--top-k",)),
        "unknown generate device": ([*gen, "--device", "tpu"], ("--device", "tpu")),
        "negative threads": ([*gen, "--threads", "-2"], ("--threads",)),
        "export onto a file": (["export", "--checkpoint", ck, "--out", tmp / "file.txt"],
                               ("file.txt",)),
        "export into a foreign dir": (["export", "--checkpoint", ck, "--out", run],
                                      (str(run),)),
        "prepare onto a file": (["prepare", "builtin:facts", "--out", tmp / "file.txt"],
                                ("file.txt",)),
        "prepare tiny bpe vocabulary": (["prepare", "builtin:facts", "--tokenizer", "bpe",
                                         "--vocab-size", "100", "--out", new],
                                        ("vocab_size", "100")),
        "eval empty text": (["eval", "--checkpoint", run, "--text", tmp / "empty.txt"],
                            ("empty.txt", "empty")),
        "eval unknown task": (["eval", "--checkpoint", run, "--tasks", "nosuch"], ("nosuch",)),
        "eval zero examples": (["eval", "--checkpoint", run, "--n", "0"], ("--n",)),
        "presets unknown family": (["presets", "--family", "nosuch"], ("nosuch",)),
        "unknown command": (["nosuch"], ("nosuch",)),
    }
    if not torch.cuda.is_available():
        cases["cuda on a CPU-only machine"] = (["train", "--out", new, "--set", "device=cuda"],
                                               ("device=cuda",))
        cases["generate on cuda without one"] = ([*gen, "--device", "cuda"], ("--device",))
    return cases


BAD_INPUTS = list(_bad_inputs(Path("/x"), Path("/y")))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_changes_nothing(case, run, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1, 2\n")
    (tmp_path / "file.txt").write_text("not a directory")
    (tmp_path / "empty.txt").write_text("")
    argv, names = _bad_inputs(tmp_path, run)[case]
    before = snapshot(tmp_path)
    code, out, err = cli(argv, capsys)
    assert_one_error(code, err, *names)
    assert snapshot(tmp_path) == before


def test_too_little_data_for_seq_len_is_found_before_training(tmp_path, capsys):
    from ultramem.data.prepare import prepare

    (tmp_path / "short.txt").write_text("just a few words\n" * 3)
    prepare([str(tmp_path / "short.txt")], tmp_path / "data", val_fraction=0)
    code, _, err = cli(["train", "--out", tmp_path / "run", "--data", tmp_path / "data",
                        "--set", "seq_len=64"], capsys)
    assert_one_error(code, err, "seq_len=64", str(tmp_path / "data"), "too little data")
    assert not (tmp_path / "run").exists()


def test_prompt_token_outside_the_vocabulary(tmp_path, capsys):
    cfg = ModelConfig.preset("tiny").replace(vocab_size=64, n_layers=1, memory=None)
    path = ckpt.save_checkpoint(tmp_path / "ck", 1, model=LM(cfg, seed=0), config={
        "model": cfg.to_dict(), "tokenizer": {"kind": "bytes", "vocab_size": 256}})
    code, out, err = cli(["generate", "--checkpoint", path, "--prompt", "z"], capsys)
    assert_one_error(code, err, "--prompt 1", "122", "64")
    assert out == ""


# --------------------------------------------------------------------- damaged checkpoints


def _rehash(path: Path) -> None:
    """Rewrite checksums.json for the files as they are now (damage made before saving)."""
    sums = {f.name: ckpt._sha256(f) for f in sorted(path.iterdir())
            if f.is_file() and f.name != ckpt.CHECKSUMS}
    (path / ckpt.CHECKSUMS).write_text(json.dumps({"sha256": sums}))


def _edit_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    _rehash(path)


def _truncate(path: Path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(path: Path) -> None:
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) - 100] ^= 0xFF
    f.write_bytes(bytes(data))


def _not_a_permutation(state: dict) -> None:
    name = next(k for k in state if k.endswith(".perm"))
    state[name][0] = state[name][1]


def _nan(state: dict) -> None:
    name = next(k for k, t in state.items() if t.is_floating_point())
    state[name][0] = float("nan")


# name -> (damage, the file the message names)
DAMAGE = {
    "truncated": (_truncate, "model.safetensors"),
    "truncated, no checksums": (lambda p: (_truncate(p), (p / ckpt.CHECKSUMS).unlink()),
                                "model.safetensors"),
    "byte flipped": (_flip, "model.safetensors"),
    "missing config.json": (lambda p: (p / "config.json").unlink(), "config.json"),
    "config.json not JSON": (lambda p: ((p / "config.json").write_text("{"), _rehash(p)),
                             "config.json"),
    "shuffle buffer not a permutation": (lambda p: _edit_tensors(p, _not_a_permutation),
                                         "model.safetensors"),
    "NaN weights": (lambda p: _edit_tensors(p, _nan), "model.safetensors"),
}


def _command(name: str, run: Path, tmp: Path, text: Path) -> list:
    step = run / "checkpoints" / STEP4
    return {"eval": ["eval", "--checkpoint", step, "--tasks", "none", "--text", text],
            "generate": ["generate", "--checkpoint", step, "--prompt", "ab"],
            "export": ["export", "--checkpoint", step, "--out", tmp / "hf"],
            "train --resume": ["train", "--resume", "--out", run, "--quiet"]}[name]


@pytest.mark.parametrize("command", ["eval", "generate", "export", "train --resume"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_named(damage, command, run, tmp_path, text, capsys):
    if command == "export":
        pytest.importorskip("transformers")
    shutil.rmtree(run / "checkpoints" / STEP2)  # the damaged one is the only one
    harm, file = DAMAGE[damage]
    harm(run / "checkpoints" / STEP4)
    before = snapshot(tmp_path)
    code, out, err = cli(_command(command, run, tmp_path, text), capsys)
    assert_one_error(code, err, f"{STEP4}/{file}")
    assert "nan" not in out.lower() and "\0" not in out
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["eval", "train --resume"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(command, run, tmp_path, text,
                                                               capsys):
    _flip(run / "checkpoints" / STEP4)
    argv = _command(command, run, tmp_path, text)
    if command == "eval":
        argv[2] = run  # the run directory: its newest good checkpoint
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "Traceback" not in err
    assert f"{STEP4}/model.safetensors" in warnings[0] and STEP2 in warnings[0]
    if command == "train --resume":  # the damaged one is kept aside, a good one replaces it
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert names == [STEP2, STEP4, f"{STEP4}.damaged"]
        ckpt.verify_checkpoint(run / "checkpoints" / STEP4)


# --------------------------------------------------------------------- reruns and resumes


def test_resuming_a_finished_run_says_so(run, capsys):
    before = snapshot(run)
    code, out, err = cli(["train", "--resume", "--out", run, "--quiet"], capsys)
    assert code == 0 and err == ""
    assert "already complete" in out and "4 of 4" in out and "nan" not in out
    assert snapshot(run) == before


@pytest.mark.parametrize("argv, names", [
    (["--preset", "small/moe"], ("preset", "small/moe")),
    (["--set", "model.memory.top_m=4"], ("model.memory.top_m", "8", "4")),
    (["--set", "model.d_model=128"], ("model.d_model",)),
    (["--set", "value_update=dense", "--steps", "6"], ("value_update",)),
])
def test_resume_refuses_a_different_model(argv, names, run, capsys):
    before = snapshot(run)
    code, _, err = cli(["train", "--resume", "--out", run, *argv], capsys)
    assert_one_error(code, err, "--resume", *names)
    assert snapshot(run) == before


def test_resume_refuses_data_of_another_tokenizer(run, tmp_path, capsys):
    from ultramem.data.prepare import prepare

    prepare(["builtin:facts"], tmp_path / "bpe", tokenizer="bpe", vocab_size=300)
    before = snapshot(run)
    code, _, err = cli(["train", "--resume", "--out", run, "--steps", "6", "--data",
                        tmp_path / "bpe"], capsys)
    assert_one_error(code, err, "--resume", "tokenizer", str(tmp_path / "bpe"))
    assert snapshot(run) == before


def test_resume_prints_what_changed(run, capsys):
    code, out, err = cli(["train", "--resume", "--out", run, "--quiet", "--steps", "6",
                          "--set", "lr=1e-3", *SETS], capsys)  # same model sets: accepted
    assert code == 0, err
    first = out.splitlines()[0]
    assert f"resuming from {run / 'checkpoints' / STEP4} (step 4 of 6)" in first
    assert "lr 0.003 -> 0.001" in first and "steps 4 -> 6" in first
    assert json.loads((run / "checkpoints" / "step_00000006" / "config.json").read_text())[
        "train"]["lr"] == 1e-3


def test_ctrl_c_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ultramem.cli", "train", "--out", str(out), "--steps", "100000",
           "--quiet", *SETS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT may be ignored when the tests run in the background; Python only turns it into
    # KeyboardInterrupt when it starts with the default handler.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while ckpt.latest_checkpoint(out / "checkpoints") is None and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    line = assert_one_error(proc.returncode, err, "interrupted at step",
                            f"resume with: ultramem train --resume --out {out}", exit_code=130)
    assert line.startswith("ultramem train: ")


# --------------------------------------------------------------------- eval and export


def test_eval_n_caps_the_facts_task_and_progress_goes_to_stderr(run, text, tmp_path, capsys):
    base = ["eval", "--checkpoint", run, "--tasks", "facts,needle", "--size", "ci",
            "--text", text, "--out", tmp_path / "e"]
    code, out, err = cli([*base, "--n", "5"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())["tasks"]
    assert result["facts"]["facts"] == result["facts"]["n"] == 5
    assert result["needle"]["n"] == 5
    assert err.splitlines() == ["eval: held-out text", "eval: task 1/2: facts",
                                "eval: task 2/2: needle"]
    assert cli(base, capsys)[0] == 0  # without --n: every fact of the world
    assert json.loads((tmp_path / "e.json").read_text())["tasks"]["facts"]["facts"] == 48


def test_export_writes_readable_files_and_replaces_an_earlier_export(run, tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    for _ in range(2):  # the second time onto the first export
        code, printed, err = cli(["export", "--checkpoint", run, "--out", out], capsys)
        assert code == 0, err
        assert f"wrote {out}" in printed
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert "model.safetensors" in modes and len(set(modes.values())) == 1, modes
    umask = os.umask(0)
    os.umask(umask)
    assert modes["model.safetensors"] == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


# --------------------------------------------------------------------- the guard and --help


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    from ultramem.commands import presets

    def broken(args):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(presets, "run", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["presets"])


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_every_default(command):
    sub = _subparser(command)
    text = sub.format_help()
    for action in sub._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default in (
                [], argparse.SUPPRESS):
            continue
        assert f"default: {default}" in " ".join(text.split()), (action.dest, default)


@pytest.mark.parametrize("command", ["train", "generate", "export", "eval"])
def test_threads_flag_is_shared(command):
    from ultramem.cli import DEFAULT_THREADS

    sub = _subparser(command)
    threads = next(a for a in sub._actions if "--threads" in a.option_strings)
    assert threads.default in (DEFAULT_THREADS, None)  # train: None = the config's, else 1
    assert str(DEFAULT_THREADS) in sub.format_help()


def test_import_and_help_load_no_transformers():
    code = ("import sys\n"
            "import ultramem\n"
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
            "from ultramem.cli import COMMANDS, main\n"
            "for command in sorted(COMMANDS, key=lambda c: c == 'demo'):  # demo last\n"
            "    try:\n"
            "        main([command, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "    if command != 'demo':  # ultramem.demo imports torch for its defaults\n"
            "        assert 'torch' not in sys.modules, command\n"
            "assert 'transformers' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   stdout=subprocess.DEVNULL)
