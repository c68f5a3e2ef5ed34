"""Hugging Face transformers adapter (optional extra `hf`): a thin wrapper over `ultramem.LM`.

`UltraMemConfig` carries the whole `ModelConfig` (field `ultramem`, its `to_dict()`) and mirrors
the standard names (`hidden_size`, `num_hidden_layers`, ...) for HF tooling.
`UltraMemForCausalLM` holds one `LM` as `self.model`: no second copy of the network, so every
architecture the project builds (UltraMemV2, MoE, PKM, PEER, Memory+, UltraMem v1, dense) loads
the same way. `generate()` runs on our `KVCache`, allocated once for prompt + new tokens, with the
UltraMemV2 decode steps of `ultramem.serve` (`ultramem.serve.prepare_for_serving(hf.model,
"bf16")` casts the weights for serving). Importing this module registers both classes
with `AutoConfig` / `AutoModelForCausalLM`; `import ultramem` alone does not import transformers
(it takes seconds), so code that loads an exported folder imports `ultramem.hf` first.

Padding: left-padded batches are handled with the attention mask alone. RoPE scores depend only
on the distance between tokens, so `position_ids` are not needed and are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from ultramem.config import ModelConfig
from ultramem.model import LM, KVCache, rope_tables

MODEL_TYPE = "ultramem"


class UltraMemConfig(PreTrainedConfig):
    """HF config of an `LM`: `ultramem` is `ModelConfig.to_dict()`, the single source of truth.

    The standard HF attribute names are derived from it in `__post_init__`.
    """

    model_type = MODEL_TYPE

    ultramem: dict[str, Any] | None = None
    vocab_size: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        cfg = ModelConfig.from_dict(self.ultramem) if self.ultramem is not None else ModelConfig()
        self.ultramem = cfg.to_dict()
        self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.d_model
        self.num_hidden_layers, self.num_attention_heads = cfg.n_layers, cfg.n_heads
        self.max_position_embeddings = cfg.max_seq_len
        self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> UltraMemConfig:
        return cls(ultramem=cfg.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.ultramem)


class _GenerationCache(KVCache):
    """Our `KVCache` with the few attributes transformers' `generate` reads from a cache."""

    is_compileable = False

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.n_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos


class UltraMemForCausalLM(PreTrainedModel, GenerationMixin):
    """`LM` as a transformers causal LM: `from_pretrained`, `save_pretrained`, `generate`."""

    config_class = UltraMemConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: UltraMemConfig, model: LM | None = None):
        super().__init__(config)
        if model is None:
            # from_pretrained builds on the meta device and loads the weights afterwards: skip our
            # (Monte Carlo calibrated) init there; a plain construction initialises as LM does.
            on_meta = torch.empty(0).device.type == "meta"
            model = LM(config.to_model_config(), init=not on_meta)
        self.model = model
        self.post_init()

    @classmethod
    def from_lm(cls, model: LM, **config_kwargs: Any) -> UltraMemForCausalLM:
        """Wrap an existing `LM` (shares its tensors, copies nothing)."""
        return cls(UltraMemConfig.from_model_config(model.cfg, **config_kwargs), model=model)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> UltraMemForCausalLM:
        model = super().from_pretrained(*args, **kwargs)
        # Tensors read from a safetensors file may sit at unaligned addresses, and CPU kernels
        # then take other SIMD paths and round differently (~1e-6). Fresh storage makes a loaded
        # model compute bit-identically to the one that was saved.
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.data_ptr() % 64:
                    t.data = t.data.clone()
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generation uses our own KVCache, created in forward

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Weights come from LM's own init or from the checkpoint; only the RoPE tables (buffers
        # that are not saved) need filling after a load from the meta device.
        if isinstance(module, LM):
            cfg = module.cfg
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' `generate` on the serving path: UltraMemV2 decode steps installed for the
        call (`ultramem.serve.decoding`), one KV cache of prompt + new tokens (no regrowth)."""
        from ultramem.serve import decoding

        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        gen_cfg = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", gen_cfg.max_new_tokens)
        total = kwargs.get("max_length", gen_cfg.max_length)
        if ids is not None and new is not None:
            total = ids.shape[-1] + new
        self._cache_len = None if total is None else min(int(total), self.config.ultramem[
            "max_seq_len"])
        try:
            with decoding(self.model):
                return super().generate(*args, **kwargs)
        finally:
            self._cache_len = None

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.model.head  # None when tied: LM reads embed.weight directly

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cache: KVCache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                position_ids: Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """HF convention: labels are the inputs (shifted inside), -100 ignored."""
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"{type(self).__name__} needs an ultramem KVCache, got {type(cache)}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cap = getattr(self, "_cache_len", None) or 64  # set by generate(): prompt + new
            cache = _GenerationCache.for_model(self.model, input_ids.shape[0], capacity=cap)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # plain causal attention is faster and the same
        targets = None
        if labels is not None:
            targets = torch.full_like(labels, -100)
            targets[:, :-1] = labels[:, 1:]
        logits, loss = self.model(input_ids, targets, cache=cache if use_cache else None,
                                  attention_mask=attention_mask)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Our byte vocabulary (id = UTF-8 byte, 256 ids) as a `tokenizers` byte-level tokenizer.

    Each byte b is the token of character `_byte_chars()[b]` (the usual byte-level alphabet), with
    no merges, so encode gives exactly the UTF-8 bytes and decode inverts it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def _byte_chars() -> list[str]:
    """Printable stand-in characters for the 256 bytes, as byte-level pre-tokenizers use them:
    printable Latin-1 bytes map to themselves, the others to code points 256, 257, ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tokenizer_from_file(path: str | Path, eos_token: str | None = "<|endoftext|>"
                        ) -> PreTrainedTokenizerFast:
    """A `tokenizer.json` (HF tokenizers format) as a transformers tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    kwargs: dict[str, Any] = {}
    if eos_token is not None and tok.token_to_id(eos_token) is not None:
        kwargs["eos_token"] = eos_token
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   **kwargs)


def export(model: LM, out_dir: str | Path, tokenizer: PreTrainedTokenizerFast | None = None
           ) -> Path:
    """Write `model` (and its tokenizer, bytes by default) as a transformers folder."""
    out = Path(out_dir)
    tokenizer = tokenizer or byte_tokenizer()
    eos = tokenizer.eos_token_id
    hf_model = UltraMemForCausalLM.from_lm(model, eos_token_id=eos)
    hf_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def register() -> None:
    """Register the classes with the Auto factories (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, UltraMemConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(UltraMemConfig, UltraMemForCausalLM)
    except ValueError:
        pass


register()

__all__ = ["UltraMemConfig", "UltraMemForCausalLM", "byte_tokenizer", "export",
           "tokenizer_from_file", "register"]
