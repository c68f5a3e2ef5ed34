"""`ultramem demo`: train the `tiny` UltraMemV2 model on built-in data and print what it learned.

The data is a generated world of facts (people, their cities, jobs and pets, each stated in a few
phrasings) plus English text that ships with Python, byte-tokenized. After training the demo
prints train/eval loss, the fraction of facts the model completes correctly, and a sample.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ultramem.config import ModelConfig
from ultramem.data.builtin import (
    byte_decode,
    byte_encode,
    fact_prompts,
    fact_text,
    fact_world,
    python_text,
)
from ultramem.model import LM


@dataclass(frozen=True)
class DemoConfig:
    preset: str = "tiny"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    n_people: int = 48
    eval_every: int = 100
    seed: int = 0


def _batch(data: torch.Tensor, bs: int, t: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    start = torch.randint(0, data.numel() - t - 1, (bs,), generator=gen)
    window = torch.stack([data[s : s + t + 1] for s in start.tolist()])
    return window[:, :-1], window[:, 1:]


@torch.no_grad()
def _eval_loss(model: LM, data: torch.Tensor, t: int, batches: int = 8) -> float:
    gen = torch.Generator().manual_seed(1234)
    losses = [model(*_batch(data, 16, t, gen))[1].item() for _ in range(batches)]
    return sum(losses) / len(losses)


@torch.no_grad()
def fact_recall(model: LM, prompts: list[tuple[str, str]]) -> float:
    """Fraction of prompts whose greedy continuation starts with the gold answer."""
    hits = 0
    for prompt, answer in prompts:
        idx = torch.tensor([byte_encode(prompt)])
        n_new = len(answer.encode())
        out = model.generate(idx, n_new, temperature=0)[0, idx.shape[1]:]
        hits += byte_decode(out.tolist()) == answer
    return hits / len(prompts)


def run_demo(cfg: DemoConfig = DemoConfig(), show: bool = True) -> dict[str, float | str]:
    """Train, evaluate and sample; returns the numbers it prints."""
    say = print if show else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    facts = fact_world(cfg.n_people, seed=cfg.seed)
    # Hold out the last 5% of each source: fact lines restate trained facts in other positions
    # and phrasings; the Python text held out is unseen prose.
    train_text, val_text = "", ""
    for text in (fact_text(facts, repeats=6, seed=cfg.seed), python_text()):
        cut = text.rfind("\n", 0, int(0.95 * len(text))) + 1
        train_text, val_text = train_text + text[:cut], val_text + text[cut:]
    train = torch.tensor(byte_encode(train_text), dtype=torch.long)
    val = torch.tensor(byte_encode(val_text), dtype=torch.long)
    model_cfg = ModelConfig.preset(cfg.preset, max_seq_len=cfg.seq_len)
    model = LM(model_cfg, seed=cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"ultramem demo: {cfg.preset} UltraMemV2 model, {n_params / 1e6:.2f}M parameters, "
        f"{len(model.memory_layers())} memory layers; {train.numel():,} training bytes "
        f"({len(facts)} facts about {cfg.n_people} people + Python's own docs)")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(cfg.seed)
    start, train_loss, eval_loss = time.time(), float("nan"), float("nan")
    bar = tqdm(range(cfg.steps), desc="train", disable=not show, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = _batch(train, cfg.batch_size, cfg.seq_len, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_loss = loss.item() if step == 0 else 0.9 * train_loss + 0.1 * loss.item()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            eval_loss = _eval_loss(model, val, cfg.seq_len)
            model.train()
        tok_s = (step + 1) * cfg.batch_size * cfg.seq_len / (time.time() - start)
        bar.set_postfix(loss=f"{train_loss:.3f}", eval=f"{eval_loss:.3f}", tok_s=f"{tok_s:,.0f}")
    bar.close()
    model.eval()
    recall = fact_recall(model, fact_prompts(facts))
    prompt = f"The job of {facts[0].person} is"
    out = model.generate(torch.tensor([byte_encode(prompt)]), 80, temperature=0.7, top_k=20,
                         generator=torch.Generator().manual_seed(0))
    sample = byte_decode(out[0].tolist())
    results = {
        "steps": cfg.steps,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "eval_bits_per_byte": eval_loss / math.log(2),
        "fact_recall": recall,
        "seconds": time.time() - start,
        "sample": sample,
    }
    say(f"\ntrain loss {train_loss:.3f} | eval loss {eval_loss:.3f} "
        f"({results['eval_bits_per_byte']:.2f} bits/byte) | "
        f"facts recalled {recall:.1%} of {len(facts)} | {results['seconds']:.0f}s")
    say(f"sample: {sample!r}")
    return results
