"""ultramem: UltraMemV2 memory-layer language models (arXiv 2508.18756) in PyTorch.

`LM`, `UltraMemV2Layer` and `ValueStore` are imported on first use (PEP 562), so `import ultramem`
and `ultramem --help` load neither torch nor transformers. The Hugging Face classes live in
`ultramem.hf`; importing it registers them with the transformers Auto classes.
"""

from __future__ import annotations

import importlib
from typing import Any

from ultramem.config import ConfigError, MemoryConfig, ModelConfig, UltraMemV2Config

__version__ = "0.1.0"
__all__ = ["LM", "ConfigError", "MemoryConfig", "ModelConfig", "UltraMemV2Config",
           "UltraMemV2Layer", "ValueStore"]

# name -> module that defines it, imported when the name is first read.
_LAZY = {"LM": "ultramem.model", "UltraMemV2Layer": "ultramem.layers",
         "ValueStore": "ultramem.layers"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ultramem' has no attribute {name!r}")
