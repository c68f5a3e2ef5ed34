"""`ultramem.LM`: a decoder-only transformer with a memory layer next to the FFN.

Per block (pre-norm): x = x + attn(n1(x)); u = n2(x); x = x + ffn(u) + memory(u).
Attention: RoPE, optional QK-norm, causal `scaled_dot_product_attention`. FFN: SwiGLU.
The sparse layer is built from `cfg.memory` (kind and placement), so baselines slot in by config.

Build first, initialise after: constructing an `LM` allocates its modules (also on the meta
device); `LM.init_weights(seed)` then sets every parameter and computed buffer, each module
through its own `init_weights`/`reset_parameters` (formulas in `ultramem.init`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ultramem.config import ModelConfig
from ultramem.init import init_lm, linear_std
from ultramem.layers import build_memory_layer, build_value_store
from ultramem.layers.ffn import SwiGLU
from ultramem.retrieval import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        # float32 whatever the input (bf16 activations, autocast); torch's fused kernel
        return rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables [max_len, head_dim / 2] for rotary position embeddings."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x [B, H, T, d] by position."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, causal: bool) -> Tensor:
    """Scaled dot-product attention, q [B, H, T, d], k and v [B, H, S, d] -> [B, H, T, d].

    On CPU, bf16 attention with gradients runs in float32: there the fused CPU kernel's bf16
    backward is slower than its float32 one (measured 62 vs 44 ms per layer at the `small` shapes,
    `benchmarks/throughput.py`), and float32 is the more accurate of the two.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               is_causal=causal)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class KVCache:
    """Keys and values of every attention layer for the tokens seen so far (incremental decoding).

    Per layer a [B, H, capacity, d] buffer for keys and one for values; `pos` tokens are stored, so
    the next token sits at RoPE position `pos`. `LM.forward(idx, cache=cache)` appends idx's keys
    and values and advances `pos`. `capacity` tokens are allocated up front (None: `max_len`,
    default `cfg.max_seq_len`); beyond that the buffers grow by doubling up to `max_len`.
    Serving (`LM.generate`) allocates prompt + new tokens at once, so decoding never reallocates.
    The FFN and memory layers act on each token alone and need no cache.
    """

    def __init__(self, cfg: ModelConfig, batch: int, *, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 capacity: int | None = 64):
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.batch, self.n_layers = batch, cfg.n_layers
        self.pos = 0
        cap = self.max_len if capacity is None else max(1, min(capacity, self.max_len))
        shape = (batch, cfg.n_heads, cap, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]

    @classmethod
    def for_model(cls, model: LM, batch: int, **kwargs) -> KVCache:
        """An empty cache on the model's device, in its dtype (the serving dtype once cast)."""
        w = model.embed.weight
        return cls(model.cfg, batch, device=w.device, dtype=w.dtype, **kwargs)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, total: int) -> None:
        """Make room for `total` tokens (growing by doubling, at most max_len)."""
        if total > self.max_len:
            raise ValueError(f"KVCache: {total} tokens exceed max_len={self.max_len}")
        if total <= self.capacity:
            return
        cap = min(max(total, 2 * self.capacity), self.max_len)
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                grown = buf.new_zeros(*buf.shape[:2], cap, buf.shape[3])
                grown[:, :, : self.pos] = buf[:, :, : self.pos]
                store[i] = grown

    def advance(self, t: int) -> None:
        self.pos += t

    def reorder_cache(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search, dropping finished sequences)."""
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                store[i] = buf.index_select(0, index.to(buf.device))
        self.batch = int(index.numel())


class LayerCache:
    """What one attention layer needs beyond its input for one forward: its slot in a `KVCache`
    (or none) and the step's attention mask ([B, 1, T, pos + T] bool, True = attend; None = causal).
    """

    def __init__(self, cache: KVCache | None, index: int, mask: Tensor | None):
        self.cache, self.index, self.mask = cache, index, mask

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, H, T, d] at positions pos..pos+T-1; return all keys and values so far."""
        if self.cache is None:
            return k, v
        c, end = self.cache, self.cache.pos + k.shape[2]
        c.keys[self.index][:, :, c.pos:end] = k
        c.values[self.index][:, :, c.pos:end] = v
        return c.keys[self.index][:, :, :end], c.values[self.index][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Both maps std sqrt(2/(5h)) (REFERENCE.md section 4), QK-norm gains 1."""
        std = linear_std(self.qkv.in_features)
        for lin in (self.qkv, self.proj):
            lin.weight.normal_(std=std, generator=generator)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                cache: LayerCache | None = None) -> Tensor:
        """x [B, T, h]; cos/sin [T, d/2] for the positions of x (offset by the cache position)."""
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            mask = cache.mask
            k, v = cache.update(k, v)  # [B, H, pos + T, d]
        # No mask means causal: with a cache that holds only for T == 1 or an empty cache
        # (LM.forward builds an explicit mask otherwise).
        y = attention(q, k, v, mask, causal=mask is None and t > 1)  # [B, H, T, d]
        return self.proj(y.transpose(1, 2).reshape(b, t, h))


class Block(nn.Module):
    """Pre-norm block: x = x + attn(n1(x)); u = n2(x); x = x + ffn(u) + sparse(u).

    has_ffn=False drops the FFN where the sparse layer replaces it (MoE, PKM, PEER, Memory+).
    write_at: the block after which the sparse layer's output joins the residual (default: this
    one); a later block means skip-layer placement (UltraMem v1): the output is returned and
    `LM.forward` hands it to block `write_at` as `late`.

    forward keeps no state between calls (what it hands on, it returns), so activation
    checkpointing may run it a second time.
    """

    def __init__(self, cfg: ModelConfig, memory: nn.Module | None, *, has_ffn: bool = True,
                 index: int = 0, write_at: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden) if has_ffn else None
        self.memory = memory
        self.index = index
        self.write_at = index if write_at is None else write_at

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, n_layers: int) -> None:
        """The dense parts: norms, attention, FFN. The sparse layer is initialised by
        `ultramem.init.init_lm` after every block's dense parts (its balance target needs them
        all; the random draws keep that order)."""
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attn.init_weights(generator)
        if self.ffn is not None:
            self.ffn.init_weights(generator, n_layers)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None,
                late: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x [B, T, h] -> (x [B, T, h], carried, aux).

        late: an earlier block's sparse output that joins the residual here (skip placement).
        carried: this block's sparse output for block `write_at` when that is a later block,
        else None. aux: the sparse layer's auxiliary loss of this call (None if off or without
        gradients)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        u = self.ffn_norm(x)  # the FFN's input is also the memory's input
        out = self.ffn(u) if self.ffn is not None else None
        carried = aux = None
        if self.memory is not None:
            mem = self.memory(u)
            aux = self.memory.pop_aux_loss() if torch.is_grad_enabled() else None
            if self.write_at == self.index:
                out = mem if out is None else out + mem
            else:
                carried = mem
        if out is not None:
            x = x + out
        if late is not None:
            x = x + late
        return x, carried, aux


@contextmanager
def restoring_buffers(module: nn.Module):
    """Put back every buffer of module that the enclosed code changes in place.

    Activation checkpointing runs a block's forward a second time during the backward; buffers
    a forward updates (BatchNorm running statistics of PKM/PEER queries, the pre-selection
    direction of `TuckerProductKeys`) must advance once per step, not twice."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                # by value: BatchNorm's kernel updates its statistics without a version bump
                if not torch.equal(buf, value):
                    buf.copy_(value)


class LM(nn.Module):
    """Decoder-only LM. `model(idx [B, T], targets=None) -> (logits [B, T, V], loss or None)`.

    targets use -100 for positions to ignore. When gradients are enabled, auxiliary losses of the
    sparse layers (off by default) are added to the loss; `aux_loss` keeps the last one.

    init=False only builds (tables allocated empty, torch's default init elsewhere, buffers
    computed): for loading weights, or on the meta device followed by `to_empty` and
    `init_weights(seed)`.
    activation_checkpointing: recompute each block's activations in the backward instead of
    keeping them (`torch.utils.checkpoint`, non-reentrant); same gradients, less memory.
    """

    def __init__(self, cfg: ModelConfig, *, seed: int = 0, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.value_store = build_value_store(cfg)
        writes = dict(cfg.memory_placement)  # read block -> write block
        ffn_blocks = set(cfg.ffn_blocks)
        blocks, slot = [], 0
        for i in range(cfg.n_layers):
            memory = None
            if i in writes:
                memory = build_memory_layer(cfg, slot=slot, store=self.value_store)
                slot += 1
            blocks.append(Block(cfg, memory, has_ffn=i in ffn_blocks, index=i,
                                write_at=writes.get(i, i)))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = (None if cfg.tie_embeddings
                     else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False))
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.aux_loss: Tensor | None = None
        self.activation_checkpointing = False
        if init:
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Set every parameter and computed buffer from `seed` (REFERENCE.md section 4,
        `ultramem.init.init_lm`): the same seed gives the same weights, bit for bit, whether the
        model was built here or on the meta device and moved with `to_empty(device="cpu")`."""
        if any(t.is_meta for t in (*self.parameters(), *self.buffers())):
            raise ValueError("LM.init_weights: the model is on the meta device; allocate it "
                             "first with model.to_empty(device=...)")
        init_lm(self, seed=seed)

    @torch.no_grad()
    def init_rope(self) -> None:
        """(Re)compute the RoPE tables, float32 on the model's device (buffers not saved)."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos = cos.to(self.rope_cos.device)
        self.rope_sin = sin.to(self.rope_sin.device)

    def _apply(self, fn, recurse=True):
        # RoPE tables stay float32 whatever dtype the weights are cast to (bf16 positions would
        # lose precision): rebuild them on their new device after every .to()/.half()/...
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.init_rope()
        return self

    def memory_layers(self) -> list[nn.Module]:
        """The sparse memory layers, in block order."""
        return [b.memory for b in self.blocks if b.memory is not None]

    def _check_input(self, idx: Tensor, past: int = 0) -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"idx must be an integer [B, T] tensor, got {idx.dtype} {tuple(idx.shape)}"
            )
        self._check_length(idx.shape[1], past)
        # Range check only where it costs no device sync; on GPUs the embedding asserts instead.
        if idx.device.type == "cpu" and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, vocab_size={self.cfg.vocab_size}), got [{lo}, {hi}]"
                )

    def _check_length(self, t: int, past: int) -> None:
        if past + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past} cached + {t} new > "
                             f"max_seq_len={self.cfg.max_seq_len}")

    def _embed(self, idx: Tensor | None, inputs_embeds: Tensor | None, past: int) -> Tensor:
        """Token ids [B, T] or given embeddings [B, T, h] -> the first residual [B, T, h]."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of idx (token ids) and inputs_embeds")
        if idx is not None:
            self._check_input(idx, past)
            return self.embed(idx)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.d_model:
            raise ValueError(f"inputs_embeds must be [B, T, d_model={self.cfg.d_model}], got "
                             f"{tuple(inputs_embeds.shape)}")
        self._check_length(inputs_embeds.shape[1], past)
        return inputs_embeds

    @staticmethod
    def _attention_mask(t: int, past: int, attention_mask: Tensor | None,
                        device: torch.device) -> Tensor | None:
        """The [B or 1, 1, T, past + T] bool mask of one forward, or None when plain causal does."""
        if attention_mask is None and (past == 0 or t == 1):
            return None
        total = past + t
        q_pos = torch.arange(past, total, device=device)
        k_pos = torch.arange(total, device=device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, past + T]
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != total:
                raise ValueError(f"attention_mask must be [B, past + T] = [B, {total}], "
                                 f"got {tuple(attention_mask.shape)}")
            keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
            # A padding query may see no real key; letting every query see itself keeps its
            # softmax finite (its output is never read by a real token).
            mask = (mask & keep) | (k_pos[None, :] == q_pos[:, None])[None, None]
        return mask

    def forward(self, idx: Tensor | None = None, targets: Tensor | None = None, *,
                cache: KVCache | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, output_hidden_states: bool = False
                ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, list[Tensor]]:
        """idx [B, T] -> (logits [B, T, V], loss or None).

        cache: a `KVCache` holding the previous tokens; idx continues them (RoPE positions start at
        cache.pos) and the cache advances by T. attention_mask: [B, past + T], 1 for real tokens and
        0 for padding (left-padded batches); padding keys are never attended to.
        inputs_embeds [B, T, h] replaces idx (embeddings computed elsewhere, e.g. `self.embed`).
        output_hidden_states: also return the n_layers + 1 hidden states [B, T, h] in Hugging
        Face's order: the embeddings, the output of every block but the last, and the final
        normed output (what the head reads).
        """
        past = 0 if cache is None else cache.pos
        x = self._embed(idx, inputs_embeds, past)  # [B, T, h]
        b, t = x.shape[:2]
        cos, sin = self.rope_cos[past:past + t], self.rope_sin[past:past + t]
        mask = self._attention_mask(t, past, attention_mask, x.device)
        if cache is not None:
            if cache.batch != b:
                raise ValueError(f"cache holds batch {cache.batch}, input has batch {b}")
            cache.reserve(past + t)
        plain = cache is None and mask is None
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        hidden = [x] if output_hidden_states else None
        pending: dict[int, Tensor] = {}  # skip placement: block index -> sparse output to add
        aux = None
        for i, block in enumerate(self.blocks):
            layer_cache = None if plain else LayerCache(cache, i, mask)
            args = (x, cos, sin, layer_cache, pending.pop(i, None))
            if recompute:
                x, carried, extra = checkpoint(
                    block, *args, use_reentrant=False,
                    context_fn=lambda block=block: (nullcontext(), restoring_buffers(block)))
            else:
                x, carried, extra = block(*args)
            if carried is not None:
                pending[block.write_at] = carried
            if extra is not None:
                aux = extra if aux is None else aux + extra
            if hidden is not None and i < len(self.blocks) - 1:
                hidden.append(x)
        if cache is not None:
            cache.advance(t)
        x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        logits = self.head(x) if self.head is not None else F.linear(x, self.embed.weight)
        self.aux_loss = aux
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                   targets.reshape(-1), ignore_index=-100)
            loss = loss if aux is None else loss + aux
        return (logits, loss, hidden) if output_hidden_states else (logits, loss)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, *,
                 attention_mask: Tensor | None = None, eos_token_id: int | None = None,
                 use_cache: bool = True) -> Tensor:
        """Continue idx [B, T] by max_new_tokens tokens -> [B, T + max_new_tokens].

        temperature == 0 is greedy; otherwise sample from softmax(logits / temperature), restricted
        to the top_k tokens and/or the smallest set whose probability reaches top_p.
        attention_mask [B, T] marks real tokens of left-padded prompts (1) and padding (0).
        After a row emits eos_token_id it repeats it; generation stops once every row has.
        With use_cache, each step runs only the new token against a `KVCache` allocated once for
        prompt + new tokens; when the sequence reaches max_seq_len the cache is refilled from the
        last max_seq_len // 2 tokens (without a cache, each step reads the last max_seq_len
        tokens, as a full forward would). UltraMemV2 layers run their decode step
        (`ultramem.serve`) for the call; a model cast by `prepare_for_serving` keeps its own.
        """
        from ultramem.serve import decoding

        with decoding(self):
            return self._generate(idx, max_new_tokens, temperature, top_k, top_p, generator,
                                  attention_mask, eos_token_id, use_cache)

    def _generate(self, idx: Tensor, max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, generator: torch.Generator | None,
                  attention_mask: Tensor | None, eos_token_id: int | None,
                  use_cache: bool) -> Tensor:
        b = idx.shape[0]
        mask = None if attention_mask is None else attention_mask.to(idx.device, torch.long)
        done = torch.zeros(b, dtype=torch.bool, device=idx.device)
        cache: KVCache | None = None
        fed = 0  # tokens of idx the cache holds
        limit = self.cfg.max_seq_len
        for _ in range(max_new_tokens):
            if not use_cache:
                window = idx[:, -limit:]
                wmask = None if mask is None else mask[:, -limit:]
                logits, _ = self(window, attention_mask=wmask)
            else:
                if cache is None or cache.pos + (idx.shape[1] - fed) > limit:
                    keep = min(idx.shape[1], limit if cache is None else limit // 2)
                    need = min(limit, keep + max_new_tokens)
                    cache, fed = KVCache.for_model(self, b, capacity=need), idx.shape[1] - keep
                new = idx[:, fed:]
                cmask = None if mask is None else mask[:, idx.shape[1] - cache.pos - new.shape[1]:]
                logits, _ = self(new, cache=cache, attention_mask=cmask)
                fed = idx.shape[1]
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # [B, 1]
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done[:, None], eos_token_id)
                done |= nxt[:, 0] == eos_token_id
            idx = torch.cat([idx, nxt], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return idx


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids [B, 1] from last-position logits [B, V]; temperature == 0 is greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        # Drop a token when the more likely tokens before it already reach top_p (keeps >= 1).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
