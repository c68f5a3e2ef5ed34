"""Loss and bits per byte of a model on held-out text.

The text is tokenized once and cut into consecutive windows of at most max_seq_len + 1 tokens
that overlap by one, so every token after the first is predicted exactly once, with the context
of its window. bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the text,
comparable across tokenizers (for the byte tokenizer it is loss / ln 2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def token_nll(model: nn.Module, ids: list[int], seq_len: int | None = None,
              batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL in nats, tokens predicted) of ids under model, windows of seq_len tokens."""
    seq_len = seq_len or model.cfg.max_seq_len
    if len(ids) < 2:
        return 0.0, 0
    windows = [ids[s : s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        width = max(len(w) for w in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, w in enumerate(chunk):
            x[i, : len(w) - 1] = torch.tensor(w[:-1])
            y[i, : len(w) - 1] = torch.tensor(w[1:])
        logits, _ = model(x.to(device))
        nll = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten().to(device),
                                          ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((y != -100).sum())
    model.train(was_training)
    return total, count


def text_metrics(model: nn.Module, tokenizer: Any, text: str, seq_len: int | None = None,
                 ) -> dict[str, float]:
    """{'loss': nats per token, 'bits_per_byte', 'tokens', 'bytes'} of text under model."""
    ids = tokenizer.encode(text)
    nll, count = token_nll(model, ids, seq_len)
    # The first token is not predicted: its bytes are not counted either.
    n_bytes = len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return {"loss": nll / max(count, 1), "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
            "tokens": count, "bytes": n_bytes}
