"""Run metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard, a loss plot.

On resume the log is cut back to the checkpoint's step, so a resumed run's file reads exactly as
an uninterrupted run's would (timings aside).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: drop it
            continue
    return rows


class MetricsLogger:
    """Appends metric rows to DIR/metrics.jsonl and, if available, TensorBoard (DIR/tb)."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, resume_step: int = 0):
        self.dir = Path(out_dir)
        self.path = self.dir / "metrics.jsonl"
        if resume_step > 0:
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=resume_step or None)
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only",
                              stacklevel=2)
        self._fh = self.path.open("a")

    def log(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.tb is not None:
            step = row["step"]
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._fh.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Train (and eval) loss against step as a PNG; None if matplotlib is missing."""
    from ultramem.plots import pyplot

    plt = pyplot()
    if plt is None:
        warnings.warn("matplotlib is not installed: no loss plot", stacklevel=2)
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
