"""torch.distributed under torchrun: 2 gloo processes on CPU against a single process.

One torchrun launch runs this file as a worker (see `worker` below) through every check that
needs two ranks, and writes what it measured; the test then compares it with the same steps
run in this single process with the doubled batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
}
PARALLEL = tuple(OPTIONS)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**memory) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(**SMALL_MODEL).replace(memory=memory)


def quick(**changes) -> TrainConfig:
    # float32: the checks compare gradients across layouts to 1e-5 (bf16 rounding would not)
    base = dict(steps=4, batch_size=PER_RANK_BATCH, seq_len=16, warmup=1, log_every=1,
                eval_every=0, ckpt_every=2, tensorboard=False, plot=False, device="cpu",
                precision="fp32")
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
    for parallel in PARALLEL:
        full, resumed = out / f"full_{parallel}", out / f"resumed_{parallel}"
        Trainer(small_cfg(), quick(**OPTIONS[parallel]), full, data, show_progress=False).fit()
        Trainer(small_cfg(), quick(steps=2, **OPTIONS[parallel]), resumed, data,
                show_progress=False).fit()
        Trainer(small_cfg(), quick(), resumed, data, resume=True, show_progress=False,
                train_overrides={"steps": 4}).fit()
        if ctx.rank == 0:
            result[f"full_{parallel}"] = [r["loss"] for r in read_metrics(full)]
            result[f"resumed_{parallel}"] = [r["loss"] for r in read_metrics(resumed)]
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


@pytest.mark.parametrize("parallel", PARALLEL)
def test_checkpoint_resume_under_torchrun(torchrun_result, parallel):
    out, result = torchrun_result
    assert len(result[f"full_{parallel}"]) == 4
    assert result[f"resumed_{parallel}"] == result[f"full_{parallel}"]
    # Every layout trains the same model: losses agree with replicated DDP to float precision.
    assert result[f"full_{parallel}"] == pytest.approx(result["full_ddp"], rel=1e-5)
    # The checkpoint holds full tensors whatever the sharding: it loads in one process.
    from ultramem.train.checkpoint import load_model

    model = load_model(out / f"full_{parallel}")
    assert model.cfg == small_cfg()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
