"""`ultramem eval` and `ultramem study`.

Examples:
  ultramem eval --checkpoint runs/x --tasks needle,kv_retrieval --out runs/x/eval
  ultramem study --family tiny --steps 300 --out docs/results
  ultramem study --family small --steps 400 --archs moe,ultramem_v2 --ablations none --threads 1
  ultramem study --family small --steps 300 --seeds 2 --seeded moe,ultramem_v2
  ultramem study --family mini --corpus english --steps 9766 --batch-size 8 --seq-len 256 \
      --archs moe,ultramem_v2 --ablations none --seeds 3 --jobs 2 \
      --archive docs/results/mini-english/runs   # 20M tokens per run, continued across machines
  (the same command + --report-only: a report of the runs finished so far, none trained)
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _names(text: str | None) -> list[str] | None:
    if text is None or text == "all":
        return None
    if text == "none":
        return []
    return [t.strip() for t in text.split(",") if t.strip()]


# Examples per task when --n is not given (the facts task then asks every fact).
DEFAULT_N = 100


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultramem.cli import add_threads_argument
    from ultramem.config import ARCHS
    from ultramem.tasks import SIZES, TASKS

    p = sub.add_parser("eval", help="held-out loss, bits per byte, task accuracy of a checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory, or a run directory (its newest good checkpoint)")
    p.add_argument("--tasks", default="all", help=f"comma list of {list(TASKS)}, all or none")
    p.add_argument("--size", default=None, choices=sorted(SIZES),
                   help="task size (default: 'small' for a 512+ context, else 'tiny')")
    p.add_argument("--n", type=int, default=None,
                   help=f"examples per task (default {DEFAULT_N}; facts: every fact unless given)")
    p.add_argument("--seed", type=int, default=1, help="seed of the task examples")
    p.add_argument("--text", default=None, help="held-out text file (default: stdlib docstrings)")
    p.add_argument("--text-chars", type=int, default=None, help="cut held-out text to N chars")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    add_threads_argument(p)
    p.set_defaults(func=run_eval)

    s = sub.add_parser("study", help="train and evaluate every architecture of a preset family",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--family", default="tiny", help="tiny, mini or small (the study's families)")
    s.add_argument("--steps", type=int, default=300, help="training steps per run")
    s.add_argument("--archs", default="all", help=f"comma list of {list(ARCHS)}, all or none")
    s.add_argument("--ablations", default="all",
                   help="comma list of plain_values,fixed_init,shared_query,half_layers,both_ends,"
                        "both_ends_equal, all or none")
    s.add_argument("--out", default="runs/study",
                   help="where <family>.md and plots go (committed results: name docs/results)")
    s.add_argument("--work", default="runs/study", help="run directories (checkpoints, data)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=None, help="default: the family's max_seq_len")
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--eps", type=float, default=1e-8,
                   help="Adam's eps (default 1e-8, that of earlier studies)")
    s.add_argument("--warmup", type=int, default=None,
                   help="warmup steps (default: min(20, steps / 10), that of earlier studies)")
    s.add_argument("--n", type=int, default=100, help="eval examples per task")
    s.add_argument("--text-chars", type=int, default=None, help="cut held-out text to N chars")
    s.add_argument("--task-size", default=None, choices=sorted(SIZES),
                   help="task size (default: the family's)")
    s.add_argument("--train-docs", type=int, default=None, help="training documents per task")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seeds", type=int, default=1,
                   help="training seeds per run (repeats: seed+1 ..., same data and eval)")
    s.add_argument("--seeded", default="all",
                   help="comma list of the runs repeated over --seeds (e.g. moe,ultramem_v2), "
                        "or all")
    s.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: more oversubscribe a shared machine)")
    s.add_argument("--jobs", type=int, default=1,
                   help="runs trained at the same time, each its own process with --threads "
                        "(e.g. --jobs 2 --threads 1 on two cores)")
    s.add_argument("--corpus", default=None,
                   help="train on this corpus (e.g. english: see docs/corpus.md) mixed with the "
                        "task documents, and measure held-out loss on its held-out split")
    s.add_argument("--corpus-root", default="data/corpus",
                   help="where the corpus's packages and export live (fetched once)")
    s.add_argument("--task-share", type=float, default=0.1,
                   help="with --corpus: the task documents' share of the mix's characters")
    s.add_argument("--report-only", action="store_true",
                   help="report the plan's finished runs in --work and name the others; "
                        "train nothing (the same flags as the run that made them)")
    s.add_argument("--archive", default=None,
                   help="keep each finished run's record (row, settings, training log; no "
                        "checkpoint) in ARCHIVE/<run>/ and restore matching ones from it, so a "
                        "study continues on another machine (commit ARCHIVE)")
    s.set_defaults(func=run_study_cmd)


def run_eval(args: argparse.Namespace) -> int:
    from ultramem.cli import UsageError, read_text_arg, set_threads, warn
    from ultramem.eval.run import evaluate_checkpoint, results_table, write_results
    from ultramem.tasks import TASKS
    from ultramem.train.checkpoint import read_config, resolve

    if args.n is not None and args.n < 1:
        raise UsageError(f"--n must be >= 1 (examples per task), got {args.n}")
    if args.text_chars is not None and args.text_chars < 1:
        raise UsageError(f"--text-chars must be >= 1, got {args.text_chars}")
    tasks = _names(args.tasks)
    unknown = [t for t in tasks or [] if t not in TASKS]
    if unknown:
        raise UsageError(f"--tasks: unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    set_threads(args.threads)
    text = read_text_arg(args.text) if args.text is not None else None
    ckpt = resolve(args.checkpoint, warn=lambda message: warn("eval", message))
    size = args.size or ("small" if read_config(ckpt)["model"]["max_seq_len"] >= 512 else "tiny")
    result = evaluate_checkpoint(ckpt, tasks=tasks, size=size, n_examples=args.n or DEFAULT_N,
                                 facts_n=args.n, seed=args.seed, text=text,
                                 text_chars=args.text_chars,
                                 progress=lambda line: print(f"eval: {line}", file=sys.stderr))
    print(results_table(result), end="")
    if args.out:
        js, md = write_results(result, args.out)
        print(f"wrote {js} and {md}")
    return 0


def run_study_cmd(args: argparse.Namespace) -> int:
    from ultramem.config import ARCHS
    from ultramem.eval.study import ABLATIONS, StudyConfig, run_study

    archs = _names(args.archs)
    ablations = _names(args.ablations)
    try:
        cfg = StudyConfig(
            family=args.family, steps=args.steps,
            archs=tuple(ARCHS if archs is None else archs),
            ablations=tuple(ABLATIONS if ablations is None else ablations),
            out=args.out, work=args.work, seed=args.seed, seeds=args.seeds,
            seeded=None if args.seeded == "all" else tuple(_names(args.seeded) or ()),
            batch_size=args.batch_size,
            seq_len=args.seq_len, lr=args.lr, eps=args.eps, warmup=args.warmup,
            n_examples=args.n, text_chars=args.text_chars,
            task_size=args.task_size, train_docs=args.train_docs, threads=args.threads,
            jobs=args.jobs, corpus=args.corpus, corpus_root=args.corpus_root,
            task_share=args.task_share, report_only=args.report_only, archive=args.archive,
            command="ultramem " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["study"]
            else "ultramem study " + f"--family {args.family} --steps {args.steps}",
        )
        if cfg.report_only:  # trains nothing: its one failure (nothing finished) is the user's
            run_study(cfg)
            return 0
    except ValueError as err:
        print(f"ultramem study: {err}", file=sys.stderr)
        return 2
    run_study(cfg)
    return 0
