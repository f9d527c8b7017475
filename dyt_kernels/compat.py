"""Third-party code paths that assume a LayerNorm, kept working after the converter swaps it for DyT.

Each fix is keyed on public attributes and duck typing, so this file imports no third-party package.
"""
from __future__ import annotations

import functools

from torch import Tensor, nn

from .modules import DyT


def _norm_cross_with_dyt(attention: nn.Module, encoder_hidden_states: Tensor) -> Tensor:
    return attention.norm_cross(encoder_hidden_states)


def keep_third_party_paths_working(model: nn.Module) -> None:
    """Adjust modules whose own code special-cases LayerNorm, after their norms became DyT."""
    for m in model.modules():
        # nn.TransformerEncoder decides at construction, while its layers still hold LayerNorms, to
        # pack padded batches into nested tensors in eval + no_grad (its fast path). The layers then
        # refuse their fused LayerNorm kernel (DyT's eps reads NaN) and hand the nested tensor to DyT,
        # which cannot take one. use_nested_tensor is the encoder's public switch for that packing.
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(x, DyT) for x in m.layers.modules()):
            m.use_nested_tensor = False
        # diffusers' Attention.norm_encoder_hidden_states applies norm_cross only if it is an
        # nn.LayerNorm (a GroupNorm gets a transpose) and asserts False otherwise. DyT normalizes the
        # last dim like the LayerNorm it replaced, so the instance gets a method that just applies it.
        # A functools.partial of a module-level function keeps the model deep-copyable and picklable.
        if isinstance(getattr(m, "norm_cross", None), DyT) and callable(getattr(m, "norm_encoder_hidden_states", None)):
            m.norm_encoder_hidden_states = functools.partial(_norm_cross_with_dyt, m)
