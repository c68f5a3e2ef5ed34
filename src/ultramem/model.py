"""`ultramem.LM`: a decoder-only transformer with a memory layer next to the FFN.

Per block (pre-norm): x = x + attn(n1(x)); u = n2(x); x = x + ffn(u) + memory(u).
Attention: RoPE, optional QK-norm, causal `scaled_dot_product_attention`. FFN: SwiGLU.
The sparse layer is built from `cfg.memory` (kind and placement), so baselines slot in by config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.config import ModelConfig
from ultramem.layers import build_memory_layer, build_value_store
from ultramem.layers.ffn import SwiGLU


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d]
        return self.proj(y.transpose(1, 2).reshape(b, t, h))


class SkipCarry:
    """Outputs of skip-layer sparse layers (UltraMem v1) waiting for the block they join.

    Block `read` stores its layer's output under the index of block `write`, which adds it to the
    residual after its own update. Entries are overwritten, never accumulated, so an interrupted
    forward leaves nothing behind that the next one would add.
    """

    def __init__(self) -> None:
        self.pending: dict[int, Tensor] = {}


class Block(nn.Module):
    """Pre-norm block: x = x + attn(n1(x)); u = n2(x); x = x + ffn(u) + sparse(u).

    has_ffn=False drops the FFN where the sparse layer replaces it (MoE, PKM, PEER, Memory+).
    write_at: the block after which the sparse layer's output joins the residual (default: this
    one); a later block means skip-layer placement, handed over through the shared `carry`.
    """

    def __init__(self, cfg: ModelConfig, memory: nn.Module | None, *, has_ffn: bool = True,
                 index: int = 0, write_at: int | None = None, carry: SkipCarry | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden) if has_ffn else None
        self.memory = memory
        self.index = index
        self.write_at = index if write_at is None else write_at
        if self.write_at != index and carry is None:
            raise ValueError(f"block {index}: output to block {self.write_at} needs a carry")
        self.carry = carry

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        u = self.ffn_norm(x)  # the FFN's input is also the memory's input
        out = self.ffn(u) if self.ffn is not None else None
        if self.memory is not None:
            mem = self.memory(u)
            if self.write_at == self.index:
                out = mem if out is None else out + mem
            else:
                self.carry.pending[self.write_at] = mem
        if out is not None:
            x = x + out
        if self.carry is not None:
            late = self.carry.pending.pop(self.index, None)
            if late is not None:
                x = x + late
        return x


class LM(nn.Module):
    """Decoder-only LM. `model(idx [B, T], targets=None) -> (logits [B, T, V], loss or None)`.

    targets use -100 for positions to ignore. When gradients are enabled, auxiliary losses of the
    sparse layers (off by default) are added to the loss; `aux_loss` keeps the last one.
    """

    def __init__(self, cfg: ModelConfig, *, seed: int = 0, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.value_store = build_value_store(cfg)
        writes = dict(cfg.memory_placement)  # read block -> write block
        ffn_blocks = set(cfg.ffn_blocks)
        carry = SkipCarry() if any(r != w for r, w in writes.items()) else None
        blocks, slot = [], 0
        for i in range(cfg.n_layers):
            memory = None
            if i in writes:
                memory = build_memory_layer(cfg, slot=slot, store=self.value_store)
                slot += 1
            blocks.append(Block(cfg, memory, has_ffn=i in ffn_blocks, index=i,
                                write_at=writes.get(i, i), carry=carry))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.aux_loss: Tensor | None = None
        if init:
            from ultramem.init import init_lm

            init_lm(self, seed=seed)

    def memory_layers(self) -> list[nn.Module]:
        """The sparse memory layers, in block order."""
        return [b.memory for b in self.blocks if b.memory is not None]

    def _check_input(self, idx: Tensor) -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be an integer [B, T] tensor, got {idx.dtype} {tuple(idx.shape)}")
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} > max_seq_len={self.cfg.max_seq_len}")
        # Range check only where it costs no device sync; on GPUs the embedding asserts instead.
        if idx.device.type == "cpu" and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, vocab_size={self.cfg.vocab_size}), got [{lo}, {hi}]"
                )

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        self._check_input(idx)
        t = idx.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(idx)  # [B, T, h]
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        logits = self.head(x) if self.head is not None else F.linear(x, self.embed.weight)
        aux = None
        if torch.is_grad_enabled():
            for layer in self.memory_layers():
                extra = layer.pop_aux_loss()
                if extra is not None:
                    aux = extra if aux is None else aux + extra
        self.aux_loss = aux
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100)
        return logits, loss if aux is None else loss + aux

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Sample continuations of idx [B, T] (greedy when temperature == 0)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.max_seq_len:])
            logits = logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
