"""`ultramem diagnose --checkpoint DIR`: how a trained model's sparse layers use their memory.

Per sparse layer, on held-out text (default: the stdlib docstrings `ultramem eval` uses): the
fraction of value rows read, Gini of row usage, the Tucker cores' singular values and, for
UltraMemV2, the pre-selection recall against brute force and the share of the exact top-m in
the (-, -) quadrant that rank-1 pre-selection misses, and the RMS of the layer's output over that
of its block's FFN (`out/ffn`; near 0: a dead layer that adds nothing) (`ultramem.diagnostics`).
From a training checkpoint's optimizer state also the median of Adam's gradient RMS estimate over
its eps for the layer's dense weights (`grad/eps`; near 1 or below: eps, not the gradient, sets
the layer's steps, the trap that keeps a dead layer dead; `-` for an exported model or a sharded
checkpoint, whose optimizer state is in its shards).

  ultramem diagnose --checkpoint runs/x
  ultramem diagnose --checkpoint runs/x --text notes.txt --tokens 512 --json
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="memory usage, Gini, Tucker spectra, retrieval recall",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--text", default=None, help="text file (default: stdlib docstrings)")
    p.add_argument("--tokens", type=int, default=256, help="tokens fed through the model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ultramem.cli import UsageError, read_text_arg, warn
    from ultramem.diagnostics import model_diagnostics
    from ultramem.eval.run import heldout_text
    from ultramem.train import checkpoint as ckpt

    if args.tokens < 2:
        raise UsageError(f"--tokens must be >= 2, got {args.tokens}")
    text = read_text_arg(args.text) if args.text is not None else heldout_text()
    path = ckpt.resolve(args.checkpoint, warn=lambda message: warn("diagnose", message))
    model = ckpt.load_model(path)
    tok = ckpt.load_tokenizer(path)
    ids = tok.encode(text)[: min(args.tokens, model.cfg.max_seq_len)]
    if len(ids) < 2:
        raise UsageError(f"--text {args.text}: fewer than 2 tokens")
    if not model.memory_layers():
        raise UsageError(f"{path}: this model has no sparse layers")
    layers = model_diagnostics(model, torch.tensor([ids]))
    ratios = checkpoint_grad_over_eps(path, model)
    for i, s in enumerate(layers):
        s["grad_over_eps"] = None if ratios is None else ratios[i]
    if args.json:
        print(json.dumps(layers, indent=2))
        return 0
    print(f"{len(ids)} tokens; {len(layers)} sparse layers")
    print(f"{'layer':>5} {'kind':<12} {'rows used':>9} {'gini':>6} {'recall':>7} {'(-,-)':>6} "
          f"{'out/ffn':>8} {'grad/eps':>8}  Tucker singular values")
    for i, s in enumerate(layers):
        recall = f"{s['preselect_recall']:.3f}" if "preselect_recall" in s else "-"
        neg = f"{s['neg_quadrant_share']:.3f}" if "neg_quadrant_share" in s else "-"
        share = "-" if s["out_over_ffn"] is None else f"{s['out_over_ffn']:.2g}"
        ratio = "-" if s["grad_over_eps"] is None else f"{s['grad_over_eps']:.2g}"
        sv = s.get("tucker_singular_values")
        spectra = "-" if sv is None else str(_rounded(sv))
        print(f"{i:>5} {s['kind']:<12} {s['fraction_used']:>9.3f} {s['gini']:>6.3f} "
              f"{recall:>7} {neg:>6} {share:>8} {ratio:>8}  {spectra}")
    return 0


def checkpoint_grad_over_eps(path, model) -> list[float | None] | None:
    """`ultramem.diagnostics.adam_grad_over_eps` of each sparse layer of `model` from the
    training checkpoint at path: its optimizer rebuilt from the saved train config and loaded
    with the saved state. None where there is none to read (an exported model, or a sharded
    checkpoint)."""
    from ultramem.diagnostics import adam_grad_over_eps
    from ultramem.train import checkpoint as ckpt
    from ultramem.train.config import TrainConfig
    from ultramem.train.optim import build_optimizers

    train = ckpt.read_config(path).get("train")
    if train is None or ckpt.is_sharded(path) or not (path / "optimizer.pt").is_file():
        return None
    opts = build_optimizers(model, TrainConfig.from_dict(train))
    opts["main"].load_state_dict(ckpt.load_training_state(path)["optimizer"]["main"])
    return adam_grad_over_eps(model, opts["main"])


def _rounded(x):
    return [_rounded(v) for v in x] if isinstance(x, list) else round(x, 3)
