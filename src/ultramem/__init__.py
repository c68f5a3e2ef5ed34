"""ultramem: UltraMemV2 memory-layer language models (arXiv 2508.18756) in PyTorch."""

from ultramem.config import ConfigError, MemoryConfig, ModelConfig
from ultramem.layers import UltraMemV2Layer, ValueStore
from ultramem.model import LM

__version__ = "0.1.0"
__all__ = ["LM", "ConfigError", "MemoryConfig", "ModelConfig", "UltraMemV2Layer", "ValueStore"]


def _register_hf() -> None:
    """With transformers installed, register UltraMemConfig / UltraMemForCausalLM with the Auto
    classes (ultramem.hf), so `AutoModelForCausalLM.from_pretrained` works after `import ultramem`.
    ULTRAMEM_NO_HF=1 skips it (saves the ~1-3 s transformers import)."""
    import importlib.util
    import os

    if os.environ.get("ULTRAMEM_NO_HF") == "1" or importlib.util.find_spec("transformers") is None:
        return
    try:
        import ultramem.hf  # noqa: F401
    except ImportError as err:  # a transformers too old or broken: the core works without it
        import warnings

        warnings.warn(f"ultramem: Hugging Face adapter not registered ({err})", stacklevel=2)


_register_hf()
