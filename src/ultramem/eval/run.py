"""Evaluate a checkpoint: held-out text loss and bits per byte, and task accuracy; JSON and a table.

This is what `ultramem eval` and the study call. Held-out text defaults to the standard-library
docstrings of `ultramem.tasks.text.HELDOUT_MODULES`, which no study run trains on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ultramem.eval.perplexity import text_metrics
from ultramem.eval.task_eval import evaluate_task
from ultramem.tasks import build_tasks


def heldout_text(max_chars: int | None = None) -> str:
    from ultramem.tasks.text import stdlib_text

    text = stdlib_text("heldout")
    return text if max_chars is None else text[:max_chars]


def evaluate_model(model: Any, tokenizer: Any, *, tasks: list[str] | None = None,
                   size: str = "tiny", n_examples: int = 100, seed: int = 0,
                   text: str | None = None, text_chars: int | None = None,
                   facts_n: int | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """{'text': text_metrics, 'tasks': {name: result}, 'seconds': ...} for a model in memory.

    text (default: the held-out docstrings) is cut to text_chars and must give at least 2 tokens
    (ValueError). The facts task asks every fact, or the first facts_n. progress(line) is called
    before the text and before each task."""
    t0 = time.perf_counter()
    text = heldout_text(text_chars) if text is None else text[:text_chars]
    if len(tokenizer.encode(text)) < 2:
        raise ValueError("the held-out text gives fewer than 2 tokens: nothing to score")
    report = progress or (lambda line: None)
    report("held-out text")
    out: dict[str, Any] = {"text": text_metrics(model, tokenizer, text), "tasks": {}}
    built = build_tasks(size, tasks)
    for i, (name, task) in enumerate(built.items(), 1):
        report(f"task {i}/{len(built)}: {name}")
        result = evaluate_task(model, tokenizer, task, n_examples, seed, facts=facts_n)
        result["params"] = task.params()
        out["tasks"][name] = result
    retrieval = retrieval_metrics(model, tokenizer, text)
    if retrieval:
        out["retrieval"] = retrieval
    out["seconds"] = time.perf_counter() - t0
    return out


def retrieval_metrics(model: Any, tokenizer: Any, text: str, tokens: int = 512) -> dict[str, Any]:
    """Pre-selection recall of the UltraMemV2 layers on the first `tokens` tokens of text
    (`ultramem.diagnostics.preselect_recall`, every token): the mean and each layer's; empty for
    other models."""
    import torch

    from ultramem.diagnostics import recall_by_layer

    ids = tokenizer.encode(text)[: min(tokens, model.cfg.max_seq_len)]
    if not ids:
        return {}
    param = next(model.parameters())
    stats = recall_by_layer(model, torch.tensor([ids], device=param.device), max_tokens=len(ids))
    if not stats:
        return {}
    per_layer = [s["preselect_recall"] for s in stats]
    neg = [s["neg_quadrant_share"] for s in stats]
    return {"preselect_recall": sum(per_layer) / len(per_layer), "per_layer": per_layer,
            "neg_quadrant_share": sum(neg) / len(neg), "tokens": len(ids)}


def evaluate_checkpoint(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Load a checkpoint (`ultramem.train.checkpoint`) and `evaluate_model` it."""
    from ultramem.accounting import count_params
    from ultramem.train.checkpoint import load_model, load_tokenizer, resolve

    ckpt = resolve(path)
    model = load_model(ckpt)
    result = evaluate_model(model, load_tokenizer(ckpt), **kwargs)
    result["checkpoint"] = str(ckpt)
    result["params"] = count_params(model.cfg)
    return result


def results_table(result: dict[str, Any]) -> str:
    """A markdown table of one evaluation."""
    lines = ["| metric | value |", "|---|---|"]
    t = result["text"]
    lines += [f"| held-out loss (nats/token) | {t['loss']:.4f} |",
              f"| held-out bits per byte | {t['bits_per_byte']:.4f} |"]
    for name, r in result["tasks"].items():
        extra = f" ({r['recalled']}/{r['facts']} facts, {r['bits_per_param']:.2e} bits/param)" \
            if "recalled" in r else ""
        lines.append(f"| {name} accuracy | {r['accuracy']:.3f} (n={r['n']}){extra} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """result as out.json and out.md (out without suffix)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.with_suffix(".json"), out.with_suffix(".md")
    js.write_text(json.dumps(result, indent=2))
    md.write_text(results_table(result))
    return js, md
