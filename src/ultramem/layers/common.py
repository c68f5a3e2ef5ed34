"""Helpers every sparse layer shares."""

from __future__ import annotations

from torch import Tensor, nn


def flatten_tokens(layer: nn.Module, u: Tensor) -> Tensor:
    """u [..., d_model] -> [T, d_model]; a wrong width raises an error naming the layer."""
    if u.shape[-1] != layer.d_model:
        raise ValueError(
            f"{type(layer).__name__}: input last dim {u.shape[-1]} != d_model={layer.d_model}"
        )
    return u.reshape(-1, layer.d_model)
