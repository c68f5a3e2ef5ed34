"""ultramem: UltraMemV2 memory-layer language models (arXiv 2508.18756) in PyTorch."""

from ultramem.config import ConfigError, MemoryConfig, ModelConfig
from ultramem.layers import UltraMemV2Layer, ValueStore
from ultramem.model import LM

__version__ = "0.1.0"
__all__ = ["LM", "ConfigError", "MemoryConfig", "ModelConfig", "UltraMemV2Layer", "ValueStore"]
