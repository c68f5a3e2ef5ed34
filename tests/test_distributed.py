"""torch.distributed under torchrun: 2 gloo processes on CPU against a single process.

One torchrun launch runs this file as a worker (see `worker` below) through every check that
needs two ranks, and writes what it measured; the test then compares it with the same steps
run in this single process with the doubled batch, and resumes the sharded checkpoints the two
ranks wrote in this single process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ultramem import ModelConfig
from ultramem.train.config import TrainConfig

SMALL_MODEL = dict(n_layers=2, d_model=64, n_heads=2, ffn_hidden=128, max_seq_len=32,
                   memory=dict(n_keys=16, key_dim=16, top_m=8, value_dim=16, pre_value_dim=16,
                               init_samples=256))
PER_RANK_BATCH = 2
# Dense weights by DDP or FSDP2; value tables replicated or split by columns across ranks.
OPTIONS = {
    "ddp": {"parallel": "ddp"},
    "fsdp": {"parallel": "fsdp"},
    "ddp_sharded": {"parallel": "ddp", "shard_tables": True},
    "fsdp_sharded": {"parallel": "fsdp", "shard_tables": True},
    # checkpoints gathered to rank 0 (format `full`) instead of written by each rank
    "fsdp_sharded_full": {"parallel": "fsdp", "shard_tables": True, "ckpt_format": "full"},
    # column-sharded tables in AdamW (dense updates): their moments are column shards too
    "fsdp_sharded_dense": {"parallel": "fsdp", "shard_tables": True, "value_update": "dense"},
}
PARALLEL = ("ddp", "fsdp", "ddp_sharded", "fsdp_sharded")  # the gradient checks
RESUMED = (*PARALLEL, "fsdp_sharded_full", "fsdp_sharded_dense")  # the resume checks
STEP2 = "checkpoints/step_00000002"


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**memory) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(**SMALL_MODEL).replace(memory=memory)


def quick(**changes) -> TrainConfig:
    # float32: the checks compare gradients across layouts to 1e-5 (bf16 rounding would not)
    base = dict(steps=4, batch_size=PER_RANK_BATCH, seq_len=16, warmup=1, log_every=1,
                eval_every=0, ckpt_every=2, tensorboard=False, plot=False, device="cpu",
                precision="fp32", data_workers=0)
    return TrainConfig(**{**base, **changes})


def first_step_grads(trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and full (dense, unsharded) gradients of step 0, without the optimizer update."""
    from ultramem.train.distributed import full_grads

    trainer.opts = {}
    loss = trainer.train_step(0)["loss"]
    return loss, full_grads(trainer.model, trainer.dist)


def worker(out: Path) -> None:
    """Run by each torchrun rank."""
    from ultramem.data.prepare import prepare
    from ultramem.train import distributed
    from ultramem.train.metrics import read_metrics
    from ultramem.train.trainer import Trainer

    ctx = distributed.setup()
    data = out / "data"
    if ctx.rank == 0:
        prepare(["builtin:facts", "builtin:python"], data)
    ctx.barrier()
    result = {"world": ctx.world}
    for parallel in PARALLEL:
        for update in ("sparse", "dense"):
            t = Trainer(small_cfg(), quick(**OPTIONS[parallel], value_update=update),
                        out / f"g_{parallel}_{update}", data, show_progress=False)
            loss, grads = first_step_grads(t)
            torch.save(grads, out / f"grads_{parallel}_{update}_rank{ctx.rank}.pt")
            if ctx.rank == 0:
                result[f"loss_{parallel}_{update}"] = loss
                result[f"tables_{parallel}"] = {n: list(p.shape) for n, p in
                                                t.model.named_parameters() if "values" in n}
    # Plain values (no pre-value table) with column-sharded tables.
    t = Trainer(small_cfg(pre_value_dim=0), quick(**OPTIONS["fsdp_sharded"]), out / "g_plain",
                data, show_progress=False)
    loss, grads = first_step_grads(t)
    torch.save(grads, out / f"grads_plain_rank{ctx.rank}.pt")
    if ctx.rank == 0:
        result["loss_plain"] = loss
    # Full 4-step run, and a 2-step run resumed to 4 under torchrun: identical losses.
    for parallel in RESUMED:
        full, resumed = out / f"full_{parallel}", out / f"resumed_{parallel}"
        Trainer(small_cfg(), quick(**OPTIONS[parallel]), full, data, show_progress=False).fit()
        Trainer(small_cfg(), quick(steps=2, **OPTIONS[parallel]), resumed, data,
                show_progress=False).fit()
        Trainer(small_cfg(), quick(), resumed, data, resume=True, show_progress=False,
                train_overrides={"steps": 4}).fit()
        if ctx.rank == 0:
            result[f"full_{parallel}"] = [r["loss"] for r in read_metrics(full)]
            result[f"resumed_{parallel}"] = [r["loss"] for r in read_metrics(resumed)]
    # A sharded checkpoint of one layout resumed by another: FSDP + column-sharded tables ->
    # DDP + replicated tables.
    cross = out / "cross"
    if ctx.rank == 0:
        shutil.copytree(out / "resumed_fsdp_sharded" / STEP2, cross / STEP2)
    ctx.barrier()
    Trainer(small_cfg(), quick(), cross, data, resume=True, show_progress=False,
            train_overrides={"steps": 4, **OPTIONS["ddp"], "shard_tables": False}).fit()
    if ctx.rank == 0:
        result["cross"] = [r["loss"] for r in read_metrics(cross)]
    # ckpt_minutes where only rank 1's clock says it is time (two minutes pass at each reading
    # there; rank 0's one minute never passes): every rank must save at the same steps, or
    # the collective save would hang.
    import ultramem.train.trainer as trainer_mod

    real_clock = trainer_mod.time.perf_counter
    if ctx.rank == 1:
        ticks = iter(range(0, 10**9, 120))
        trainer_mod.time.perf_counter = lambda: float(next(ticks))
    timed = out / "timed"
    try:
        Trainer(small_cfg(), quick(steps=3, ckpt_every=0, ckpt_minutes=1.0, keep_last=5),
                timed, data, show_progress=False).fit()
    finally:
        trainer_mod.time.perf_counter = real_clock
    if ctx.rank == 0:
        from ultramem.train.checkpoint import list_checkpoints

        result["timed"] = [p.name for p in list_checkpoints(timed / "checkpoints")]
    if ctx.rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    ctx.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def torchrun_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
           __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_two_ranks_match_one_process(tmp_path, torchrun_result, parallel, update):
    out, result = torchrun_result
    assert result["world"] == 2
    tables = result[f"tables_{parallel}"]
    if OPTIONS[parallel].get("shard_tables"):  # each rank holds half of the columns
        assert tables["blocks.0.memory.table_source.values"] == [256, 8]
        assert tables["blocks.0.memory.table_source.pre_values"] == [256, 8]
    else:
        assert tables["blocks.0.memory.values"] == [256, 16]
    from ultramem.train.trainer import Trainer

    single = Trainer(small_cfg(), quick(batch_size=2 * PER_RANK_BATCH, value_update=update),
                     tmp_path, out / "data", show_progress=False)
    loss, grads = first_step_grads(single)
    assert result[f"loss_{parallel}_{update}"] == pytest.approx(loss, rel=1e-6)
    _assert_ranks_match(out, f"grads_{parallel}_{update}", grads)


def _assert_ranks_match(out: Path, prefix: str, grads: dict[str, torch.Tensor]) -> None:
    """Each rank's saved full gradients equal the single process's."""
    for rank in (0, 1):
        got = torch.load(out / f"{prefix}_rank{rank}.pt", weights_only=True)
        assert got.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(got[name], grads[name], rtol=1e-5, atol=1e-7,
                                       msg=f"rank {rank} {name}")


def test_plain_values_sharded_match_one_process(tmp_path, torchrun_result):
    out, result = torchrun_result
    from ultramem.train.trainer import Trainer

    single = Trainer(small_cfg(pre_value_dim=0), quick(batch_size=2 * PER_RANK_BATCH), tmp_path,
                     out / "data", show_progress=False)
    loss, grads = first_step_grads(single)
    assert not any("pre_value" in name for name in grads)
    assert result["loss_plain"] == pytest.approx(loss, rel=1e-6)
    _assert_ranks_match(out, "grads_plain", grads)


@pytest.mark.parametrize("parallel", RESUMED)
def test_checkpoint_resume_under_torchrun(torchrun_result, parallel):
    out, result = torchrun_result
    assert len(result[f"full_{parallel}"]) == 4
    assert result[f"resumed_{parallel}"] == result[f"full_{parallel}"]
    # Every layout trains the same model: losses agree with replicated DDP to float precision
    # (dense table updates: AdamW, not lazy Adam, from the second update on).
    ref = result["full_ddp"]
    if OPTIONS[parallel].get("value_update") == "dense":
        ref = ref[:2]
    assert result[f"full_{parallel}"][:len(ref)] == pytest.approx(ref, rel=1e-5)
    # The last checkpoint holds model.safetensors whatever the sharding: it loads in one process.
    from ultramem.train.checkpoint import is_sharded, load_model, resolve

    last = resolve(out / f"full_{parallel}")
    assert (last / "model.safetensors").is_file()
    assert is_sharded(last) == (OPTIONS[parallel].get("ckpt_format") != "full")
    model = load_model(out / f"full_{parallel}")
    assert model.cfg == small_cfg()


def test_ckpt_minutes_saves_on_every_rank_when_one_rank_says_so(torchrun_result):
    _, result = torchrun_result
    assert result["timed"] == ["step_00000001", "step_00000002", "step_00000003"]


def test_sharded_checkpoint_layout(tmp_path, torchrun_result):
    """Each rank wrote its own safetensors shard file (no pickle anywhere); no gather: the
    intermediate checkpoint has no model.safetensors, yet loads in one process, and
    `export_model` writes the same weights as one file."""
    from safetensors.torch import load_file

    from ultramem.train import checkpoint as ckpt

    out, _ = torchrun_result
    step2 = tmp_path / "step_00000002"
    shutil.copytree(out / "full_fsdp_sharded" / STEP2, step2)
    assert sorted(p.name for p in (step2 / "dcp").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors"]
    assert not (step2 / "model.safetensors").exists()
    assert not (step2 / "optimizer.pt").exists() and not (step2 / "rng.pt").exists()
    saved = ckpt.shard_metadata(step2)
    # Column-sharded tables and their lazy-Adam moments under the whole table's name and shape.
    assert saved["model.blocks.0.memory.values"][0] == (256, 16)
    assert saved["optim.values.blocks.0.memory.values.exp_avg"][0] == (256, 16)
    assert saved["optim.values.blocks.0.memory.values.row_steps"][0] == (256,)
    assert saved["rng.torch"][0][0] == 2  # one RNG state per rank
    assert json.loads((step2 / "trainer_state.json").read_text())["world"] == 2
    ckpt.verify_checkpoint(step2)
    model = ckpt.load_model(step2)
    exported = load_file(ckpt.export_model(step2))
    state = model.state_dict()
    assert exported.keys() <= state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in exported)
    ckpt.verify_checkpoint(step2)  # checksums.json now lists the export too
    assert "model.safetensors" in json.loads((step2 / "checksums.json").read_text())["sha256"]


def test_sharded_checkpoint_resumes_across_layouts(torchrun_result):
    """FSDP + column-sharded tables saved at step 2, resumed by DDP with replicated tables."""
    _, result = torchrun_result
    assert len(result["cross"]) == 2  # steps 3 and 4
    assert result["cross"] == pytest.approx(result["full_fsdp_sharded"][2:], rel=1e-5)


@pytest.mark.parametrize("parallel", ["ddp_sharded", "fsdp_sharded"])
def test_sharded_checkpoint_resumes_in_one_process(tmp_path, torchrun_result, parallel):
    """Saved by 2 ranks at step 2, resumed by one process with the same global batch: it loads
    exactly the saved state, and steps 3-4 match the uninterrupted 2-rank run."""
    from ultramem.train import checkpoint as ckpt
    from ultramem.train.metrics import read_metrics
    from ultramem.train.trainer import Trainer

    out, result = torchrun_result
    run = tmp_path / "run"
    shutil.copytree(out / f"resumed_{parallel}" / STEP2, run / STEP2)
    shutil.copy(out / f"resumed_{parallel}" / "metrics.jsonl", run / "metrics.jsonl")
    with pytest.warns(UserWarning, match="2 sequences per step .* instead of the saved run's 4"):
        Trainer(small_cfg(), quick(), run, resume=True, show_progress=False)  # batch 2 x 1 rank
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Trainer(small_cfg(), quick(), run, resume=True, show_progress=False,
                    train_overrides={"steps": 4, "batch_size": 2 * PER_RANK_BATCH})
    assert not [w for w in caught if "sequences per step" in str(w.message)]
    assert t.dist.world == 1 and t.start_step == 2
    saved = ckpt.load_model(run / STEP2).state_dict()
    got = t.model.state_dict()
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    adam = t.opts["values"].state[t.model.blocks[0].memory.values]
    assert adam["exp_avg"].shape == (256, 16) and adam["row_steps"].dtype == torch.int64
    assert int(adam["row_steps"].max()) == 2  # touched on both saved steps
    t.fit()
    losses = [r["loss"] for r in read_metrics(run)]
    assert losses[:2] == result[f"full_{parallel}"][:2]
    assert losses == pytest.approx(result[f"full_{parallel}"], rel=1e-5)


def test_damaged_shard_is_detected(tmp_path, torchrun_result):
    """One flipped byte in one rank's shard file: verification names the file, the run
    directory falls back to the previous checkpoint, and a resume refuses the damaged one."""
    from ultramem.train import checkpoint as ckpt
    from ultramem.train.trainer import Trainer

    out, _ = torchrun_result
    run = tmp_path / "run"
    shutil.copytree(out / "full_ddp_sharded" / "checkpoints", run / "checkpoints")
    shard = run / "checkpoints" / "step_00000004" / "dcp" / (
        "shard-00002-model-00001-of-00001.safetensors")
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="shard-00002.*checksum mismatch"):
        ckpt.verify_checkpoint(shard.parent.parent)
    good, damaged = ckpt.latest_good_checkpoint(run / "checkpoints")
    assert good.name == "step_00000002" and damaged[0][0] == shard.parent.parent
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint"):
        assert ckpt.resolve(run) == good
    with pytest.raises(ckpt.CheckpointError, match="shard-00002.*checksum mismatch"):
        Trainer(small_cfg(), quick(), run, resume=True, show_progress=False,
                train_overrides={"batch_size": 2 * PER_RANK_BATCH})
    # A shard file that the checkpoint did not write is refused too.
    stray = good / "dcp" / "shard-00003-model-00001-of-00001.safetensors"
    shutil.copy(good / "dcp" / "shard-00001-model-00001-of-00001.safetensors", stray)
    with pytest.raises(ckpt.CheckpointError, match="shard-00003.*not listed"):
        ckpt.verify_checkpoint(good)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
