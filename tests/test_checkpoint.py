"""Checkpoints: safetensors round trip, atomic directories, keep-last, exact resume on kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ultramem import LM, ModelConfig
from ultramem.train import checkpoint as ckpt
from ultramem.train.config import TrainConfig
from ultramem.train.metrics import read_metrics
from ultramem.train.trainer import Trainer

SMALL_MODEL = dict(n_layers=2, d_model=64, n_heads=2, ffn_hidden=128, max_seq_len=32,
                   memory=dict(n_keys=16, key_dim=16, top_m=8, value_dim=16, pre_value_dim=16,
                               init_samples=256))
SMALL_SETS = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.ffn_hidden=128",
    "model.max_seq_len=32", "model.memory.n_keys=16", "model.memory.key_dim=16",
    "model.memory.top_m=8", "model.memory.value_dim=16", "model.memory.pre_value_dim=16",
    "model.memory.init_samples=256", "batch_size=4", "seq_len=32", "tensorboard=false",
    "plot=false", "eval_every=0", "warmup=3", "log_every=1", "device=cpu",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(**SMALL_MODEL).replace(**changes)


def quick_train_cfg(**changes) -> TrainConfig:
    base = dict(steps=3, batch_size=2, seq_len=16, warmup=1, log_every=1, eval_every=0,
                ckpt_every=0, tensorboard=False, plot=False, device="cpu")
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("changes", [
    {},
    {"tie_embeddings": False},
    {"memory": {"share_group": 2}},
])
def test_load_model_round_trip(tmp_path, changes):
    trainer = Trainer(small_cfg(**changes), quick_train_cfg(), tmp_path, show_progress=False)
    trainer.fit()
    loaded = ckpt.load_model(tmp_path)  # the run directory resolves to its latest checkpoint
    assert isinstance(loaded, LM)
    assert loaded.cfg.memory.sparse_grad is False  # the user's config, not the runtime's
    ref = trainer.model.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    idx = torch.randint(0, loaded.cfg.vocab_size, (2, 16))
    trainer.model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(idx)[0], loaded(idx)[0])
    saved = json.loads((ckpt.resolve(tmp_path) / "config.json").read_text())
    assert ModelConfig.from_dict(saved["model"]) == loaded.cfg
    assert saved["tokenizer"]["kind"] == "bytes"
    assert saved["step"] == 3


def test_training_state_loads_weights_only(tmp_path):
    Trainer(small_cfg(), quick_train_cfg(), tmp_path, show_progress=False).fit()
    state = ckpt.load_training_state(tmp_path)  # raises if anything needs pickle
    assert state["trainer"]["step"] == 3
    assert set(state["optimizer"]) == {"main", "values"}
    assert isinstance(state["rng"]["torch"], torch.Tensor)


def test_ckpt_minutes_checkpoints_at_logged_steps_once_the_time_is_up(tmp_path, monkeypatch):
    """ckpt_minutes: a checkpoint at the first logged step that many minutes after the last,
    besides ckpt_every's and the final one; 0 (the default) adds none."""
    import ultramem.train.trainer as trainer_mod

    clock = iter(range(0, 10**6, 30))  # every reading of the clock is 30 s after the last
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: float(next(clock)))
    cfg = quick_train_cfg(steps=7, log_every=2, keep_last=10)
    Trainer(small_cfg(), cfg.replace(ckpt_minutes=1.5), tmp_path / "timed",
            show_progress=False).fit()
    steps = [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(tmp_path / "timed" /
                                                                        "checkpoints")]
    assert steps[-1] == 7 and steps[:-1] and all(s % 2 == 0 for s in steps[:-1])
    assert steps[:-1] != [2, 4, 6]  # not at every logged step: only once 90 s have passed
    Trainer(small_cfg(), cfg, tmp_path / "plain", show_progress=False).fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "plain" / "checkpoints")] == [
        "step_00000007"]
    with pytest.raises(ValueError, match="ckpt_minutes"):
        quick_train_cfg(ckpt_minutes=-1)


def test_incomplete_and_temporary_directories_are_ignored(tmp_path):
    model = LM(small_cfg(), seed=0)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(root, step, model=model, config={"model": model.cfg.to_dict()},
                             keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000003", "step_00000004"]
    # What a killed writer could leave: a temp dir, and a step dir missing its weights.
    (root / ".tmp-step_00000009-123").mkdir()
    (root / ".tmp-step_00000009-123" / "config.json").write_text("{}")
    bad = root / "step_00000008"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "trainer_state.json").write_text("{}")
    assert ckpt.latest_checkpoint(root).name == "step_00000004"
    # The next save removes the stale temp dir; re-saving a step replaces it.
    ckpt.save_checkpoint(root, 4, model=model, config={"model": model.cfg.to_dict()}, keep_last=2)
    assert not list(root.glob(".tmp-*"))
    assert ckpt.latest_checkpoint(root).name == "step_00000004"


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.load_model(tmp_path)


def _train_cmd(out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "ultramem.cli", "train", "--out", str(out), "--quiet"]
    for s in SMALL_SETS:
        cmd += ["--set", s]
    return cmd + list(extra)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_kill_9_then_resume_reproduces_losses_exactly(tmp_path, fmt):
    steps, every = 50, 5
    args = ("--steps", str(steps), "--set", f"ckpt_every={every}", "--set", f"ckpt_format={fmt}")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(full, *args), check=True, env=_env(), capture_output=True)

    proc = subprocess.Popen(_train_cmd(killed, *args), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = ckpt.latest_checkpoint(killed / "checkpoints")
        if done is not None and int(done.name.split("_")[1]) >= 2 * every:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    at_kill = int(ckpt.latest_checkpoint(killed / "checkpoints").name.split("_")[1])
    assert at_kill < steps

    subprocess.run(_train_cmd(killed, "--resume"), check=True, env=_env(), capture_output=True)
    ref = {r["step"]: r["loss"] for r in read_metrics(full)}
    got = {r["step"]: r["loss"] for r in read_metrics(killed)}
    assert sorted(ref) == list(range(1, steps + 1))
    assert sorted(got) == sorted(ref)
    mismatched = [s for s in ref if ref[s] != got[s]]
    assert not mismatched, f"losses differ after resume at steps {mismatched[:5]}"
    a = ckpt.load_model(full).state_dict()
    b = ckpt.load_model(killed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bpe_run_carries_its_tokenizer(tmp_path):
    from ultramem.data.prepare import prepare

    meta = prepare(["builtin:facts"], tmp_path / "data", tokenizer="bpe", vocab_size=400)
    Trainer(small_cfg(), quick_train_cfg(steps=2), tmp_path / "run", tmp_path / "data",
            show_progress=False).fit()
    path = ckpt.resolve(tmp_path / "run")
    assert (path / "tokenizer.json").is_file()
    model = ckpt.load_model(path)
    assert model.cfg.vocab_size == meta["vocab_size"] != 256  # taken from the data
    tok = ckpt.load_tokenizer(path)
    assert tok.vocab_size == meta["vocab_size"]
    assert tok.decode(tok.encode("The pet of Ada is a cat.")) == "The pet of Ada is a cat."


def test_loading_a_run_directory_hashes_each_file_once(tmp_path, monkeypatch):
    """`resolve` verifies the newest checkpoint and `load_model` then loads it: the checksums
    are computed once, and a file changed after that is still caught."""
    model = LM(small_cfg(), seed=0)
    root = tmp_path / "run" / "checkpoints"
    saved = ckpt.save_checkpoint(root, 1, model=model, config={"model": model.cfg.to_dict()})
    ckpt._HASHED.clear()
    hashed: list[str] = []
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda f: hashed.append(f.name) or real(f))
    ckpt.load_model(tmp_path / "run")
    assert sorted(hashed) == sorted(set(hashed)) and "model.safetensors" in hashed
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (saved / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.load_model(saved)


def test_sharded_checkpoints_in_one_process(tmp_path):
    """ckpt_format=sharded without torchrun: torch.distributed.checkpoint shards (safetensors,
    nothing pickled), keep_last rotation, model.safetensors only in the run's last checkpoint
    (equal to what format `full` writes), and a resume that reproduces the losses exactly."""
    from safetensors.torch import load_file

    sharded = quick_train_cfg(steps=4, ckpt_every=1, keep_last=2, ckpt_format="sharded")
    Trainer(small_cfg(), sharded, tmp_path / "s", show_progress=False).fit()
    data = tmp_path / "s" / "data"
    Trainer(small_cfg(), sharded.replace(ckpt_format="full"), tmp_path / "f", data,
            show_progress=False).fit()
    root = tmp_path / "s" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    step3, step4 = root / "step_00000003", root / "step_00000004"
    assert ckpt.is_sharded(step3) and not (step3 / "model.safetensors").exists()
    assert not (step3 / "optimizer.pt").exists()
    assert all(p.suffix == ".safetensors" for p in (step3 / "dcp").iterdir())
    ckpt.verify_checkpoint(step3)
    full = load_file(ckpt.resolve(tmp_path / "f") / "model.safetensors")
    assert load_file(step4 / "model.safetensors").keys() == full.keys()
    assert all(torch.equal(t, full[k]) for k, t in load_file(step4 / "model.safetensors").items())
    assert all(torch.equal(t, full[k]) for k, t in ckpt.load_model(step4).state_dict().items()
               if k in full)
    losses = {run: [r["loss"] for r in read_metrics(tmp_path / run)] for run in ("s", "f")}
    assert losses["s"] == losses["f"]
    # Stop at 2, resume to 4: the same losses and weights, bit for bit.
    Trainer(small_cfg(), sharded.replace(steps=2), tmp_path / "r", data,
            show_progress=False).fit()
    resumed = Trainer(small_cfg(), sharded, tmp_path / "r", resume=True, show_progress=False,
                      train_overrides={"steps": 4})
    assert resumed.start_step == 2
    resumed.fit()
    assert [r["loss"] for r in read_metrics(tmp_path / "r")] == losses["s"]
    got = load_file(ckpt.resolve(tmp_path / "r") / "model.safetensors")
    assert all(torch.equal(t, full[k]) for k, t in got.items())
