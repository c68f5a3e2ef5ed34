"""`ultramem export --checkpoint DIR --out HF_DIR`: a training checkpoint as a transformers folder.

The folder loads with `AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)`
(its config.json's auto_map names two small modules in the folder that import the classes from
the installed ultramem package; needs the `hf` extra) and `AutoTokenizer.from_pretrained(HF_DIR)`;
after `import ultramem.hf`, trust_remote_code is not needed.

The checkpoint is loaded and verified as `generate` loads it (checksums, NaN/inf weights,
shuffle buffers), so a damaged one is refused, not copied. The folder is written beside --out
under a temporary name and renamed into place when complete; --out may be new, an empty
directory or an earlier export (replaced), never a file or a directory holding anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from ultramem.files import swap_in


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ultramem.cli import add_threads_argument

    p = sub.add_parser("export", help="convert a checkpoint to a Hugging Face transformers folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory, or a run directory (its newest good checkpoint)")
    p.add_argument("--out", required=True, help="output folder (new, empty or an earlier export)")
    add_threads_argument(p)
    p.set_defaults(func=run)


def check_out(out: Path) -> None:
    """UsageError unless out may be written: missing, an empty directory or an earlier export."""
    from ultramem.cli import UsageError

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_export(out):
        raise UsageError(f"--out {out} holds files that are not an ultramem export; choose a new "
                         f"or empty directory")


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text())["model_type"] == "ultramem"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run(args: argparse.Namespace) -> int:
    from ultramem.cli import UsageError, set_threads, warn

    out = Path(args.out)
    check_out(out)
    set_threads(args.threads)
    try:
        from ultramem import hf
    except ImportError as err:
        raise UsageError(f"export needs the hf extra (pip install 'ultramem[hf]'): {err}") from err
    from ultramem.commands.generate import load_checkpoint

    model, tok = load_checkpoint(args.checkpoint, warn=lambda message: warn("export", message))
    tokenizer = hf.tokenizer_from_file(tok.path) if tok.path is not None else hf.byte_tokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        hf.export(model, work, tokenizer)
        _default_modes(work)
        swap_in(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return 0


def _default_modes(folder: Path) -> None:
    """Every file the mode a plain new file gets (0644 under umask 022): some writers use
    private temporary files (0600) and rename them into place."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


