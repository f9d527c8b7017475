"""convert_layernorm_to_dyt: swap every LayerNorm (and optionally RMSNorm) of any model for DyT."""
from __future__ import annotations

import torch
from torch import nn

from .modules import DyT


def _norm_types(include_rmsnorm: bool) -> tuple[type, ...]:
    types: tuple[type, ...] = (nn.LayerNorm,)
    if include_rmsnorm and hasattr(nn, "RMSNorm"):
        types += (nn.RMSNorm,)
    return types


def _dyt_like(norm: nn.Module, fallback: nn.Module, alpha_init_value: float, copy_affine: bool) -> DyT:
    ref = next(norm.parameters(), None)
    if ref is None:  # a norm without affine parameters: follow the surrounding model's placement
        ref = next(fallback.parameters(), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    new = DyT(norm.normalized_shape, elementwise_affine=weight is not None, bias=bias is not None,
              device=device, dtype=dtype, alpha_init_value=alpha_init_value)
    new.train(norm.training)
    for name in ("weight", "bias"):
        old_p, new_p = getattr(norm, name, None), getattr(new, name)
        if old_p is None:
            continue
        if copy_affine:
            with torch.no_grad():
                new_p.copy_(old_p)
        new_p.requires_grad_(old_p.requires_grad)
    return new


def convert_layernorm_to_dyt(model: nn.Module, *, alpha_init_value: float = 0.5, include_rmsnorm: bool = False,
                             copy_affine: bool = True) -> nn.Module:
    """Replace every nn.LayerNorm (and nn.RMSNorm when include_rmsnorm) in ``model`` with DyT, in place.

    Each DyT keeps the old norm's normalized_shape, device, dtype, train/eval mode and the
    requires_grad of its affine parameters, and by default (copy_affine) their values. alpha starts
    at alpha_init_value. Returns the model; if ``model`` itself is a norm, returns its replacement.

    >>> import torch
    >>> from dyt_kernels import convert_layernorm_to_dyt
    >>> layer = torch.nn.TransformerEncoderLayer(64, 4, batch_first=True)
    >>> layer = convert_layernorm_to_dyt(layer)
    >>> type(layer.norm1).__name__
    'DyT'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    types = _norm_types(include_rmsnorm)
    if isinstance(model, types):
        return _dyt_like(model, model, alpha_init_value, copy_affine)
    # One DyT per norm *instance*: a norm registered in several places (weight tying) stays shared.
    # _modules is walked directly because named_children() skips a module's repeats.
    replaced: dict[int, DyT] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, types):
                if id(child) not in replaced:
                    replaced[id(child)] = _dyt_like(child, model, alpha_init_value, copy_affine)
                setattr(parent, name, replaced[id(child)])
    return model
