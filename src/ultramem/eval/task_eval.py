"""Task accuracy by teacher forcing: an answer is right when greedy decoding would produce it.

Each example is encoded segment by segment (`ultramem.tasks.encode`) and run through the model
once; an answer span is correct when the argmax at every one of its positions is the gold token,
which is exactly the condition for greedy decoding from the prompt to reproduce the gold tokens
(tests/test_eval.py holds this against `LM.generate`). Examples longer than max_seq_len keep
their last max_seq_len tokens; answers cut off that way are counted as `dropped`, not scored.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ultramem.tasks import Example, Task, answer_spans, encode


@torch.no_grad()
def score_examples(model: nn.Module, tokenizer: Any, examples: list[Example],
                   batch_size: int = 16) -> dict[str, Any]:
    """accuracy (answers right / answers), token_accuracy, answer_nll (nats per answer token),
    n (answers scored), dropped (answers cut by max_seq_len), by_group {group: accuracy}."""
    limit = model.cfg.max_seq_len
    device = next(model.parameters()).device
    encoded = []
    dropped = 0
    for ex in examples:
        ids, mask = encode(ex, tokenizer)
        if len(ids) > limit:
            cut = len(ids) - limit
            for s, e in answer_spans(mask):
                if s <= cut:  # cut off, in part, or its first token would have no prediction
                    dropped += 1
                    mask[s:e] = [False] * (e - s)
            ids, mask = ids[cut:], mask[cut:]
        encoded.append((ids, mask, ex.group))
    right = total = 0
    tok_right = tok_total = 0
    nll_sum = 0.0
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    was_training = model.training
    model.eval()
    for b in range(0, len(encoded), batch_size):
        chunk = encoded[b : b + batch_size]
        width = max(len(ids) for ids, _, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (ids, _, _) in enumerate(chunk):
            x[i, : len(ids)] = torch.tensor(ids)
        logits, _ = model(x.to(device))  # right padding: causal, so real positions are unaffected
        logp = logits.float().log_softmax(-1).cpu()
        for i, (ids, mask, group) in enumerate(chunk):
            for s, e in answer_spans(mask):
                if s == 0:
                    continue
                gold = torch.tensor(ids[s:e])
                pred = logp[i, s - 1 : e - 1]  # position j predicts token j + 1
                hits = pred.argmax(-1) == gold
                ok = bool(hits.all())
                right += ok
                total += 1
                tok_right += int(hits.sum())
                tok_total += len(gold)
                nll_sum -= float(pred.gather(1, gold[:, None]).sum())
                groups[group][0] += ok
                groups[group][1] += 1
    model.train(was_training)
    out: dict[str, Any] = {
        "accuracy": right / total if total else 0.0, "n": total, "correct": right,
        "token_accuracy": tok_right / tok_total if tok_total else 0.0,
        "answer_nll": nll_sum / tok_total if tok_total else 0.0, "dropped": dropped,
    }
    if len(groups) > 1 or "" not in groups:
        out["by_group"] = {g: c / n for g, (c, n) in sorted(groups.items())}
    return out


def evaluate_task(model: nn.Module, tokenizer: Any, task: Task, n: int = 100, seed: int = 0,
                  facts: int | None = None) -> dict[str, Any]:
    """score_examples on n eval examples of task; the fact world asks every fact (or the first
    `facts`) and adds recall and bits stored."""
    from ultramem.tasks import FactWorld

    if isinstance(task, FactWorld):
        examples = task.examples(facts)
        result = score_examples(model, tokenizer, examples)
        from ultramem.accounting import count_params

        params = count_params(model.cfg)
        bits = result["correct"] * task.bits_per_fact()
        result.update(facts=len(examples), recalled=result["correct"], bits_stored=bits,
                      bits_per_param=bits / params["total"],
                      bits_per_active_param=bits / params["active"])
        return result
    return score_examples(model, tokenizer, task.examples(n, seed))
