"""Hugging Face transformers adapter (optional extra `hf`): a thin wrapper over `ultramem.LM`.

`UltraMemConfig` carries the whole `ModelConfig` (field `ultramem`, its `to_dict()`) and mirrors
the standard names (`hidden_size`, `num_hidden_layers`, ...) for HF tooling.
`UltraMemForCausalLM` holds one `LM` as `self.model`: no second copy of the network, so every
architecture the project builds (UltraMemV2, MoE, PKM, PEER, Memory+, UltraMem v1, dense) loads
the same way. `generate()` runs on our `KVCache`, allocated once for prompt + new tokens, with the
UltraMemV2 decode steps of `ultramem.serve` (`ultramem.serve.prepare_for_serving(hf.model,
"bf16")` casts the weights for serving). An exported folder (`export`) names its classes in
config.json's `auto_map` and carries two small modules importing them from here, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it in any process
with ultramem installed (lm-eval's `hf` backend included). Importing this module registers both
classes with `AutoConfig` / `AutoModelForCausalLM`, so after `import ultramem.hf` no
trust_remote_code is needed; `import ultramem` alone does not import transformers (it takes
seconds).

The `LM` is built, then initialised by transformers' `post_init` through `_init_weights` (our
`LM.init_weights`, seed 0), or built on the meta device by from_pretrained and loaded.
`gradient_checkpointing_enable()` switches on `LM.activation_checkpointing`; `inputs_embeds`,
`output_hidden_states` and `return_dict=False` behave as in transformers' own models.

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
from ultramem.model import LM, KVCache

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
    _no_split_modules = ["Block"]  # a block's residual, attention and sparse layer stay together
    # Nothing to tie: with tie_embeddings the output layer reads `model.embed.weight` itself (no
    # head parameter, `get_output_embeddings()` is None), so a tied model saves one matrix.
    _tied_weights_keys: dict[str, str] = {}
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config: UltraMemConfig, model: LM | None = None):
        super().__init__(config)
        if model is None:
            # Build only: post_init() initialises (`_init_weights`), unless from_pretrained builds
            # on the meta device and loads the weights instead.
            model = LM(config.to_model_config(), init=False)
        else:
            model._is_hf_initialized = True  # a wrapped model keeps its weights
        self.model = model
        self.post_init()

    @classmethod
    def from_lm(cls, model: LM, **config_kwargs: Any) -> UltraMemForCausalLM:
        """Wrap an existing `LM` (shares its tensors, copies nothing)."""
        return cls(UltraMemConfig.from_model_config(model.cfg, **config_kwargs), model=model)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> UltraMemForCausalLM:
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        # transformers hands over tensors mapped straight from the safetensors file, at the file's
        # offsets: 8-byte aligned, not 64. Some CPU kernels vectorise by address (the pre-value
        # dot products of `ultramem.ops.gather_dot`, ATen's embedding_bag weight kernel) and then
        # round differently (~1e-7). Moving such tensors to fresh (aligned) storage makes a loaded
        # model compute bit-identically to the one that was saved. Not an init matter: the weights
        # are equal either way.
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.data_ptr() % 64:
                    t.data = t.data.clone()
        return loaded

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generation uses our own KVCache, created in forward

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """transformers calls this for every module not loaded whole from a checkpoint; the
        whole `LM` is initialised by its own `init_weights` (seed 0), so only `LM` is handled.
        After from_pretrained: the RoPE tables (not saved) are computed, and tensors a
        checkpoint lacks take the values of a new model (parameters initialised with seed 0,
        buffers as built: shuffles, a fresh pre-selection direction)."""
        if not isinstance(module, LM):
            return
        state = module.state_dict(keep_vars=True)
        missing = [k for k, t in state.items() if not getattr(t, "_is_hf_initialized", False)]
        if len(missing) == len(state):  # a new model
            module.init_weights(seed=0)
            return
        module.init_rope()
        if missing:
            source = LM(module.cfg, init=False).state_dict()  # buffers as built
            if {k for k, _ in module.named_parameters()} & set(missing):
                source.update(LM(module.cfg, seed=0).named_parameters())
            for key in missing:
                state[key].copy_(source[key])

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

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: KVCache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                output_hidden_states: bool | None = None, **kwargs: Any
                ) -> CausalLMOutputWithPast | tuple:
        """HF convention: labels are the inputs (shifted inside), -100 ignored. inputs_embeds
        [B, T, h] replaces input_ids; output_hidden_states gives n_layers + 1 hidden states (see
        `LM.forward`); return_dict=False returns the output's fields as a tuple."""
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"{type(self).__name__} needs an ultramem KVCache, got {type(cache)}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if use_cache and cache is None:
            cap = getattr(self, "_cache_len", None) or 64  # set by generate(): prompt + new
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            cache = _GenerationCache.for_model(self.model, batch, capacity=cap)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # plain causal attention is faster and the same
        targets = None
        if labels is not None:
            targets = torch.full_like(labels, -100)
            targets[:, :-1] = labels[:, 1:]
        logits, loss, *hidden = self.model(
            input_ids, targets, cache=cache if use_cache else None, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, output_hidden_states=bool(output_hidden_states))
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None,
                                     hidden_states=tuple(hidden[0]) if hidden else None)
        return out if return_dict else out.to_tuple()

    # -- activation checkpointing (transformers' gradient_checkpointing_enable) -------------

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether `LM.activation_checkpointing` is on (the flag transformers looks for)."""
        return self.model.activation_checkpointing

    def _set_gradient_checkpointing(self, enable: bool = True,
                                    gradient_checkpointing_func: Any = None,
                                    every_n_layers: int = 1) -> None:
        # LM checkpoints every block itself (torch.utils.checkpoint, use_reentrant=False, buffers
        # restored after recomputation), so transformers' checkpoint function is not used.
        if every_n_layers != 1:
            raise ValueError(f"every_n_layers: {type(self).__name__} checkpoints every block, "
                             f"got {every_n_layers}")
        self.model.activation_checkpointing = enable


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


def _remote_module(class_name: str) -> str:
    """The source of a module an exported folder carries for `trust_remote_code`: it imports the
    class from the installed `ultramem` package (no second copy of the model in the folder)."""
    return (f'"""{class_name} of the installed ultramem package, for transformers\'\n'
            f'trust_remote_code (pip install "ultramem[hf]")."""\n\n'
            f"from ultramem.hf import {class_name}\n\n__all__ = [{class_name!r}]\n")


REMOTE_CODE = {"configuration_ultramem.py": _remote_module("UltraMemConfig"),
               "modeling_ultramem.py": _remote_module("UltraMemForCausalLM")}
AUTO_MAP = {"AutoConfig": "configuration_ultramem.UltraMemConfig",
            "AutoModelForCausalLM": "modeling_ultramem.UltraMemForCausalLM"}


def export(model: LM, out_dir: str | Path, tokenizer: PreTrainedTokenizerFast | None = None
           ) -> Path:
    """Write `model` (and its tokenizer, bytes by default) as a transformers folder.

    config.json's `auto_map` names the two small modules written beside it (`REMOTE_CODE`), so
    `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)` loads the folder in
    a process that has not imported `ultramem` (lm-eval's `hf` backend, for one)."""
    out = Path(out_dir)
    tokenizer = tokenizer or byte_tokenizer()
    eos = tokenizer.eos_token_id
    hf_model = UltraMemForCausalLM.from_lm(model, eos_token_id=eos, auto_map=dict(AUTO_MAP))
    hf_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name, code in REMOTE_CODE.items():
        (out / name).write_text(code)
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
