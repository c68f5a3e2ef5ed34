"""The training loop: `Trainer(model_cfg, train_cfg, out_dir, data_dir).fit()`.

One step: grad_accum micro-batches (bf16 autocast optional) -> clip the dense gradients and the
value-table gradients separately -> a non-finite loss or norm skips the step (counted, logged,
and max_bad_steps in a row stop the run with `NonFiniteError`) -> optimizer steps -> log, eval,
checkpoint. Everything a resume needs (weights, optimizer, data position = step, RNG) is in the
checkpoint, and the data order is a pure function of the step, so a resumed run's losses equal an
uninterrupted run's bit for bit on CPU.

Under torchrun (WORLD_SIZE > 1) the model is wrapped by `ultramem.train.distributed`; only rank 0
writes metrics; every rank writes its shards of a checkpoint (`ckpt_format`, `train.checkpoint`).
Micro-batches come from `data.shards.BatchLoader` (DataLoader workers, `data_workers`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ultramem import precision as precision_mod
from ultramem.config import ModelConfig
from ultramem.data.shards import BatchLoader, BatchOrder, TokenShards, read_meta
from ultramem.diagnostics import (
    SILENT_SHARE,
    adam_eps_summary,
    output_share_summary,
    retrieval_recall,
)
from ultramem.model import LM
from ultramem.train import checkpoint as ckpt
from ultramem.train.config import TrainConfig
from ultramem.train.metrics import MetricsLogger, plot_losses
from ultramem.train.optim import build_optimizers, param_groups, set_lrs, table_parameters
from ultramem.train.sparse import clip_grads


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def prepare_builtin(data_dir: Path, seed: int = 0) -> Path:
    """Byte-tokenized built-in corpora (facts + Python's text) in data_dir, once."""
    from ultramem.data.prepare import prepare

    if not (data_dir / "meta.json").is_file():
        prepare(["builtin:facts", "builtin:python"], data_dir, tokenizer="bytes", seed=seed)
    return data_dir


@torch.no_grad()
def memory_diagnostics(model: LM) -> dict[str, float]:
    """Value coverage of the last step (rows with a gradient / rows) and Tucker core spectra."""
    out: dict[str, float] = {}
    tables = [p for name, p in table_parameters(model).items() if not name.endswith("pre_values")]
    fractions = []
    for p in tables:
        g = p.grad
        if g is None:
            continue
        touched = g.coalesce().indices().shape[1] if g.is_sparse else int((g != 0).any(1).sum())
        fractions.append(touched / p.shape[0])
    if fractions:
        out["mem/coverage"] = sum(fractions) / len(fractions)
    ratios = []
    for layer in model.memory_layers():
        cores = getattr(getattr(layer, "keys", None), "cores", None)
        if cores is not None and cores.shape[-1] >= 2 and bool(torch.isfinite(cores).all()):
            sv = torch.linalg.svdvals(cores.detach().float().sum(0))
            ratios.append(float(sv[1] / sv[0].clamp_min(1e-12)))
    if ratios:
        out["mem/tucker_sv2_over_sv1"] = max(ratios)
    return out


class Trainer:
    """Trains `LM(model_cfg)` on a prepared data directory, writing everything to out_dir.

    With resume=True the model and train configs come from the latest checkpoint in
    out_dir/checkpoints (model_cfg and train_cfg are ignored); train_overrides changes fields of
    the saved train config (e.g. {"steps": 400} to train longer).
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | Path,
                 data_dir: str | Path | None = None, *, resume: bool = False,
                 show_progress: bool = True, extra_config: dict[str, Any] | None = None,
                 train_overrides: dict[str, Any] | None = None):
        from ultramem.train import distributed as dist_mod

        self.out = Path(out_dir)
        self.dist = dist_mod.setup()
        self.rank0 = self.dist.rank == 0
        self.start_step = 0
        state = None
        if resume:
            self.dist.barrier()  # `ultramem train` rank 0 may be setting damaged ones aside
            found = ckpt.latest_checkpoint(self.out / "checkpoints")
            if found is None:
                raise FileNotFoundError(
                    f"--resume: no complete checkpoint in {self.out / 'checkpoints'}")
            saved = ckpt.read_config(found)
            model_cfg = ModelConfig.from_dict(saved["model"])
            # The saved run's settings, plus only the changes asked for (e.g. more steps).
            train_cfg = TrainConfig.from_dict({**saved["train"], **(train_overrides or {})})
            data_dir = data_dir or saved.get("data_dir")  # --data wins if the data moved
            state = ckpt.load_training_state(found)
            self.start_step = int(state["trainer"]["step"])
            self.resumed_from = found
            _check_global_batch(state["trainer"], train_cfg, self.dist.world, self.rank0)
        self.cfg = train_cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if data_dir is None:
            data_dir = self.out / "data"
            if self.rank0:
                prepare_builtin(Path(data_dir), train_cfg.seed)
            self.dist.barrier()
        self.data_dir = Path(data_dir)
        meta = read_meta(self.data_dir)
        if model_cfg.vocab_size != meta["vocab_size"]:
            model_cfg = model_cfg.replace(vocab_size=int(meta["vocab_size"]))
        if train_cfg.seq_len > model_cfg.max_seq_len:
            model_cfg = model_cfg.replace(max_seq_len=train_cfg.seq_len)
        self.model_cfg = model_cfg
        self.tokenizer_spec = meta["tokenizer"]
        self.extra_config = extra_config or {}

        device = torch.device("cuda" if train_cfg.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if train_cfg.device == "auto" else train_cfg.device))
        self.device = self.dist.device(device)
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        self.precision = precision_mod.resolve_precision(train_cfg.precision, self.device)
        torch.manual_seed(train_cfg.seed)
        runtime_cfg = model_cfg
        if hasattr(model_cfg.memory, "sparse_grad"):
            runtime_cfg = model_cfg.replace(
                memory={"sparse_grad": train_cfg.value_update == "sparse"})
        # Resuming: skip the (Monte Carlo) init, every weight and buffer comes from the checkpoint.
        self.model = LM(runtime_cfg, seed=train_cfg.seed, init=state is None).to(self.device)
        self.model.activation_checkpointing = train_cfg.activation_checkpointing
        sharded_resume = state is not None and ckpt.is_sharded(self.resumed_from)
        if state is not None and not sharded_resume:
            from safetensors.torch import load_model as st_load_model

            st_load_model(self.model, str(self.resumed_from / "model.safetensors"), strict=True,
                          device=str(self.device))
        # Wrap before building optimizers: FSDP2 replaces parameters with sharded ones.
        self.step_model = dist_mod.wrap(self.model, self.dist, train_cfg)
        self.opts = build_optimizers(self.model, train_cfg)
        groups = param_groups(self.model)
        self.dense_params = groups["decay"] + groups["no_decay"]
        self.table_params = groups["values"]

        self.train_order = BatchOrder(TokenShards(self.data_dir, "train"), train_cfg.seq_len,
                                      train_cfg.batch_size, seed=train_cfg.seed,
                                      rank=self.dist.rank, world=self.dist.world)
        # Worker processes prepare the next micro-batches; batch k is the same whatever they do.
        self.train_batches = BatchLoader(
            self.train_order, workers=train_cfg.data_workers,
            pin_memory=self.device.type == "cuda", stop=train_cfg.steps * train_cfg.grad_accum)
        has_val = "val" in meta["splits"] and meta["splits"]["val"]["n_tokens"] > train_cfg.seq_len
        self.val_order = BatchOrder(TokenShards(self.data_dir, "val"), train_cfg.seq_len,
                                    train_cfg.batch_size, shuffle=False, rank=self.dist.rank,
                                    world=self.dist.world) if has_val else None

        self.skipped = 0
        self.bad_in_row = 0
        if sharded_resume:  # weights, optimizer and RNG: each rank reads what it holds
            ckpt.check_files(self.resumed_from)
            dist_mod.load_sharded_state(self.model, self.opts, self.dist, self.resumed_from,
                                        state["trainer"].get("optimizer_groups", {}))
        elif state is not None:
            dist_mod.load_optimizer_state(self.opts, self.model, self.dist, state["optimizer"])
        if state is not None:
            self.skipped = int(state["trainer"].get("skipped", 0))
            self.bad_in_row = int(state["trainer"].get("bad_in_row", 0))
            if state["rng"] is not None:
                torch.set_rng_state(state["rng"]["torch"])
        self.show_progress = show_progress and self.rank0

    # -- pieces ---------------------------------------------------------------------------

    def _autocast(self):
        return precision_mod.autocast(self.precision, self.device)

    def _config(self) -> dict[str, Any]:
        return {"model": self.model_cfg.to_dict(), "train": self.cfg.to_dict(),
                "tokenizer": self.tokenizer_spec, "data_dir": str(self.data_dir),
                "precision": self.precision,
                **self.extra_config}

    def save(self, step: int) -> Path | None:
        """Checkpoint after `step` completed steps. Format `full`: gathered, rank 0 writes, all
        ranks wait; `sharded`: every rank writes its shards (`ckpt_format`, `train.checkpoint`).
        Returns the path on rank 0."""
        from ultramem.train import distributed as dist_mod

        trainer_state = {"skipped": self.skipped, "bad_in_row": self.bad_in_row,
                         "samples": step * self.cfg.grad_accum * self.cfg.batch_size
                         * self.dist.world}
        fmt = self.cfg.ckpt_format
        if fmt == "sharded" or (fmt == "auto" and self.dist.active):
            state, groups = dist_mod.sharded_state(self.model, self.opts, self.dist)
            path = ckpt.save_sharded_checkpoint(
                self.out / "checkpoints", step, state=state, config=self._config(),
                trainer_state={**trainer_state, "world": self.dist.world,
                               "optimizer_groups": groups},
                tokenizer_dir=self.data_dir, keep_last=self.cfg.keep_last,
                export=step == self.cfg.steps)  # model.safetensors at the end of the run
            return path if self.rank0 else None
        model_state = dist_mod.full_model(self.model, self.dist)
        optimizer_state = dist_mod.optimizer_state(self.opts, self.model, self.dist)
        path = None
        if self.rank0:
            path = ckpt.save_checkpoint(
                self.out / "checkpoints", step, model=model_state, config=self._config(),
                optimizer_state=optimizer_state, trainer_state=trainer_state,
                rng_state={"torch": torch.get_rng_state()},
                tokenizer_dir=self.data_dir, keep_last=self.cfg.keep_last,
            )
        self.dist.barrier()
        return path

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_order is None:
            return None
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64)
        for k in range(self.cfg.eval_batches):
            x, y = self.val_order.batch(k)
            with self._autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            total += loss.double().cpu()
        self.model.train()
        return float(self.dist.mean(total / self.cfg.eval_batches))

    @torch.no_grad()
    def retrieval_diagnostics(self) -> dict[str, float]:
        """mem/preselect_recall and mem/neg_quadrant_share of the UltraMemV2 layers, and
        mem/out_over_ffn_min/_mean of the sparse layers beside an FFN (near 0: a dead layer), on
        the first validation batch (`ultramem.diagnostics.retrieval_recall`,
        `output_share_summary`). Skipped under FSDP with several ranks, where a layer's weights
        are sharded outside its forward."""
        if self.val_order is None or (self.cfg.parallel == "fsdp" and self.dist.world > 1):
            return {}
        x, _ = self.val_order.batch(0)
        x = x.to(self.device)
        return {**retrieval_recall(self.model, x), **output_share_summary(self.model, x)}

    def optimizer_diagnostics(self) -> dict[str, float]:
        """mem/grad_over_eps_min (`ultramem.diagnostics.adam_eps_summary`): below 1, some
        sparse layer's Adam steps are set by eps, not its gradient (a layer dying or dead).
        Skipped under FSDP with several ranks, where the optimizer holds shards."""
        if self.cfg.parallel == "fsdp" and self.dist.world > 1:
            return {}
        return adam_eps_summary(self.model, self.opts["main"])

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (or a skipped one); returns its numbers."""
        cfg = self.cfg
        lr, value_lr = set_lrs(self.opts, cfg, step, self.model.cfg.memory)
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            x, y = self.train_batches.batch(step * cfg.grad_accum + micro)
            with self.dist.no_sync(self.step_model, micro < cfg.grad_accum - 1), self._autocast():
                _, loss = self.step_model(x.to(self.device, non_blocking=True),
                                          y.to(self.device, non_blocking=True))
            (loss / cfg.grad_accum).backward()
            total += loss.detach().double().cpu()
        self.dist.reduce_table_grads(self.model)
        loss_value = float(self.dist.mean(total / cfg.grad_accum))
        grad_norm = clip_grads(self.dense_params, cfg.grad_clip)
        value_norm = clip_grads(self.table_params, cfg.value_grad_clip,
                                self.dist.table_sq_reduce)
        finite = all(map(_finite, (loss_value, grad_norm, value_norm)))
        row = {"step": step + 1, "loss": loss_value, "lr": lr, "value_lr": value_lr,
               "grad_norm": grad_norm, "value_grad_norm": value_norm}
        if finite:
            for opt in self.opts.values():
                opt.step()
            self.bad_in_row = 0
        else:
            self.skipped += 1
            self.bad_in_row += 1
            row["skipped"] = True
        row["skipped_steps"] = self.skipped
        return row

    def _zero_grad(self) -> None:
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        logger = None
        if self.rank0:
            logger = MetricsLogger(self.out, tensorboard=cfg.tensorboard,
                                   resume_step=self.start_step)
            (self.out / "config.json").write_text(json.dumps(self._config(), indent=2))
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.dist.world
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps,
                   desc="train", disable=not self.show_progress, mininterval=1.0)
        t_last, tokens_since = time.perf_counter(), 0
        t_ckpt = t_last
        last_loss, eval_loss, last_tok_s = float("nan"), None, 0.0
        self.model.train()
        try:
            for step in bar:
                row = self.train_step(step)
                tokens_since += tokens_per_step
                done = step + 1
                if self.bad_in_row >= cfg.max_bad_steps:
                    msg = (f"stopping at step {done}: {self.bad_in_row} steps in a row had a "
                           f"non-finite loss or gradient (loss={row['loss']}, grad_norm="
                           f"{row['grad_norm']}, value_grad_norm={row['value_grad_norm']}); "
                           f"{self.skipped} skipped in total. Lower lr, enable grad_clip, or "
                           f"raise max_bad_steps.")
                    if logger is not None:
                        logger.log(row)
                    raise NonFiniteError(msg)
                log_now = done % cfg.log_every == 0 or done == cfg.steps or "skipped" in row
                if log_now:
                    now = time.perf_counter()
                    row["tokens_per_s"] = last_tok_s = tokens_since / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    row.update(memory_diagnostics(self.model))
                    row.update(self.optimizer_diagnostics())
                self._zero_grad()
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        row["eval_loss"] = eval_loss
                        row.update(self.retrieval_diagnostics())
                        log_now = True
                        if row.get("mem/silent_layers") and self.rank0:
                            _warn_silent(done, row)
                if log_now and logger is not None:
                    logger.log(row)
                if _finite(row["loss"]):
                    last_loss = row["loss"]
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{last_tok_s:,.0f}")
                due = cfg.ckpt_every and done % cfg.ckpt_every == 0 or done == cfg.steps
                if not due and cfg.ckpt_minutes and done % cfg.log_every == 0:
                    # Every rank saves at the same step: one whose clock says so is enough.
                    late = time.perf_counter() - t_ckpt >= 60 * cfg.ckpt_minutes
                    due = float(self.dist.mean(torch.tensor(float(late)))) > 0
                if due:
                    self.save(done)
                    t_ckpt = time.perf_counter()
        finally:
            bar.close()
            self.train_batches.close()
            if logger is not None:
                logger.close()
        summary = {"steps": cfg.steps, "final_loss": last_loss, "eval_loss": eval_loss,
                   "skipped_steps": self.skipped, "precision": self.precision,
                   "out": str(self.out)}
        if self.rank0 and cfg.plot:
            png = plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
            summary["plot"] = str(png) if png else None
        return summary


def _check_global_batch(saved: dict[str, Any], cfg: TrainConfig, world: int, rank0: bool,
                        ) -> None:
    """Warn when a resume changes the sequences per step (batch_size x grad_accum x ranks): the
    data position is the step, so the run no longer continues the saved one's data order."""
    import warnings

    step, seen = int(saved["step"]), saved.get("samples")
    per_step = cfg.batch_size * cfg.grad_accum * world
    if rank0 and step and seen is not None and seen != step * per_step:
        warnings.warn(f"--resume: {per_step} sequences per step (batch_size x grad_accum x "
                      f"ranks) instead of the saved run's {seen // step}: the data order goes on "
                      f"from step {step} with the new batch, so it does not continue the saved "
                      f"run exactly; keep the global batch to do so", stacklevel=3)


def _warn_silent(step: int, row: dict[str, Any]) -> None:
    """Warn that some sparse layers have collapsed toward 0 (`mem/silent_layers`)."""
    import warnings

    ratio = row.get("mem/grad_over_eps_min")
    stuck = "" if ratio is None else f"; smallest Adam gradient RMS / eps {ratio:.2g}"
    smallest = row["mem/out_over_ffn_min"]
    warnings.warn(f"step {step}: {row['mem/silent_layers']} sparse layer(s) silent, output "
                  f"below {SILENT_SHARE:g} of their FFN's (smallest {smallest:.1e}{stuck}): "
                  f"collapsed toward 0. The small UltraMemV2 preset does this at a peak "
                  f"lr of 3e-3 and not at 1e-3 with a longer warmup (docs/training.md, dead "
                  f"memory layers)", stacklevel=2)


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | Path,
          data_dir: str | Path | None = None, *, resume: bool = False,
          show_progress: bool = True, train_overrides: dict[str, Any] | None = None,
          ) -> dict[str, Any]:
    """Train and return a summary (final loss, eval loss, skipped steps, paths)."""
    return Trainer(model_cfg, train_cfg, out_dir, data_dir, resume=resume,
                   show_progress=show_progress, train_overrides=train_overrides).fit()
