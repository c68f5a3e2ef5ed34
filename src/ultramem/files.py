"""File-system steps shared by the commands that write files and directories (prepare, export,
capacity)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def swap_in(new: Path, out: Path) -> None:
    """Put the finished directory `new` at `out`. Without an old one this is one atomic rename;
    an old one is first renamed aside and deleted after, so a kill at any point leaves either
    the old or the new complete directory at `out` (or, between the two renames, `out` missing
    and the old one kept as `.NAME.old-PID` beside it), never a mixture."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the whole new one: write a
    temporary file beside it, flush it to disk, then rename it over `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
