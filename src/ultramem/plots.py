"""matplotlib for the reports' plots: optional (the `train` and `eval` extras), and always on the
file-only backend."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend (writes files, needs no display), or None when
    matplotlib is not installed; callers then skip their plot."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
