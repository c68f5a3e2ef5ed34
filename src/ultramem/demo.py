"""`ultramem demo`: train the `tiny` UltraMemV2 model on built-in data and show what it learned.

The data: a generated world of facts (people, their cities, jobs and pets, each stated in several
phrasings) and English prose that ships with Python (standard-library docstrings),
byte-tokenized. Training is the project's own `Trainer` (the same loop, schedule, fast path and
checkpoints as `ultramem train`), so the demo's run directory is an ordinary run: `ultramem eval`,
`generate` and `train --resume` work on it.

Validation is unseen prose: every 20th docstring goes to the validation split (`ultramem.data.
prepare`'s rule); the fact documents come first, so every fact is trained on, and the fact test
asks each fact in a prompt. The demo evaluates every `eval_every` steps, keeps those checkpoints,
and reports the one with the lowest validation loss: a tiny model on 0.2 MB of text starts to
memorize it after a few epochs, and a newcomer should see the model at its best, with the whole
validation curve printed so the turn is visible rather than hidden.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ultramem.config import ModelConfig
from ultramem.data.builtin import byte_decode, byte_encode, fact_prompts, fact_text, fact_world

MARKER = "demo.json"  # written into the demo's directory: a later demo may replace it
# (torch is imported inside the functions: `ultramem --help` reads DemoConfig's defaults)


@dataclass(frozen=True)
class DemoConfig:
    preset: str = "tiny"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    n_people: int = 48
    fact_repeats: int = 16  # passes over the facts (fresh phrasings) per epoch of the data
    eval_every: int = 50
    seed: int = 0
    out: str = "runs/demo"

    def __post_init__(self) -> None:
        # fact documents come first and must all precede the first validation document (the
        # 20th: `prepare`'s every-20th rule), so every fact is trained on
        if not 1 <= self.fact_repeats <= 18:
            raise ValueError(f"fact_repeats must lie in 1..18, got {self.fact_repeats}")


def fact_recall(model: Any, prompts: list[tuple[str, str]]) -> float:
    """Fraction of prompts whose greedy continuation is exactly the gold answer."""
    import torch

    hits = 0
    for prompt, answer in prompts:
        idx = torch.tensor([byte_encode(prompt)])
        n_new = len(answer.encode())
        with torch.no_grad():
            out = model.generate(idx, n_new, temperature=0)[0, idx.shape[1]:]
        hits += byte_decode(out.tolist()) == answer
    return hits / len(prompts)


def _out_dir(path: Path) -> Path:
    """The demo's directory, emptied: only a directory a previous demo wrote is replaced."""
    if path.exists():
        if not (path / MARKER).is_file() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{path}: exists and was not written by `ultramem demo`; "
                             "choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def build_data(cfg: DemoConfig, out: Path) -> tuple[Path, list]:
    """The byte-tokenized training mix in out/data; returns it and the fact world."""
    from ultramem.data.prepare import prepare
    from ultramem.tasks.text import stdlib_documents

    facts = fact_world(cfg.n_people, seed=cfg.seed)
    # one document per pass over the facts, each in fresh phrasings and order
    fact_docs = [fact_text(facts, repeats=1, seed=cfg.seed + k) for k in range(cfg.fact_repeats)]
    mix = out / "mix.jsonl"
    mix.write_text("".join(json.dumps({"text": d}) + "\n"
                           for d in fact_docs + stdlib_documents("train")))
    data = out / "data"
    prepare([str(mix)], data, tokenizer="bytes", val_fraction=0.05, seed=cfg.seed)
    return data, facts


def run_demo(cfg: DemoConfig = DemoConfig(), show: bool = True) -> dict[str, Any]:
    """Train, evaluate and sample; returns the numbers it prints."""
    import torch

    from ultramem.data.shards import read_meta
    from ultramem.train.checkpoint import list_checkpoints, load_model
    from ultramem.train.config import TrainConfig
    from ultramem.train.metrics import read_metrics
    from ultramem.train.trainer import Trainer

    say = print if show else (lambda *a, **k: None)
    out = _out_dir(Path(cfg.out))
    (out / MARKER).write_text(json.dumps(cfg.__dict__, indent=2))
    data, facts = build_data(cfg, out)
    model_cfg = ModelConfig.preset(cfg.preset, max_seq_len=cfg.seq_len)
    n_evals = math.ceil(cfg.steps / cfg.eval_every)
    train_cfg = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
        warmup=min(cfg.warmup, max(cfg.steps // 10, 1)), eval_every=cfg.eval_every,
        ckpt_every=cfg.eval_every, keep_last=n_evals + 1, log_every=10, seed=cfg.seed,
        tensorboard=False, plot=False)
    trainer = Trainer(model_cfg, train_cfg, out / "run", data, show_progress=show)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_train = read_meta(data)["splits"]["train"]["n_tokens"]
    say(f"ultramem demo: {cfg.preset} UltraMemV2 model, {n_params / 1e6:.2f}M parameters, "
        f"{len(trainer.model.memory_layers())} memory layers, {trainer.precision} fast path; "
        f"{len(facts)} facts about {cfg.n_people} people + Python's docstrings"
        f" ({n_train:,} training bytes); run in {out / 'run'}")
    start = time.time()
    summary = trainer.fit()
    seconds = time.time() - start
    del trainer

    rows = read_metrics(out / "run")
    curve = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    best_step, best_loss = min(curve, key=lambda c: c[1])
    ckpt = next(p for p in list_checkpoints(out / "run" / "checkpoints")
                if p.name.endswith(f"{best_step:08d}"))
    model = load_model(ckpt)
    model.eval()
    recall = fact_recall(model, fact_prompts(facts))
    prompt = f"The job of {facts[0].person} is"
    sample_ids = model.generate(torch.tensor([byte_encode(prompt)]), 80, temperature=0.7,
                                top_k=20, generator=torch.Generator().manual_seed(0))
    sample = byte_decode(sample_ids[0].tolist())
    results = {
        "steps": cfg.steps,
        "train_loss": summary["final_loss"],
        "eval_curve": curve,
        "best_step": best_step,
        "eval_loss": best_loss,
        "eval_bits_per_byte": best_loss / math.log(2),
        "fact_recall": recall,
        "seconds": seconds,
        "checkpoint": str(ckpt),
        "sample": sample,
    }
    say("\nvalidation loss (unseen docstrings, nats/byte) by step: "
        + ", ".join(f"{s}: {loss:.3f}" for s, loss in curve))
    say(f"best checkpoint: step {best_step} ({ckpt})")
    say(f"train loss {summary['final_loss']:.3f} (last step) | eval loss {best_loss:.3f} "
        f"({results['eval_bits_per_byte']:.2f} bits/byte) | facts recalled {recall:.1%} of "
        f"{len(facts)} | {seconds:.0f}s")
    say(f"sample: {sample!r}")
    return results
