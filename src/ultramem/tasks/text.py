"""Natural English text that ships with Python: docstrings of standard-library modules.

The `train` modules and the `heldout` modules are disjoint, so held-out loss and bits per byte
are measured on text no model trained on. Python's own version fixes the exact text; results
record it. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

TRAIN_MODULES = (
    "collections", "json", "textwrap", "random", "codecs", "argparse", "string", "functools",
    "itertools", "heapq", "bisect", "datetime", "calendar", "csv", "difflib", "fractions",
    "statistics", "shutil", "tempfile", "logging", "pathlib", "typing", "dataclasses", "enum",
    "contextlib", "threading", "queue", "socket", "subprocess", "zipfile", "tarfile", "pickle",
)
HELDOUT_MODULES = (
    "decimal", "inspect", "email.message", "http.client", "unittest.case", "configparser",
    "ipaddress", "gettext", "pprint", "locale",
)


def _docs(module_name: str) -> list[str]:
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        return _collect(module_name)


def _collect(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    out = [inspect.cleandoc(module.__doc__)] if module.__doc__ else []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__doc__:
            doc = inspect.cleandoc(obj.__doc__)
            if len(doc) >= 80:
                out.append(doc)
    return out


def stdlib_documents(split: str = "train") -> list[str]:
    """One document per docstring of the split's modules ('train' or 'heldout'), in order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    mods = TRAIN_MODULES if split == "train" else HELDOUT_MODULES
    docs: list[str] = []
    for name in mods:
        docs += _docs(name)
    return docs


def stdlib_text(split: str = "train") -> str:
    return "\n\n".join(stdlib_documents(split)) + "\n"
