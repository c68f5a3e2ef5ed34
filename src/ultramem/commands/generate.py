"""`ultramem generate --checkpoint DIR --prompt TEXT`: continue prompts with a trained model.

A checkpoint directory holds `config.json` (`{"model": ModelConfig.to_dict(), "tokenizer": spec,
...}`) and `model.safetensors` (the LM's state_dict). The trainer's loader
(`ultramem.train.checkpoint`) is used when present; otherwise a minimal loader for exactly that
layout. Tokenizer: UTF-8 bytes, or the `tokenizer.json` (HF tokenizers format) that config.json's
"tokenizer" entry names in the same directory. The loaded model is prepared for serving
(`ultramem.serve`): `--dtype` casts it, UltraMemV2 layers get their decode step. Several
prompts are generated as one batch and printed one after the other, each under a
`--- sample N ---` line.

A checkpoint written by `ultramem init` keeps its value tables only in int8 row files
(`tables/`): they are served memory-mapped (`ultramem.offload`), each step reading the rows it
needs from disk. `--mmap-tables` does the same for a training checkpoint's tables (its int8 row
files when `ultramem.offload.write_int8_tables` wrote them, else the float tables in place).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_checkpoint(path: str | Path, device: str = "cpu",
                    warn: Callable[[str], None] | None = None,
                    mmap_tables: bool | None = False) -> tuple[Any, Any]:
    """(LM, tokenizer) from a checkpoint directory, or a run directory (its newest good
    checkpoint; warn(message) for each damaged one skipped). `ultramem.train.checkpoint` verifies
    the files; the tokenizer is `ultramem.data.tokenizer`'s (its `path`: tokenizer.json, or None
    for bytes). mmap_tables: serve the UltraMemV2 tables memory-mapped (`ultramem.offload`);
    None: only when the checkpoint keeps them in int8 row files alone (`ultramem init`); False:
    such a checkpoint is refused (CheckpointError)."""
    from ultramem.offload import has_external_tables, load_offloaded
    from ultramem.train import checkpoint as ck

    ckpt = ck.resolve(Path(path), warn=warn)
    external = has_external_tables(ckpt)
    if external and mmap_tables is False:
        raise ck.CheckpointError(f"{ckpt}: its value tables are int8 row files (written by "
                                 f"`ultramem init`), which only `ultramem generate` serves")
    if external or mmap_tables:
        ck.check_files(ckpt)
        try:
            model = load_offloaded(ckpt, device=device)
        except ValueError as err:
            raise ck.CheckpointError(str(err)) from None
        return model, ck.load_tokenizer(ckpt)
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
    p.add_argument("--mmap-tables", action="store_true",
                   help="serve UltraMemV2 value tables memory-mapped from the checkpoint's files "
                        "(always, for checkpoints written by `ultramem init`)")
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
        texts.append(decode_ids(tok, row))
    return texts


def decode_ids(tok: Any, ids: list[int]) -> str:
    """Text of ids; an id beyond the tokenizer's vocabulary (a model with a larger one, such as
    a fresh `ultramem init` model with byte tokens) shows as U+FFFD."""
    parts, run = [], []
    for t in ids:
        if t < tok.vocab_size:
            run.append(t)
            continue
        parts += [tok.decode(run), "\ufffd"]
        run = []
    return "".join(parts) + tok.decode(run)


def run(args: argparse.Namespace) -> int:
    from ultramem.cli import check_device, set_threads, warn
    from ultramem.serve import prepare_for_serving

    check_flags(args)
    check_device(args.device)
    set_threads(args.threads)
    model, tok = load_checkpoint(args.checkpoint, device=args.device,
                                 warn=lambda message: warn("generate", message),
                                 mmap_tables=True if args.mmap_tables else None)
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
