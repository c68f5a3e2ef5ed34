"""`ultramem generate --checkpoint DIR --prompt TEXT`: continue prompts with a trained model.

A checkpoint directory holds `config.json` (`{"model": ModelConfig.to_dict(), "tokenizer": spec,
...}`) and `model.safetensors` (the LM's state_dict). The trainer's loader
(`ultramem.train.checkpoint`) is used when present; otherwise a minimal loader for exactly that
layout. Tokenizer: UTF-8 bytes, or the `tokenizer.json` (HF tokenizers format) that config.json's
"tokenizer" entry names in the same directory. The loaded model is prepared for serving
(`ultramem.serve`): `--dtype` casts it, UltraMemV2 layers get their decode step. Several
prompts are generated as one batch and printed one after the other, each under a
`--- sample N ---` line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_checkpoint(path: str | Path, device: str = "cpu",
                    warn: Callable[[str], None] | None = None) -> tuple[Any, Any]:
    """(LM, tokenizer) from a checkpoint directory, or a run directory (its newest good
    checkpoint; warn(message) for each damaged one skipped). `ultramem.train.checkpoint` verifies
    the files; the tokenizer is `ultramem.data.tokenizer`'s (its `path`: tokenizer.json, or None
    for bytes)."""
    from ultramem.train import checkpoint as ck

    ckpt = ck.resolve(Path(path), warn=warn)
    return ck.load_model(ckpt, device=device), ck.load_tokenizer(ckpt)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultramem.cli import add_threads_argument

    p = sub.add_parser("generate", help="continue prompts with a trained checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory, or a run directory (its newest good checkpoint)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-cache", action="store_true", help="recompute the sequence every step")
    p.add_argument("--dtype", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="serving weights (ultramem.serve.prepare_for_serving): fp32 (exact), "
                        "bf16 (faster for batches on CPUs with bf16 matmul), int8")
    add_threads_argument(p)
    p.set_defaults(func=run)


def check_flags(args: argparse.Namespace) -> None:
    """UsageError naming the first sampling flag out of its range."""
    from ultramem.cli import UsageError

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must lie in (0, 1], got {args.top_p}")


def encode_prompts(tok: Any, prompts: list[str], vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt; UsageError for an empty prompt or a token the model lacks."""
    from ultramem.cli import UsageError

    encoded = []
    for i, prompt in enumerate(prompts, 1):
        ids = tok.encode(prompt)
        if not ids:
            raise UsageError(f"--prompt {i} is empty: give at least one character")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(f"--prompt {i}: token {bad[0]} is outside the model's vocabulary "
                             f"of {vocab_size} (the checkpoint's tokenizer does not match it)")
        encoded.append(ids)
    return encoded


def generate_texts(model: Any, tok: Any, prompts: list[str], *, max_new_tokens: int,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int = 0, use_cache: bool = True) -> list[str]:
    """The continuations (new text only) of prompts, batched with left padding."""
    import torch

    device = next(model.parameters()).device
    encoded = [tok.encode(p) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("prompts must not be empty")
    width = max(len(e) for e in encoded)
    idx = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros_like(idx)
    for r, e in enumerate(encoded):
        idx[r, width - len(e):] = torch.tensor(e)
        mask[r, width - len(e):] = 1
    uniform = bool(mask.all())
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = model.generate(idx.to(device), max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=gen, use_cache=use_cache,
                         attention_mask=None if uniform else mask.to(device),
                         eos_token_id=tok.eos_id)
    texts = []
    for row in out[:, width:].tolist():
        if tok.eos_id is not None and tok.eos_id in row:
            row = row[: row.index(tok.eos_id)]
        texts.append(tok.decode(row))
    return texts


def run(args: argparse.Namespace) -> int:
    from ultramem.cli import check_device, set_threads, warn
    from ultramem.serve import prepare_for_serving

    check_flags(args)
    check_device(args.device)
    set_threads(args.threads)
    model, tok = load_checkpoint(args.checkpoint, device=args.device,
                                 warn=lambda message: warn("generate", message))
    encode_prompts(tok, args.prompt, model.cfg.vocab_size)
    prepare_for_serving(model, args.dtype)
    texts = generate_texts(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, use_cache=not args.no_cache)
    for i, (prompt, text) in enumerate(zip(args.prompt, texts, strict=True), 1):
        if len(texts) > 1:
            sys.stdout.write(f"--- sample {i} ---\n")
        sys.stdout.write(prompt + text + "\n")
    return 0
