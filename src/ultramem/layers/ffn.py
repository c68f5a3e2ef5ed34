"""The dense SwiGLU FFN: down(silu(gate x) * up x). The `dense` baseline is this FFN alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultramem.init import ffn_output_std, linear_std


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, n_layers: int) -> None:
        """gate and up std sqrt(2/(5h)), down further scaled by 1/sqrt(2L) (REFERENCE.md 4)."""
        h = self.gate.in_features
        self.gate.weight.normal_(std=linear_std(h), generator=generator)
        self.up.weight.normal_(std=linear_std(h), generator=generator)
        self.down.weight.normal_(std=ffn_output_std(h, n_layers), generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
