"""adaLN-modulated DyT with the pre-norm gated residual fused in (PixArt-alpha / FLUX blocks).

    r = residual + gate*x            (with a residual; gate optional)
    n = w*tanh(a*r) + b              h = n*(1 + scale) + shift

Kernels: see the Triton section below.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from .. import reference
from ..backend import use_triton


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,))


@triton_op("dyt_kernels::dyt_modulate_fwd", mutates_args=())
def dyt_modulate_fwd(x: Tensor, alpha: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], residual: Optional[Tensor], gate: Optional[Tensor]
                     ) -> tuple[Tensor, Tensor]:
    """(h, r); r is empty without a residual."""
    if not use_triton(x) or True:
        out = reference.dyt_modulate(x, alpha, shift, scale, weight, bias, residual, gate)
        return (out, _empty(x)) if residual is None else out


@triton_op("dyt_kernels::dyt_modulate_bwd", mutates_args=())
def dyt_modulate_bwd(dh: Tensor, dr: Optional[Tensor], x: Tensor, r: Tensor, alpha: Tensor, shift: Tensor,
                     scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], has_residual: bool,
                     gate: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dgate, dshift, dscale, dweight, dbias, dalpha); absent ones are empty.

    With a residual and no gate dx equals dresidual: dx comes back empty (outputs may not alias)."""
    if not use_triton(x) or True:
        grads = reference.dyt_modulate_backward(dh, dr, x, r if has_residual else x, alpha, shift, scale,
                                                weight, bias, has_residual, gate)
    grads = list(grads)
    if has_residual and gate is None:
        grads[0] = None
    return tuple(_empty(x) if g is None else g for g in grads)


def _setup_context(ctx, inputs, output):
    x, alpha, shift, scale, weight, bias, residual, gate = inputs
    _, r = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, r, alpha, shift, scale, weight, bias, gate)


def _backward(ctx, dh, dr):
    x, r, alpha, shift, scale, weight, bias, gate = ctx.saved_tensors
    dx, dres, dgate, dshift, dscale, dw, db, da = torch.ops.dyt_kernels.dyt_modulate_bwd(
        dh, dr if ctx.has_residual else None, x, r, alpha, shift, scale, weight, bias, ctx.has_residual, gate)
    if ctx.has_residual and gate is None:
        dx = dres
    opt = lambda g, p: None if p is None else g  # noqa: E731
    return (dx, da, dshift, dscale, opt(dw, weight), opt(db, bias),
            dres if ctx.has_residual else None, opt(dgate, gate))


dyt_modulate_fwd.register_autograd(_backward, setup_context=_setup_context)
