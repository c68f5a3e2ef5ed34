"""`ultramem export --checkpoint DIR --out HF_DIR`: a training checkpoint as a transformers folder.

The folder loads with `AutoModelForCausalLM.from_pretrained(HF_DIR)` and
`AutoTokenizer.from_pretrained(HF_DIR)` after `import ultramem` (needs the `hf` extra).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="convert a checkpoint to a Hugging Face transformers folder")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or run directory)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from ultramem import hf
    except ImportError as err:
        raise SystemExit(f"export needs the hf extra (pip install 'ultramem[hf]'): {err}") from err
    from ultramem.commands.generate import load_checkpoint

    model, tok = load_checkpoint(args.checkpoint)
    tokenizer = hf.tokenizer_from_file(tok.file) if tok.file is not None else hf.byte_tokenizer()
    out = hf.export(model, args.out, tokenizer)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return 0
