"""The small-scale reproduction: every architecture of a matched preset family trained on the same
data, steps and seed, then evaluated on held-out text and every task; plus UltraMemV2 ablations.

`run_study(StudyConfig(family="tiny", steps=5, out=...))` writes into `out`:
  <family>.md, <family>.json    tables per metric, the exact command, commit, wall time
  <family>_loss.png, <family>_tasks.png   loss curves, per-task accuracy bars
and keeps each run (checkpoint, metrics, eval.json) under `work/<family>/<name>/`; a run whose
eval.json matches the study settings is reused, and a run killed part way (its study.json matches
the settings) resumes from its last checkpoint (every quarter of the steps), so an interrupted
study continues where it stopped. `report_only` writes the report of the runs finished so far
(named as a partial report, with the unfinished ones listed) and trains nothing.

Seeds: `seeds=k` repeats the runs named in `seeded` (None: every run) with training seeds
seed+1 .. seed+k-1, as runs `<name>@seed<s>`. The data mix and the evaluation examples stay those
of `seed`, so the spread between repeats is the training run's own noise (init and batch order).

Data: one mix for the family, a seeded shuffle of documents: standard-library docstrings (the
held-out modules excluded), training documents of every task generator, and the fact-world text
(copies so it is ~15% of the mix). 'tiny' uses byte tokens (vocabulary 256, as its presets); 'small'
a BPE of the presets' 4096 tokens trained on the mix.

With `corpus` (e.g. "english", `ultramem.data.corpus`), the mix is that corpus's training split
plus copies of the task mix above (each copy with fresh task documents of the same fact world)
making up `task_share` of its characters; held-out loss is measured on the corpus's held-out
split, which no run trains on. Such a study lives in `work/<family>-<corpus>/` and writes
`<family>-<corpus>.md`, apart from the built-in one. Long runs checkpoint every 5% of their steps.

Across machines (`archive`, e.g. a folder committed with the results): a run that finishes copies
its record (eval.json, study.json, metrics.jsonl: what the report reads, no checkpoint) to
`archive/<run>/`, and the prepared data's meta to `archive/data.json`; a study started with the
same archive on another machine restores the records whose settings match into its work folder
and trains only the rest, and `report_only` reports from the archive alone. So a study longer
than one machine's lifetime advances by whole runs.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ultramem.config import ARCHS, FAMILIES, ModelConfig
from ultramem.eval.study_plan import ABLATIONS, PAPER_TABLE2, base_name, run_dir
from ultramem.tasks import LONG_CONTEXT, TASKS, build_tasks

LEGACY_EPS = 1e-8  # Adam's eps of every study before it was a setting (not in their settings)

FAMILY_DATA = {  # family -> (task size, tokenizer, train documents per task)
    "tiny": ("tiny", "bytes", 400),
    "small": ("small", "bpe", 1000),
    "mini": ("small", "bpe", 1000),  # small's vocabulary and tasks, a quarter of its compute
}


@dataclass
class StudyConfig:
    family: str = "tiny"
    steps: int = 300
    archs: tuple[str, ...] = ARCHS
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    out: str = "runs/study"
    work: str = "runs/study"
    seed: int = 0
    seeds: int = 1  # training seeds per run in `seeded` (see the module doc)
    seeded: tuple[str, ...] | None = None  # run names repeated over seeds; None: all
    batch_size: int = 16
    seq_len: int | None = None  # None: the family's max_seq_len
    lr: float = 3e-3
    # Adam's eps, and the warmup steps (None: min(20, steps // 10), what studies used before
    # warmup was a setting). The defaults of earlier studies were eps 1e-8 and that warmup.
    eps: float = LEGACY_EPS
    warmup: int | None = None
    n_examples: int = 100  # eval examples per task
    text_chars: int | None = None  # held-out text cut to this many characters (None: all)
    task_size: str | None = None  # None: FAMILY_DATA; 'ci' for tests
    train_docs: int | None = None  # per task; None: FAMILY_DATA
    threads: int | None = None
    jobs: int = 1  # runs trained at the same time, each in its own process with `threads`
    corpus: str | None = None  # a named corpus (see the module doc); None: the built-in mix
    corpus_root: str = "data/corpus"  # where the corpus's packages and export live
    task_share: float = 0.1  # with a corpus: the task documents' share of the mix's characters
    report_only: bool = False  # report the plan's finished runs (and name the others); train none
    archive: str | None = None  # finished runs' records, kept across machines (module doc)
    command: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILY_DATA:
            raise ValueError(f"family must be one of {sorted(FAMILY_DATA)}, got {self.family!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} has no presets")
        bad = [a for a in self.archs if a not in ARCHS]
        if bad:
            raise ValueError(f"archs: unknown {bad}; known: {list(ARCHS)}")
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ValueError(f"ablations: unknown {bad}; known: {list(ABLATIONS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must lie in [0, steps={self.steps}], got {self.warmup}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if not 0 < self.task_share < 1:
            raise ValueError(f"task_share must lie in (0, 1), got {self.task_share}")
        if self.corpus is not None:
            from ultramem.data.corpus import corpus

            corpus(self.corpus)  # an unknown name fails here
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.seeded is not None:
            known = list(self.archs) + [f"ultramem_v2+{a}" for a in self.ablations]
            bad = [n for n in self.seeded if n not in known]
            if bad:
                raise ValueError(f"seeded: {bad} are not runs of this study; runs: {known}")

    @property
    def warmup_steps(self) -> int:
        return min(20, max(self.steps // 10, 1)) if self.warmup is None else self.warmup

    @property
    def size(self) -> str:
        return self.task_size or FAMILY_DATA[self.family][0]

    @property
    def name(self) -> str:
        """The study's name: its work folder and report files ('small', 'small-english')."""
        return self.family if self.corpus is None else f"{self.family}-{self.corpus}"


def run_configs(cfg: StudyConfig) -> dict[str, ModelConfig]:
    """name -> model config of every run: the archs, then `ultramem_v2+<ablation>`."""
    runs = {arch: ModelConfig.preset(f"{cfg.family}/{arch}") for arch in cfg.archs}
    base = ModelConfig.preset(f"{cfg.family}/ultramem_v2")
    for name in cfg.ablations:
        if name == "plain_values":
            change: dict[str, Any] = {"pre_value_dim": 0}
        elif name == "fixed_init":
            change = {"value_init": "fixed"}
        elif name == "shared_query":
            change = {"shared_rank_query": True}
        elif name == "half_layers":
            change = {"layers": tuple(range(1, base.n_layers, 2))}
        elif name == "both_ends":
            change = {"preselect": "both_ends"}
        else:  # both_ends_equal: 2 (kr / sqrt 2)^2 ~ kr^2 candidates
            change = base.memory.both_ends_equal()
        runs[f"ultramem_v2+{name}"] = base.replace(memory=change)
    return runs


def run_plan(cfg: StudyConfig) -> list[tuple[str, ModelConfig, int]]:
    """(name, model config, training seed) of every run, the repeats over seeds last."""
    runs = run_configs(cfg)
    plan = [(name, model_cfg, cfg.seed) for name, model_cfg in runs.items()]
    for k in range(1, cfg.seeds):
        plan += [(f"{name}@seed{cfg.seed + k}", model_cfg, cfg.seed + k)
                 for name, model_cfg in runs.items() if cfg.seeded is None or name in cfg.seeded]
    return plan


# ------------------------------------------------------------------------------ data


def task_mix(cfg: StudyConfig, seed: int) -> list[str]:
    """Docstrings, every task's training documents (drawn with `seed`) and the fact-world text
    (~15% of the mix; its facts are the same for every seed)."""
    from ultramem.tasks.text import stdlib_documents

    per_task = cfg.train_docs or FAMILY_DATA[cfg.family][2]
    tasks = build_tasks(cfg.size)
    docs = list(stdlib_documents("train"))
    for name, task in tasks.items():
        if name != "facts":
            docs += task.train_documents(per_task, seed=seed)
    other = sum(len(d) for d in docs)
    facts = tasks["facts"]
    one = len(facts.train_documents(1, seed=cfg.seed)[0])
    copies = max(2, math.ceil(0.15 * other / 0.85 / one))
    return docs + facts.train_documents(copies, seed=seed)


def build_data(cfg: StudyConfig, data_dir: Path, log=print) -> dict[str, Any]:
    """The study's training mix, prepared into data_dir once (`ultramem.data.prepare`)."""
    from ultramem.data.prepare import prepare
    from ultramem.data.shards import read_meta

    if (data_dir / "meta.json").is_file():
        return read_meta(data_dir)
    docs = task_mix(cfg, cfg.seed)
    sources = []
    if cfg.corpus is not None:
        from ultramem.data.corpus import export_splits

        sources.append(str(export_splits(cfg.corpus, cfg.corpus_root, log=log)))
        corpus_chars = _jsonl_chars(Path(sources[0]))
        copy_chars = sum(len(d) for d in docs)
        copies = max(1, round(cfg.task_share * corpus_chars / (1 - cfg.task_share) / copy_chars))
        for k in range(1, copies):  # fresh task documents per copy, the same facts
            docs += task_mix(cfg, cfg.seed + 1000 * k)
        log(f"[study] data: corpus {cfg.corpus} ({corpus_chars:,} chars) + {copies} copies of "
            f"the task mix ({sum(len(d) for d in docs):,} chars)")
    random.Random(cfg.seed).shuffle(docs)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    mix = data_dir.parent / f"{data_dir.name}_mix.jsonl"  # beside: prepare replaces data_dir
    mix.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    vocab = ModelConfig.preset(f"{cfg.family}/dense").vocab_size
    return prepare([*sources, str(mix)], data_dir, tokenizer=FAMILY_DATA[cfg.family][1],
                   vocab_size=vocab, val_fraction=0.05 if cfg.corpus is None else 0.005,
                   seed=cfg.seed)


def _jsonl_chars(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(len(json.loads(line)["text"]) for line in f if line.strip())


def heldout_text(cfg: StudyConfig) -> str | None:
    """The corpus's held-out split as text (None: the evaluation's default docstrings)."""
    if cfg.corpus is None:
        return None
    path = Path(cfg.corpus_root) / "export" / cfg.corpus / "heldout.txt"
    return path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ runs


def _settings(cfg: StudyConfig, seed: int | None = None) -> dict[str, Any]:
    keep = ("family", "steps", "seed", "batch_size", "seq_len", "lr", "n_examples",
            "text_chars", "task_size", "train_docs")
    out = {k: getattr(cfg, k) for k in keep}
    if cfg.corpus is not None:  # (absent otherwise: runs of earlier studies stay reusable)
        out.update(corpus=cfg.corpus, task_share=cfg.task_share)
    if cfg.eps != LEGACY_EPS:  # likewise
        out.update(eps=cfg.eps)
    if cfg.warmup is not None:
        out.update(warmup=cfg.warmup)
    if seed is not None and seed != cfg.seed:  # a repeat: its training seed, the data's seed
        out.update(seed=seed, data_seed=cfg.seed)
    return out


def finished_row(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The run's eval.json row if it finished with these settings, else None."""
    done = run_dir / "eval.json"
    if done.is_file():
        row = json.loads(done.read_text())
        if row.get("settings") == settings:
            return row
    return None


def logged_train_seconds(rows: list[dict[str, Any]], tokens_per_step: int) -> float:
    """A run's training wall time over all its processes (a run resumed across sessions), from
    its metrics log: each logged tokens_per_s covers the steps since the previous one, its
    evaluations and checkpoint writes included; building the model at each start is not."""
    total, prev = 0.0, 0
    for r in rows:
        if r.get("tokens_per_s"):
            total += (r["step"] - prev) * tokens_per_step / r["tokens_per_s"]
            prev = r["step"]
    return total


# ------------------------------------------------------------------------------ archive

# What the report needs of a finished run, in the order it is copied: eval.json (the row, which
# marks the run finished) last, so that a copy cut short is never taken for a finished run.
ARCHIVED = ("study.json", "metrics.jsonl", "eval.json")


def _copy_record(src: Path, dst: Path) -> None:
    from ultramem.files import atomic_write_text

    dst.mkdir(parents=True, exist_ok=True)
    for f in ARCHIVED:
        if (src / f).is_file():
            atomic_write_text(dst / f, (src / f).read_text())


def archive_run(archive: Path, run: Path, settings: dict[str, Any]) -> bool:
    """Copy finished run `run`'s record to archive/<its name>/ unless the archive holds it with
    these settings already; True when copied."""
    dst = archive / run.name
    if finished_row(dst, settings) is not None:
        return False
    _copy_record(run, dst)
    return True


def restore_archived(cfg: StudyConfig, plan: list[tuple[str, ModelConfig, int]], work: Path,
                     log=print) -> list[str]:
    """Copy into work every run of plan that cfg.archive holds finished with its settings and
    work does not (a part-trained run of the same settings there is replaced: the archived one
    got further); returns their names."""
    import shutil

    restored = []
    for name, _, seed in plan:
        settings = _settings(cfg, seed)
        src, dst = run_dir(Path(cfg.archive), name), run_dir(work, name)
        if finished_row(dst, settings) is not None or finished_row(src, settings) is None:
            continue
        if dst.exists():
            shutil.rmtree(dst)
        _copy_record(src, dst)
        restored.append(name)
    if restored:
        log(f"[study] restored {len(restored)} finished run(s) from {cfg.archive}: "
            + ", ".join(restored))
    return restored


def _data_fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """What two machines' prepared data must share for their runs to be one study's."""
    return {"tokenizer": meta["tokenizer"]["kind"], "vocab_size": meta["vocab_size"],
            "n_documents": meta["n_documents"],
            **{f"{k}_tokens": v["n_tokens"] for k, v in sorted(meta["splits"].items())}}


def archive_data_meta(cfg: StudyConfig, meta: dict[str, Any], log=print) -> None:
    """Keep the prepared data's meta in the archive (once); if the archive has one already and
    this machine's data differs from it (a Debian point release can change a corpus package),
    say so: the archived runs trained on the archived data."""
    from ultramem.files import atomic_write_text

    path = Path(cfg.archive) / "data.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(meta, indent=2))
        return
    old, new = _data_fingerprint(json.loads(path.read_text())), _data_fingerprint(meta)
    if old != new:
        diff = ", ".join(f"{k} {old.get(k)} there, {new.get(k)} here" for k in new
                         if old.get(k) != new.get(k))
        log(f"[study] WARNING: the data prepared here differs from {path} ({diff}); the runs "
            "in the archive trained on that data, the runs trained here on this")


def archive_ignored_by_git(archive: str | Path) -> bool:
    """True when `archive` lies in a git work tree that ignores it: its records would never be
    committed, and a fresh machine would have nothing to restore. False outside git."""
    folder = Path(archive).resolve()
    probe = folder / "data.json"
    while not folder.is_dir():  # the archive may not exist yet: ask from its nearest parent
        folder = folder.parent
    out = _git("check-ignore", "-q", str(probe), cwd=folder)
    return out is not None and out.returncode == 0


# A study run also checkpoints this often (besides every 5% of its steps): a session's end or a
# kill loses at most this much of each run. Not a setting: it changes no result.
CKPT_MINUTES = 10.0


def train_and_eval(cfg: StudyConfig, name: str, model_cfg: ModelConfig, data_dir: Path,
                   run_dir: Path, log=print, seed: int | None = None) -> dict[str, Any]:
    """Train one run (or reuse a finished one) and evaluate it; returns its row.

    seed: the training seed (None: cfg.seed); data and evaluation examples always use cfg.seed.
    """
    seed = cfg.seed if seed is None else seed
    settings = _settings(cfg, seed)
    import torch

    from ultramem.eval.run import evaluate_checkpoint
    from ultramem.train import checkpoint as ckpt
    from ultramem.train.config import TrainConfig
    from ultramem.train.metrics import read_metrics
    from ultramem.train.trainer import Trainer

    done = run_dir / "eval.json"
    row = finished_row(run_dir, settings)
    if row is not None:
        log(f"[study] {name}: reusing {done}")
        if cfg.archive and archive_run(Path(cfg.archive), run_dir, settings):
            log(f"[study] {name}: archived in {cfg.archive}")
        return row
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    train_cfg = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, seq_len=seq_len, lr=cfg.lr, eps=cfg.eps,
        warmup=cfg.warmup_steps, eval_every=max(cfg.steps // 4, 1),
        eval_batches=4, log_every=max(1, min(10, cfg.steps // 20)),
        ckpt_every=max(cfg.steps // (4 if cfg.corpus is None else 20), 1), keep_last=1,
        ckpt_minutes=CKPT_MINUTES, seed=seed, tensorboard=False, plot=False,
    )
    marker = run_dir / "study.json"
    resume = (marker.is_file() and json.loads(marker.read_text()).get("settings") == settings
              and ckpt.latest_checkpoint(run_dir / "checkpoints") is not None)
    if run_dir.exists() and not resume:  # a stale run, or one killed before its first checkpoint
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"name": name, "settings": settings}, indent=2))
    t0 = time.perf_counter()
    # a progress bar only where one process trains at a time and a person watches
    bar = cfg.jobs == 1 and sys.stderr.isatty()
    trainer = Trainer(model_cfg, train_cfg, run_dir, data_dir, show_progress=bar, resume=resume,
                      extra_config={"preset": f"{cfg.family}/{name}"})
    start = trainer.start_step
    log(f"[study] {name}: " + (f"resuming from step {start}" if resume else "training")
        + f" to step {cfg.steps} (seed {seed}) in {run_dir}")
    trainer.fit()
    train_s = time.perf_counter() - t0
    del trainer
    # Losses from the log, which a resumed run continues exactly (a run resumed at its last step
    # trains no step in this process, so its summary alone would have none).
    logged = read_metrics(run_dir)
    final_loss = next((r["loss"] for r in reversed(logged)
                       if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])),
                      float("nan"))
    val_loss = next((r["eval_loss"] for r in reversed(logged) if "eval_loss" in r), None)
    per_step = train_s / max(cfg.steps - start, 1)  # timed over the steps this process ran
    logged_s = logged_train_seconds(logged, cfg.batch_size * seq_len)
    log(f"[study] {name}: steps {start}..{cfg.steps} in {train_s:.0f}s "
        f"({per_step:.2f} s/step), loss {final_loss:.3f}")
    result = evaluate_checkpoint(run_dir, size=cfg.size, n_examples=cfg.n_examples,
                                 seed=cfg.seed + 1, text=heldout_text(cfg),
                                 text_chars=cfg.text_chars)
    row = {"name": name, "settings": settings, "commit": git_commit(),
           "threads": torch.get_num_threads(), "jobs": cfg.jobs, "train_seconds": train_s,
           "train_seconds_logged": logged_s,
           "seconds_per_step": per_step, "resumed_from_step": start,
           "final_loss": final_loss, "val_loss": val_loss, **result}
    done.write_text(json.dumps(row, indent=2))
    log(f"[study] {name}: held-out bpb {result['text']['bits_per_byte']:.3f}, eval "
        f"{result['seconds']:.0f}s")
    if cfg.archive:
        archive_run(Path(cfg.archive), run_dir, settings)
        log(f"[study] {name}: archived in {cfg.archive}")
    return row


def _run_one(cfg: StudyConfig, name: str, model_cfg: ModelConfig, data_dir: Path, work: Path,
             seed: int) -> dict[str, Any]:
    """One run in a worker process (`jobs` > 1), with the study's thread count."""
    import torch

    torch.set_num_threads(cfg.threads or 1)
    return train_and_eval(cfg, name, model_cfg, data_dir, run_dir(work, name),
                          lambda msg: print(msg, flush=True), seed=seed)


def _run_parallel(cfg: StudyConfig, plan: list[tuple[str, ModelConfig, int]], data_dir: Path,
                  work: Path, log) -> list[dict[str, Any]]:
    """Train the runs of plan `cfg.jobs` at a time in worker processes; rows in plan order.
    Each run is independent (its own directory, seed and resume state), so the rows equal
    those of a sequential study; only the wall time (and each run's s/step) differ."""
    log(f"[study] {len(plan)} runs, {cfg.jobs} at a time, {cfg.threads or 1} thread(s) each")
    return in_processes(_run_one, [(cfg, name, model_cfg, data_dir, work, seed)
                                   for name, model_cfg, seed in plan], cfg.jobs)


def in_processes(fn, calls: list[tuple], jobs: int) -> list[Any]:
    """[fn(*args) for args in calls], `jobs` at a time in spawned worker processes (fresh
    interpreters: no inherited torch threads or state); results in the order of calls."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        return [f.result() for f in futures]


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess | None:
    """`git args...` in `cwd`, or None where git cannot run there."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    here = Path(__file__).parent
    out = _git("rev-parse", "--short", "HEAD", cwd=here)
    dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=here)
    if out is None or dirty is None or out.returncode != 0:
        return "?"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _finished(cfg: StudyConfig, plan: list[tuple[str, ModelConfig, int]],
              work: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """(data meta, rows of the plan's runs whose eval.json matches cfg, names of the others);
    for `report_only`, which trains and prepares nothing."""
    from ultramem.data.shards import read_meta
    from ultramem.train.metrics import read_metrics

    data_dir = work / "data"
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file() and cfg.archive:
        meta_file = Path(cfg.archive) / "data.json"
    if not meta_file.is_file():
        raise ValueError(f"report_only: no prepared data in {data_dir}: nothing has run there")
    rows, missing = [], []
    for name, model_cfg, seed in plan:
        row = finished_row(run_dir(work, name), _settings(cfg, seed))
        if row is None:
            missing.append(name)
            continue
        if "train_seconds_logged" not in row:  # written by code older than the field
            seq_len = cfg.seq_len or model_cfg.max_seq_len
            row["train_seconds_logged"] = logged_train_seconds(
                read_metrics(run_dir(work, name)), cfg.batch_size * seq_len)
        rows.append(row)
    if not rows:
        raise ValueError(f"report_only: none of the {len(plan)} runs has finished in {work} "
                         f"({', '.join(missing)})")
    meta = (read_meta(data_dir) if meta_file.parent == data_dir
            else json.loads(meta_file.read_text()))
    return meta, rows, missing


def run_study(cfg: StudyConfig, log=print) -> dict[str, Any]:
    """Train and evaluate every run of cfg; write the report and plots; return the results."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    commit = git_commit()  # the code the runs start from (not what HEAD is when they end)
    work = Path(cfg.work) / cfg.name
    data_dir = work / "data"
    plan = run_plan(cfg)
    not_run: list[str] = []
    if cfg.archive:
        if archive_ignored_by_git(cfg.archive):
            log(f"[study] WARNING: git ignores the archive {cfg.archive}: its records will not be "
                "committed with the repository (see .gitignore)")
        restore_archived(cfg, plan, work, log)
    if cfg.report_only:
        meta, rows, not_run = _finished(cfg, plan, work)
        log(f"[study] report only: {len(rows)} finished run(s) of {len(plan)}"
            + (f"; not finished: {', '.join(not_run)}" if not_run else ""))
    else:
        meta = build_data(cfg, data_dir, log)
        if cfg.archive:
            archive_data_meta(cfg, meta, log)
        log(f"[study] data: {meta['splits']['train']['n_tokens']:,} train tokens "
            f"({meta['tokenizer']['kind']}) in {data_dir}")
        if cfg.jobs == 1 or len(plan) == 1:
            rows = [train_and_eval(cfg, name, model_cfg, data_dir, run_dir(work, name), log,
                                   seed=seed) for name, model_cfg, seed in plan]
        else:
            rows = _run_parallel(cfg, plan, data_dir, work, log)
    study = {"name": cfg.name, "config": {**asdict(cfg), "archs": list(cfg.archs),
                        "ablations": list(cfg.ablations),
                        "seeded": None if cfg.seeded is None else list(cfg.seeded)},
             "commit": commit, "python": sys.version.split()[0],
             "torch": torch.__version__, "threads": torch.get_num_threads(),
             "wall_seconds": time.perf_counter() - t0, "data": {
                 "train_tokens": meta["splits"]["train"]["n_tokens"],
                 "tokenizer": meta["tokenizer"]["kind"], "vocab_size": meta["vocab_size"]},
             "runs": rows, "not_run": not_run}
    from ultramem.eval.report import write_report

    paths = write_report(study, Path(cfg.out), work)
    study["files"] = [str(p) for p in paths]
    log(f"[study] wrote {', '.join(map(str, paths))} in {study['wall_seconds']:.0f}s")
    return study


__all__ = ["ABLATIONS", "PAPER_TABLE2", "StudyConfig", "base_name", "run_configs", "run_dir",
           "run_plan", "run_study", "TASKS", "LONG_CONTEXT"]
