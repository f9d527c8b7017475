"""The ops as torch.library custom ops, for torch.compile: the kernels stay in the graph, no break.

triton_op + wrap_triton let inductor see the Triton launches themselves. The eager path does not come
through here (autograd.py calls the launchers directly: torch.library's Python dispatch costs more
host time than the kernels take at small shapes). On CUDA tensors an op launches the kernels; on
others (CPU tensors in a compiled test, meta tensors) it computes with reference.py, so a compiled
graph keeps the same ops on any device.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import reference
from . import dyt as dyt_ops
from . import modulate as mod_ops


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,))


@triton_op("dyt_kernels::dyt_fwd", mutates_args=())
def dyt_fwd(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            channels_last: bool) -> Tensor:
    if x.is_cuda:
        return dyt_ops.forward(x, alpha, weight, bias, channels_last, launch=wrap_triton)
    return reference.dyt(x, alpha, weight, bias, channels_last)


@triton_op("dyt_kernels::dyt_bwd", mutates_args=())
def dyt_bwd(dy: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            channels_last: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dalpha, dweight, dbias); dweight/dbias are empty when weight/bias are None."""
    if x.is_cuda:
        dx, da, dw, db = dyt_ops.backward(dy, x, alpha, weight, bias, channels_last, launch=wrap_triton)
    else:
        dx, da, dw, db = reference.dyt_backward(dy, x, alpha, weight, bias, channels_last)
    return dx, da, _empty(x) if dw is None else dw, _empty(x) if db is None else db


def _dyt_setup(ctx, inputs, output):
    x, alpha, weight, bias, channels_last = inputs
    ctx.save_for_backward(x, alpha, weight, bias)
    ctx.channels_last = channels_last


def _dyt_backward(ctx, dy):
    x, alpha, weight, bias = ctx.saved_tensors
    dx, da, dw, db = torch.ops.dyt_kernels.dyt_bwd(dy, x, alpha, weight, bias, ctx.channels_last)
    return dx, da, None if weight is None else dw, None if bias is None else db, None


dyt_fwd.register_autograd(_dyt_backward, setup_context=_dyt_setup)


@triton_op("dyt_kernels::dyt_modulate_fwd", mutates_args=())
def dyt_modulate_fwd(x: Tensor, alpha: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], residual: Optional[Tensor], gate: Optional[Tensor]
                     ) -> tuple[Tensor, Tensor]:
    """(h, r); r is empty without a residual."""
    if x.is_cuda:
        h, r = mod_ops.forward(x, alpha, shift, scale, weight, bias, residual, gate, launch=wrap_triton)
    else:
        out = reference.dyt_modulate(x, alpha, shift, scale, weight, bias, residual, gate)
        h, r = (out, None) if residual is None else out
    return h, _empty(x) if r is None else r


@triton_op("dyt_kernels::dyt_modulate_bwd", mutates_args=())
def dyt_modulate_bwd(dh: Tensor, dr: Optional[Tensor], x: Tensor, r: Tensor, alpha: Tensor, shift: Tensor,
                     scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], gate: Optional[Tensor],
                     has_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dgate, dshift, dscale, dweight, dbias, dalpha), each shaped and typed like its
    input; absent ones come back empty, and so does dresidual, which equals dx without a gate
    (custom-op outputs may not alias)."""
    r = r if has_residual else x
    if x.is_cuda:
        grads = mod_ops.backward(dh, dr, x, r, alpha, shift, scale, weight, bias, gate, has_residual,
                                 launch=wrap_triton)
    else:
        grads = reference.dyt_modulate_grads(dh, dr, x, r, alpha, shift, scale, weight, bias, gate, has_residual)
    grads = list(grads)
    if has_residual and gate is None:
        grads[1] = None
    return tuple(_empty(x) if g is None else g for g in grads)


def _mod_setup(ctx, inputs, output):
    x, alpha, shift, scale, weight, bias, residual, gate = inputs
    _, r = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, r, alpha, shift, scale, weight, bias, gate)


def _mod_backward(ctx, dh, dr):
    x, r, alpha, shift, scale, weight, bias, gate = ctx.saved_tensors
    dx, dres, dgate, dshift, dscale, dw, db, da = torch.ops.dyt_kernels.dyt_modulate_bwd(
        dh, dr if ctx.has_residual else None, x, r, alpha, shift, scale, weight, bias, gate, ctx.has_residual)
    if ctx.has_residual and gate is None:
        dres = dx
    opt = lambda g, p: None if p is None else g  # noqa: E731
    return (dx, da, dshift, dscale, opt(dw, weight), opt(db, bias), dres if ctx.has_residual else None,
            opt(dgate, gate))


dyt_modulate_fwd.register_autograd(_mod_backward, setup_context=_mod_setup)
