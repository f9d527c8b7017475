"""The paths a call takes once functional.py has chosen Triton: lean autograd Functions.

Eager: `DyTFunction` / `DyTModulateFunction` call the launchers directly (no torch.library dispatch:
at small shapes the host is the cost). Under torch.compile (with the default backend), `DyTFused` /
`DyTModulateFused` give the compiler the forward as pointwise torch ops, which inductor fuses into
the ops around it, and keep our backward kernels (custom ops from ops/library.py) for the reductions
the compiler does poorly. `use_backend("triton")` under compile calls the custom ops for both
directions instead. All three are tested against the same float64 oracle.
"""
from __future__ import annotations

import torch

from . import reference
from .ops import dyt as dyt_ops
from .ops import library  # noqa: F401  (registers torch.ops.dyt_kernels.*)
from .ops import modulate as mod_ops


def _shift_grad(dshift, dh, shift):
    """dshift, or dh itself where shift is per token (its gradient is the upstream gradient)."""
    if dshift is None or dshift.numel() == 0 and shift.numel() != 0:
        return dh if dh.dtype == shift.dtype else dh.to(shift.dtype)
    return dshift


class DyTFunction(torch.autograd.Function):
    """Eager Triton path; `slot` carries the call signature's cached launch configurations."""

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, channels_last, slot):
        ctx.save_for_backward(x, alpha, weight, bias)
        ctx.channels_last = channels_last
        ctx.slot = slot
        return dyt_ops.forward(x, alpha, weight, bias, channels_last, None, slot)

    @staticmethod
    def backward(ctx, dy):
        x, alpha, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty): the kernels are not differentiable, the
            # reference formulas are; they give the same gradients in torch ops autograd can follow.
            dx, da, dw, db = reference.dyt_backward(dy, x, alpha, weight, bias, ctx.channels_last)
        else:
            dx, da, dw, db = dyt_ops.backward(dy, x, alpha, weight, bias, ctx.channels_last, slot=ctx.slot)
        return dx, da, dw, db, None, None


class DyTReference(torch.autograd.Function):
    """The torch backend in eager mode: reference.py's forward and its explicit VJP formulas."""

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, channels_last):
        ctx.save_for_backward(x, alpha, weight, bias)
        ctx.channels_last = channels_last
        return reference.dyt(x, alpha, weight, bias, channels_last)

    @staticmethod
    def backward(ctx, dy):
        x, alpha, weight, bias = ctx.saved_tensors
        dx, da, dw, db = reference.dyt_backward(dy, x, alpha, weight, bias, ctx.channels_last)
        return dx, da, dw, db, None


class DyTFused(torch.autograd.Function):
    """Compiled path: pointwise forward (the compiler fuses it), our kernel for the backward."""

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, channels_last):
        ctx.save_for_backward(x, alpha, weight, bias)
        ctx.channels_last = channels_last
        return reference.dyt(x, alpha, weight, bias, channels_last)

    @staticmethod
    def backward(ctx, dy):
        x, alpha, weight, bias = ctx.saved_tensors
        dx, da, dw, db = torch.ops.dyt_kernels.dyt_bwd(dy, x, alpha, weight, bias, ctx.channels_last)
        return dx, da, None if weight is None else dw, None if bias is None else db, None


class DyTModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, shift, scale, weight, bias, residual, gate):
        h, r = mod_ops.forward(x, alpha, shift, scale, weight, bias, residual, gate)
        ctx.save_for_backward(x, r, alpha, shift, scale, weight, bias, gate)
        ctx.has_residual = residual is not None
        return h if r is None else (h, r)

    @staticmethod
    def backward(ctx, dh, dr=None):
        x, r, alpha, shift, scale, weight, bias, gate = ctx.saved_tensors
        # create_graph=True: the differentiable reference formulas (see DyTFunction.backward).
        grads = reference.dyt_modulate_grads if torch.is_grad_enabled() else mod_ops.backward
        dx, dres, dgate, dshift, dscale, dw, db, da = grads(
            dh, dr, x, r if ctx.has_residual else x, alpha, shift, scale, weight, bias, gate, ctx.has_residual)
        return dx, da, _shift_grad(dshift, dh, shift), dscale, dw, db, dres, dgate


class DyTModulateReference(torch.autograd.Function):
    """The torch backend in eager mode: reference.py's forward and its explicit VJP formulas."""

    @staticmethod
    def forward(ctx, x, alpha, shift, scale, weight, bias, residual, gate):
        out = reference.dyt_modulate(x, alpha, shift, scale, weight, bias, residual, gate)
        h, r = (out, None) if residual is None else out
        ctx.save_for_backward(x, r, alpha, shift, scale, weight, bias, gate)
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, dh, dr=None):
        x, r, alpha, shift, scale, weight, bias, gate = ctx.saved_tensors
        dx, dres, dgate, dshift, dscale, dw, db, da = reference.dyt_modulate_grads(
            dh, dr, x, r if ctx.has_residual else x, alpha, shift, scale, weight, bias, gate, ctx.has_residual)
        return dx, da, _shift_grad(dshift, dh, shift), dscale, dw, db, dres, dgate


class DyTModulateFused(torch.autograd.Function):
    """Compiled path for dyt_modulate: pointwise forward, our kernels for the backward."""

    @staticmethod
    def forward(ctx, x, alpha, shift, scale, weight, bias, residual, gate):
        out = reference.dyt_modulate(x, alpha, shift, scale, weight, bias, residual, gate)
        h, r = (out, None) if residual is None else out
        ctx.save_for_backward(x, r, alpha, shift, scale, weight, bias, gate)
        ctx.has_residual = residual is not None
        return h if r is None else (h, r)

    @staticmethod
    def backward(ctx, dh, dr=None):
        x, r, alpha, shift, scale, weight, bias, gate = ctx.saved_tensors
        r = r if ctx.has_residual else x
        dx, dres, dgate, dshift, dscale, dw, db, da = torch.ops.dyt_kernels.dyt_modulate_bwd(
            dh, dr, x, r, alpha, shift, scale, weight, bias, gate, ctx.has_residual)
        if ctx.has_residual and gate is None:
            dres = dx.to(r.dtype)
        opt = lambda g, p: None if p is None else g  # noqa: E731
        return (dx, da, _shift_grad(dshift, dh, shift), dscale, opt(dw, weight), opt(db, bias),
                dres if ctx.has_residual else None, opt(dgate, gate))
