"""Knowledge capacity: how many bits of facts each architecture stores per parameter.

A fact world of `n_subjects` made-up names (a few syllable tokens each) and `n_relations`
relations; every (subject, relation) pair has a value drawn uniformly from `n_values`, so each fact
carries log2(n_values) bits that nothing but memorisation can give. A fact is one sequence

    s_1 .. s_L  r  ->  v          (name syllables, relation token; predict the value token)

trained with the loss on the value only, every fact once per epoch, for a fixed number of epochs.

Bits stored (Allen-Zhu & Li, "Physics of Language Models 3.3", the uniform-value case): for each
fact, max(0, log2 n_values - NLL(v | name, relation) in bits), summed over all facts. A model that
knows nothing stores 0; one that puts probability 1 on every value stores N log2 n_values.

Models: a tiny backbone (`CapacityConfig.d_model`, `n_layers`); the dense model with
`ffn_hidden` sets the activated parameter count A. Every sparse architecture is sized by
`matched_config` to the same A (its FFN width, or expert width for the MoE) and to a total of
`multiple` x A (its number of keys or experts), both solved against
`ultramem.accounting.count_params`; dense models at larger totals (wider FFNs, so A grows too)
give the dense reference curve.

`run_capacity(CapacityConfig(...))` trains every (arch, multiple) run, reuses runs already
finished with the same settings (each writes result.json when it ends), and writes
capacity.md / capacity.json / capacity.png into `out`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ultramem.config import (
    ConfigError,
    MemoryPlusConfig,
    ModelConfig,
    MoEConfig,
    PEERConfig,
    PKMConfig,
    UltraMemV1Config,
    UltraMemV2Config,
)

CAPACITY_ARCHS = ("dense", "moe", "pkm", "peer", "memory_plus", "ultramem_v1", "ultramem_v2")
# Variants, named only when asked for: UltraMemV2 with both-ends pre-selection at about the
# rank-1 candidate count (`UltraMemV2Config.both_ends_equal`), sized exactly as ultramem_v2.
CAPACITY_VARIANTS = ("ultramem_v2+both_ends_equal",)
# Architectures without memory value tables: --value-lr-scale does not change them.
NO_VALUE_TABLES = ("dense", "moe")


def _require(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {reason}")


# ----------------------------------------------------------------------------- the fact world


@dataclass(frozen=True)
class WorldConfig:
    """The fact world: vocabulary = syllables, then relations, then values."""

    n_subjects: int = 8192
    n_relations: int = 4
    n_values: int = 512
    n_syllables: int = 32
    name_len: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_subjects", "n_relations", "n_values", "n_syllables", "name_len"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, f"world.{name}", f"must be > 0, got {v!r}")
        _require(self.n_values >= 2, "world.n_values", "must be >= 2 (a value carries bits)")
        _require(self.n_syllables ** self.name_len >= self.n_subjects, "world.n_subjects",
                 f"exceeds the {self.n_syllables ** self.name_len} distinct names of "
                 f"{self.name_len} syllables out of {self.n_syllables}")

    @property
    def vocab_size(self) -> int:
        return self.n_syllables + self.n_relations + self.n_values

    @property
    def n_facts(self) -> int:
        return self.n_subjects * self.n_relations

    @property
    def bits_per_fact(self) -> float:
        return math.log2(self.n_values)

    @property
    def value_offset(self) -> int:
        return self.n_syllables + self.n_relations


def make_world(world: WorldConfig):
    """[n_facts, name_len + 2] int64 token rows (name syllables, relation, value), seeded."""
    import torch

    g = torch.Generator().manual_seed(world.seed)
    codes = torch.randperm(world.n_syllables ** world.name_len, generator=g)[:world.n_subjects]
    digits = [(codes // world.n_syllables ** i) % world.n_syllables
              for i in reversed(range(world.name_len))]
    names = torch.stack(digits, dim=1)  # [S, L] syllable ids
    values = torch.randint(world.n_values, (world.n_subjects, world.n_relations), generator=g)
    rel = torch.arange(world.n_relations) + world.n_syllables
    rows = torch.cat([
        names[:, None, :].expand(-1, world.n_relations, -1),
        rel[None, :, None].expand(world.n_subjects, -1, 1),
        (values + world.value_offset)[:, :, None],
    ], dim=2)
    return rows.reshape(world.n_facts, world.name_len + 2)


# ----------------------------------------------------------------------------- matched models


def _backbone(cfg: CapacityConfig, world: WorldConfig, ffn_hidden: int, memory=None) -> ModelConfig:
    return ModelConfig(vocab_size=world.vocab_size, n_layers=cfg.n_layers, d_model=cfg.d_model,
                       n_heads=cfg.n_heads, ffn_hidden=ffn_hidden,
                       max_seq_len=world.name_len + 1, memory=memory)


def _sparse(arch: str, cfg: CapacityConfig, size: int, width: int) -> Any:
    """The sparse layer of `arch` with `size` keys per side (experts for the MoE, `width` wide)."""
    d, kd = cfg.d_model, max(8, cfg.d_model // 2)
    last = (cfg.n_layers - 1,)
    if arch == "moe":
        return MoEConfig(n_experts=size, top_k=8, expert_hidden=width)
    if arch == "ultramem_v2":
        return UltraMemV2Config(n_keys=size, key_dim=kd, top_m=8, value_dim=d // 2,
                                pre_value_dim=d // 2, init_samples=256)
    if arch == "ultramem_v1":
        return UltraMemV1Config(n_keys=size, key_dim=kd, n_heads=2, top_m=8, value_dim=d // 2,
                                virtual_blocks=4, pairs=((0, cfg.n_layers - 1),),
                                init_samples=256)
    if arch == "pkm":
        return PKMConfig(n_keys=size, key_dim=kd, n_heads=2, top_k=8, layers=last)
    if arch == "peer":
        return PEERConfig(n_keys=size, key_dim=kd, n_heads=4, top_k=4, layers=last)
    if arch == "memory_plus":
        return MemoryPlusConfig(n_keys=size, key_dim=kd, n_heads=1, top_k=8, layers=last)
    raise ConfigError(f"archs: unknown architecture {arch!r}; known: {list(CAPACITY_ARCHS)}")


def matched_config(arch: str, multiple: float, cfg: CapacityConfig,
                   world: WorldConfig) -> ModelConfig:
    """`arch` with the dense reference's activated parameters and `multiple` x its total.

    Dense: the FFN widened until the total is `multiple` x the reference's (active = total).
    MoE: top-8 experts an eighth of the reference FFN wide, as many as reach the total (the
    router, d x n_experts, adds to the activated count). Other sparse kinds: for each number of
    keys, the FFN width whose activated count is nearest the reference's; of those, the one
    whose total is nearest the target.
    """
    from ultramem.accounting import count_params

    if arch == "ultramem_v2+both_ends_equal":
        base = matched_config("ultramem_v2", multiple, cfg, world)
        return base.replace(memory=base.memory.both_ends_equal())
    ref = count_params(_backbone(cfg, world, cfg.ffn_hidden))["active"]
    target = multiple * ref

    def nearest(build: Callable[[int], ModelConfig], key: str, goal: float, lo: int, hi: int):
        # count_params grows with the knob: binary search, then the nearer neighbour.
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count_params(build(mid))[key] <= goal else (lo, mid)
        return min((lo, hi), key=lambda k: abs(count_params(build(k))[key] - goal))

    if arch == "dense":
        width = nearest(lambda f: _backbone(cfg, world, f), "total", target, 4, 1 << 16)
        return _backbone(cfg, world, width)
    if arch == "moe":
        # Fine-grained top-8 experts as wide as an eighth of the reference FFN: the active
        # experts equal that FFN, and only the router (d x n_experts, all active) grows.
        width = max(1, cfg.ffn_hidden // 8)
        size = nearest(lambda n: _backbone(cfg, world, cfg.ffn_hidden,
                                           _sparse(arch, cfg, n, width)), "total", target, 8,
                       1 << 16)
        return _backbone(cfg, world, cfg.ffn_hidden, _sparse(arch, cfg, size, width))
    best = None
    for size in range(2, 1024):
        def build(width: int, size: int = size) -> ModelConfig:
            return _backbone(cfg, world, width, _sparse(arch, cfg, size, width))
        try:
            width = nearest(build, "active", ref, 2, 4 * cfg.ffn_hidden)
            m = build(width)
        except ConfigError:
            continue  # too few keys for top_k: try the next size
        c = count_params(m)
        gap = abs(c["total"] - target)
        if best is None or gap < best[0]:
            best = (gap, m)
        elif c["total"] > target:
            break
    _require(best is not None, "multiples", f"no {arch} model reaches {multiple} x the total")
    return best[1]


# ----------------------------------------------------------------------------- runs


@dataclass
class CapacityConfig:
    archs: tuple[str, ...] = CAPACITY_ARCHS
    multiples: tuple[float, ...] = (2.0, 4.0, 8.0)  # sparse totals, x the reference's
    dense_multiples: tuple[float, ...] = (1.0, 2.0, 4.0)  # dense totals (= active)
    world: WorldConfig = field(default_factory=WorldConfig)
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    ffn_hidden: int = 128  # the dense reference; sets the activated parameters of every model
    epochs: int = 60
    batch_size: int = 1024
    lr: float = 1e-2
    # The value tables' learning rate, x lr (TrainConfig.value_lr_scale): memory rows are each
    # read by few tokens, so they train slower than dense weights at the same rate.
    value_lr_scale: float = 1.0
    measure_every: int = 10  # epochs between measurements of the bits stored
    seed: int = 0
    precision: str = "auto"
    out: str = "runs/capacity"
    work: str = "runs/capacity"
    threads: int = 1
    jobs: int = 1
    report_only: bool = False  # report the finished runs of the plan; train nothing
    command: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.world, dict):
            self.world = WorldConfig(**self.world)
        bad = [a for a in self.archs if a not in CAPACITY_ARCHS + CAPACITY_VARIANTS]
        _require(not bad, "archs",
                 f"unknown {bad}; known: {list(CAPACITY_ARCHS + CAPACITY_VARIANTS)}")
        for name in ("d_model", "n_layers", "n_heads", "ffn_hidden", "epochs", "batch_size",
                     "measure_every", "threads", "jobs"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.value_lr_scale > 0, "value_lr_scale", "must be > 0")
        _require(all(m > 1 for m in self.multiples), "multiples",
                 "sparse totals must exceed the activated count (multiples > 1)")
        _require(all(m >= 1 for m in self.dense_multiples), "dense_multiples", "must be >= 1")

    def plan(self) -> list[tuple[str, float]]:
        """(arch, multiple) of every run, dense first."""
        runs = []
        for arch in self.archs:
            mults = self.dense_multiples if arch == "dense" else self.multiples
            runs += [(arch, m) for m in mults]
        return runs

    def settings(self, arch: str | None = None) -> dict[str, Any]:
        """What a finished run of arch must match to be reused. value_lr_scale is left out where
        it is 1 (runs made before the field existed) or where arch has no value tables."""
        keep = ("world", "d_model", "n_layers", "n_heads", "ffn_hidden", "epochs",
                "batch_size", "lr", "value_lr_scale", "measure_every", "seed", "precision")
        out = {k: (asdict(getattr(self, k)) if k == "world" else getattr(self, k)) for k in keep}
        if out["value_lr_scale"] == 1.0 or arch in NO_VALUE_TABLES:
            del out["value_lr_scale"]
        return out


def run_name(arch: str, multiple: float) -> str:
    return f"{arch}_x{multiple:g}"


@dataclass
class FactScores:
    bits: float  # total bits stored
    recalled: int  # facts whose value is the top value token
    loss: float  # mean NLL of the values, nats


def measure(model, facts, world: WorldConfig, batch: int = 8192) -> FactScores:
    """Bits stored and facts recalled over the whole world (no gradients)."""
    import torch

    model.eval()
    bits = torch.zeros((), dtype=torch.float64)
    nll_sum = torch.zeros((), dtype=torch.float64)
    recalled = 0
    lo, hi = world.value_offset, world.vocab_size
    with torch.no_grad():
        for start in range(0, len(facts), batch):
            rows = facts[start:start + batch]
            logits, _ = model(rows[:, :-1])
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
            target = rows[:, -1]
            nll = -logp.gather(1, target[:, None]).squeeze(1).double()
            bits += (world.bits_per_fact - nll / math.log(2)).clamp(min=0).sum()
            nll_sum += nll.sum()
            recalled += int((logp[:, lo:hi].argmax(dim=-1) + lo == target).sum())
    model.train()
    return FactScores(float(bits), recalled, float(nll_sum) / len(facts))


def fact_retrieval(model, facts, n_facts: int = 256) -> dict[str, Any] | None:
    """Pre-selection recall of each UltraMemV2 layer of `model` on every token of the first
    n_facts facts (`ultramem.diagnostics.recall_by_layer`: the share of the exact top-m cells the
    retrieval returns, and the share of them in the (-, -) quadrant), and each layer's output
    RMS over its FFN's (`output_shares`); None for models without UltraMemV2 layers."""
    from ultramem.diagnostics import output_shares, recall_by_layer

    x = facts[:n_facts, :-1]
    stats = recall_by_layer(model, x, max_tokens=x.numel())
    if not stats:
        return None
    recall = [s["preselect_recall"] for s in stats]
    neg = [s["neg_quadrant_share"] for s in stats]
    return {"preselect_recall": sum(recall) / len(recall), "per_layer": recall,
            "neg_quadrant_share": sum(neg) / len(neg), "per_layer_neg": neg,
            "out_over_ffn": output_shares(model, x), "tokens": x.numel()}


def _fill_retrieval(cfg: CapacityConfig, row: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """row with its retrieval measured from the run's kept model when the run predates the
    record (`fact_retrieval`); row unchanged when there is no model to measure."""
    from ultramem.train import checkpoint as ckpt

    if "retrieval" in row or ckpt.latest_checkpoint(run_dir / "checkpoints") is None:
        return row
    retrieval = fact_retrieval(ckpt.load_model(run_dir / "checkpoints"), make_world(cfg.world))
    return row if retrieval is None else {**row, "retrieval": retrieval}


def finished_run(cfg: CapacityConfig, run_dir: Path) -> dict[str, Any] | None:
    """The result row in run_dir if that run finished with cfg's settings, else None."""
    path = run_dir / "result.json"
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("settings") == cfg.settings(done.get("arch")):
            return done
    return None


def train_capacity(cfg: CapacityConfig, arch: str, multiple: float, run_dir: Path,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one model on the fact world for cfg.epochs; returns (and writes) its result row."""
    import torch

    from ultramem import accounting
    from ultramem import precision as precision_mod
    from ultramem.model import LM
    from ultramem.train.config import TrainConfig
    from ultramem.train.optim import build_optimizers, param_groups, set_lrs
    from ultramem.train.sparse import clip_grads

    result_path = run_dir / "result.json"
    done = finished_run(cfg, run_dir)
    if done is not None:
        log(f"[capacity] {run_name(arch, multiple)}: reusing {result_path}")
        return done
    world = cfg.world
    model_cfg = matched_config(arch, multiple, cfg, world)
    counts = accounting.count_params(model_cfg)
    facts = make_world(world)
    steps_per_epoch = math.ceil(len(facts) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    train_cfg = TrainConfig(steps=total_steps, batch_size=cfg.batch_size,
                            seq_len=world.name_len + 1, lr=cfg.lr, warmup=steps_per_epoch,
                            value_lr_scale=cfg.value_lr_scale, weight_decay=0.0,
                            precision=cfg.precision, seed=cfg.seed)
    runtime_cfg = model_cfg
    if hasattr(model_cfg.memory, "sparse_grad"):
        runtime_cfg = model_cfg.replace(memory={"sparse_grad": True})
    torch.manual_seed(cfg.seed)
    model = LM(runtime_cfg, seed=cfg.seed)
    prec = precision_mod.resolve_precision(cfg.precision, "cpu")
    opts = build_optimizers(model, train_cfg)
    groups = param_groups(model)
    dense_params, table_params = groups["decay"] + groups["no_decay"], groups["values"]
    order = torch.Generator().manual_seed(cfg.seed + 1)
    x_all, v_all = facts[:, :-1], facts[:, -1]
    name = run_name(arch, multiple)
    log(f"[capacity] {name}: total {counts['total']:,} active {counts['active']:,} params, "
        f"{len(facts):,} facts x {cfg.epochs} epochs ({total_steps:,} steps, {prec})")
    progress = {"model": runtime_cfg.to_dict(), "capacity": {"arch": arch, "multiple": multiple,
                                                             "settings": cfg.settings(arch)}}
    ckpt_root = run_dir / "checkpoints"
    done_epochs, step, curve, wall_before, cpu_before = _resume(ckpt_root, progress, model, opts,
                                                                order)
    if done_epochs:
        log(f"[capacity] {name}: resuming from epoch {done_epochs} ({ckpt_root})")
    t0, cpu0 = time.perf_counter() - wall_before, time.process_time() - cpu_before
    for epoch in range(done_epochs + 1, cfg.epochs + 1):
        perm = torch.randperm(len(facts), generator=order)
        loss_sum = 0.0
        for start in range(0, len(facts), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            x = x_all[idx]
            y = torch.full_like(x, -100)
            y[:, -1] = v_all[idx]
            set_lrs(opts, train_cfg, step, model.cfg.memory)
            with precision_mod.autocast(prec, "cpu"):
                _, loss = model(x, y)
            loss.backward()
            clip_grads(dense_params, train_cfg.grad_clip)
            clip_grads(table_params, train_cfg.value_grad_clip)
            for opt in opts.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach())
            step += 1
        if epoch % cfg.measure_every == 0 or epoch == cfg.epochs:
            s = measure(model, facts, world)
            curve.append({"epoch": epoch, "bits": s.bits, "recalled": s.recalled,
                          "value_loss": s.loss, "train_loss": loss_sum / steps_per_epoch,
                          "seconds": time.perf_counter() - t0})
            log(f"[capacity] {name} epoch {epoch}: {s.bits / 1000:.1f} kbit, "
                f"{s.recalled / len(facts):.1%} recalled, {time.perf_counter() - t0:.0f}s")
            if epoch < cfg.epochs:  # a run killed later resumes here (the end writes result.json)
                _save_progress(ckpt_root, epoch, step, curve, progress, model, opts, order,
                               time.perf_counter() - t0, time.process_time() - cpu0)
    if not math.isfinite(curve[-1]["value_loss"]):
        raise RuntimeError(f"{name}: training diverged (value loss {curve[-1]['value_loss']})")
    final = curve[-1]
    row = {"name": name, "arch": arch, "multiple": multiple, "settings": cfg.settings(arch),
           "model": model_cfg.to_dict(), "total_params": counts["total"],
           "active_params": counts["active"], "n_facts": len(facts),
           "world_bits": len(facts) * world.bits_per_fact, "bits": final["bits"],
           "recalled": final["recalled"], "bits_per_total": final["bits"] / counts["total"],
           "bits_per_active": final["bits"] / counts["active"], "curve": curve,
           "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
           "threads": torch.get_num_threads(), "jobs": cfg.jobs, "precision": prec}
    retrieval = fact_retrieval(model, facts)
    if retrieval is not None:
        row["retrieval"] = retrieval
    from ultramem.files import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result_path, json.dumps(row, indent=1))
    # The trained model stays (`ultramem diagnose --checkpoint <run dir>` reads it), in place of
    # the last mid-run checkpoint.
    _save_progress(ckpt_root, cfg.epochs, step, curve, progress, model, opts, order,
                   row["wall_seconds"], row["cpu_seconds"])
    return row


def _save_progress(root: Path, epoch: int, step: int, curve: list[dict[str, Any]],
                   progress: dict[str, Any], model, opts: dict, order, wall: float,
                   cpu: float) -> None:
    """A checkpoint after `epoch` (an ordinary ultramem checkpoint: `load_model` reads it) with
    everything the rest of the run depends on: optimizer states, the fact order's generator,
    the curve so far and the time spent."""
    import torch

    from ultramem.train import checkpoint as ckpt

    ckpt.save_checkpoint(root, epoch, model=model, config=progress,
                         optimizer_state={k: o.state_dict() for k, o in opts.items()},
                         trainer_state={"epoch": epoch, "optimizer_steps": step, "curve": curve,
                                        "wall_seconds": wall, "cpu_seconds": cpu},
                         rng_state={"order": order.get_state(), "torch": torch.get_rng_state()},
                         keep_last=1)


def _resume(root: Path, progress: dict[str, Any], model, opts: dict, order,
            ) -> tuple[int, int, list[dict[str, Any]], float, float]:
    """(epochs done, optimizer steps, curve, wall s, CPU s) from the newest good checkpoint under
    root written by a run with these settings, its state loaded into model, opts and order;
    (0, 0, [], 0, 0) when there is none. Checkpoints of other settings are removed, so they
    never mix with this run's."""
    import torch
    from safetensors.torch import load_model

    from ultramem.train import checkpoint as ckpt

    found, _ = ckpt.latest_good_checkpoint(root)
    if found is None or ckpt.read_config(found).get("capacity") != progress["capacity"]:
        shutil.rmtree(root, ignore_errors=True)
        return 0, 0, [], 0.0, 0.0
    load_model(model, str(found / "model.safetensors"), strict=True)
    state = ckpt.load_training_state(found)
    for k, o in opts.items():
        o.load_state_dict(state["optimizer"][k])
    order.set_state(state["rng"]["order"])
    torch.set_rng_state(state["rng"]["torch"])
    t = state["trainer"]
    return t["epoch"], t["optimizer_steps"], t["curve"], t["wall_seconds"], t["cpu_seconds"]


def _run_one(cfg: CapacityConfig, arch: str, multiple: float, run_dir: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg.threads)
    return train_capacity(cfg, arch, multiple, run_dir, lambda m: print(m, flush=True))


def run_capacity(cfg: CapacityConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every run of cfg.plan() (cfg.jobs at a time), then the report in cfg.out."""
    import torch

    from ultramem.eval.study import git_commit, in_processes

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    commit = git_commit()
    work = Path(cfg.work)
    plan = cfg.plan()
    for arch, m in plan:  # size every model before training any: a bad size fails at once
        matched_config(arch, m, cfg, cfg.world)
    missing = []
    if cfg.report_only:
        missing = [run_name(a, m) for a, m in plan
                   if finished_run(cfg, work / run_name(a, m)) is None]
        plan = [(a, m) for a, m in plan if run_name(a, m) not in missing]
        log(f"[capacity] reporting {len(plan)} finished runs; not run yet: "
            f"{', '.join(missing) or 'none'}")
    if cfg.report_only:  # load, train nothing
        rows = [_fill_retrieval(cfg, train_capacity(cfg, a, m, work / run_name(a, m), log),
                                work / run_name(a, m)) for a, m in plan]
    elif cfg.jobs == 1 or len(plan) <= 1:
        rows = [train_capacity(cfg, a, m, work / run_name(a, m), log) for a, m in plan]
    else:
        log(f"[capacity] {len(plan)} runs, {cfg.jobs} at a time, {cfg.threads} thread(s) each")
        rows = in_processes(_run_one, [(cfg, a, m, work / run_name(a, m)) for a, m in plan],
                            cfg.jobs)
    result = {"config": {**asdict(cfg), "archs": list(cfg.archs)}, "commit": commit,
              "python": sys.version.split()[0], "torch": torch.__version__,
              "wall_seconds": time.perf_counter() - t0, "runs": rows, "not_run": missing}
    from ultramem.eval.capacity_report import write_capacity_report

    paths = write_capacity_report(result, Path(cfg.out))
    result["files"] = [str(p) for p in paths]
    log(f"[capacity] wrote {', '.join(map(str, paths))} in {result['wall_seconds']:.0f}s")
    return result


__all__ = ["CAPACITY_ARCHS", "CAPACITY_VARIANTS", "CapacityConfig", "FactScores", "WorldConfig",
           "make_world", "matched_config", "measure", "run_capacity", "run_name",
           "train_capacity"]
