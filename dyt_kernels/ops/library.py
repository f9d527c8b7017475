"""The ops as torch.library custom ops, for torch.compile: the kernels stay in the graph, no break.

triton_op + wrap_triton let inductor see the Triton launches themselves. The eager path does not come
through here (autograd.py calls the launchers directly: torch.library's Python dispatch costs more
host time than the kernels take at small shapes; under a TorchDispatchMode it does). On CUDA tensors
an op launches the kernels (and on CPU ones called eagerly under the Triton interpreter: _kernels); on
others (CPU tensors in a compiled test, meta tensors) it computes with reference.py, so a compiled
graph keeps the same ops on any device.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true
from torch.library import triton_op, wrap_triton

from .. import reference
from ..backend import INTERPRETER
from . import dyt as dyt_ops
from . import modulate as mod_ops


def _kernels(x: Tensor) -> bool:
    """Whether a call launches the kernels: on CUDA tensors, and on a plain CPU tensor called eagerly
    under the Triton interpreter (the route a TorchDispatchMode takes in tests; functional.py). A traced
    CPU call (fake or functional tensors) keeps reference.py's formulas, so a compiled CPU graph holds
    plain ops."""
    return x.is_cuda or (INTERPRETER and (type(x) is Tensor or type(x) is torch.nn.Parameter)
                         and x.device.type == "cpu")


def _launcher(x: Tensor):
    """wrap_triton on CUDA (inductor sees the launches); a direct launch for the interpreter's CPU tensors,
    which are never traced (_kernels) and which torch 2.11's wrap_triton refuses (an interpreted kernel is
    not a JITFunction)."""
    return wrap_triton if x.is_cuda else None


def _as_launched(values, allocated):
    """reference.py's results (a tensor, or a sequence with Nones) in the tensors the launchers would
    allocate for them (output_like & co.): the ops' outputs have one layout whichever branch computed
    them, so a fake run (which traces the branch a fake tensor takes) and a real one agree on strides."""
    if isinstance(values, Tensor):
        return allocated.copy_(values)
    return tuple(None if v is None else a.copy_(v) for v, a in zip(values, allocated))


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,))


def _or_empty(ts, x: Tensor) -> tuple:
    return tuple(_empty(x) if t is None else t for t in ts)


def _symbolic(*tensors: Optional[Tensor]) -> bool:
    """Whether a traced call has symbolic sizes or strides: torch.compile's dynamic shapes (its
    automatic dynamic marks a dim so at the second size it sees), torch.export's Dims.

    The launch plans are worked out from the sizes (tiles, the backward's one-wave split, 64-bit
    indexing), cached by them, and some choices are loops over them: traced with symbols they would
    fail to hash, or pin every dynamic dim to the size seen while tracing. Such a call goes to the
    `*_dynamic` ops below instead, which plan and launch when the graph runs and the sizes are known;
    only their fake implementations (the outputs' allocation, shared with the launchers) are traced."""
    return any(t is not None and not all(type(s) is int for s in (*t.shape, *t.stride())) for t in tensors)


@triton_op("dyt_kernels::dyt_fwd", mutates_args=())
def dyt_fwd(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            channels_last: bool) -> Tensor:
    if _kernels(x):
        if _symbolic(x, alpha, weight, bias):
            return torch.ops.dyt_kernels.dyt_fwd_dynamic(x, alpha, weight, bias, channels_last)
        return dyt_ops.forward(x, alpha, weight, bias, channels_last, launch=_launcher(x))
    return _as_launched(reference.dyt(x, alpha, weight, bias, channels_last), dyt_ops.output_like(x, channels_last))


@torch.library.custom_op("dyt_kernels::dyt_fwd_dynamic", mutates_args=())
def dyt_fwd_dynamic(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    channels_last: bool) -> Tensor:
    """dyt_fwd traced with symbolic sizes (_symbolic): planned and launched when the graph runs."""
    return dyt_ops.forward(x, alpha, weight, bias, channels_last)


@dyt_fwd_dynamic.register_fake
def _(x, alpha, weight, bias, channels_last):
    return dyt_ops.output_like(x, channels_last)


@triton_op("dyt_kernels::dyt_bwd", mutates_args=())
def dyt_bwd(dy: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            channels_last: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dalpha, dweight, dbias); dweight/dbias are empty when weight/bias are None."""
    if _kernels(x):
        if _symbolic(dy, x, alpha, weight, bias):
            return torch.ops.dyt_kernels.dyt_bwd_dynamic(dy, x, alpha, weight, bias, channels_last)
        grads = dyt_ops.backward(dy, x, alpha, weight, bias, channels_last, launch=_launcher(x))
    else:
        grads = _as_launched(reference.dyt_backward(dy, x, alpha, weight, bias, channels_last),
                             _dyt_grads_like(x, alpha, weight, bias, channels_last))
    return _or_empty(grads, x)


@torch.library.custom_op("dyt_kernels::dyt_bwd_dynamic", mutates_args=())
def dyt_bwd_dynamic(dy: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    channels_last: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dyt_bwd traced with symbolic sizes (_symbolic): planned and launched when the graph runs."""
    return _or_empty(dyt_ops.backward(dy, x, alpha, weight, bias, channels_last), x)


def _dyt_grads_like(x, alpha, weight, bias, channels_last) -> tuple:
    """(dx, dalpha, dweight, dbias) as the launchers allocate them (None where absent)."""
    like = lambda p: None if p is None else torch.empty_like(p)  # noqa: E731
    return dyt_ops.output_like(x, channels_last), torch.empty_like(alpha), like(weight), like(bias)


@dyt_bwd_dynamic.register_fake
def _(dy, x, alpha, weight, bias, channels_last):
    return _or_empty(_dyt_grads_like(x, alpha, weight, bias, channels_last), x)


def _dyt_setup(ctx, inputs, output):
    x, alpha, weight, bias, channels_last = inputs
    ctx.save_for_backward(x, alpha, weight, bias)
    ctx.channels_last = channels_last


def _differentiable(dy: Tensor) -> bool:
    """Whether the backward must be differentiable: create_graph=True (a gradient penalty) called eagerly,
    as under a TorchDispatchMode (functional.py routes through these ops there): grad mode on and a plain
    gradient. The backward ops have no autograd; reference.py's formulas in torch ops do, as the eager
    Functions take them (autograd._formulas_only). A traced backward (fake or functional tensors) keeps
    the kernels."""
    return torch.is_grad_enabled() and (type(dy) is Tensor or type(dy) is torch.nn.Parameter)


def _dyt_backward(ctx, dy):
    x, alpha, weight, bias = ctx.saved_tensors
    if _differentiable(dy):
        return (*reference.dyt_backward(dy, x, alpha, weight, bias, ctx.channels_last), None)
    dx, da, dw, db = torch.ops.dyt_kernels.dyt_bwd(dy, x, alpha, weight, bias, ctx.channels_last)
    return dx, da, None if weight is None else dw, None if bias is None else db, None


dyt_fwd.register_autograd(_dyt_backward, setup_context=_dyt_setup)


@triton_op("dyt_kernels::dyt_modulate_fwd", mutates_args=())
def dyt_modulate_fwd(x: Tensor, alpha: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], residual: Optional[Tensor], gate: Optional[Tensor]
                     ) -> tuple[Tensor, Tensor]:
    """(h, r); r is empty without a residual."""
    if _kernels(x):
        if _symbolic(x, alpha, shift, scale, weight, bias, residual, gate):
            return torch.ops.dyt_kernels.dyt_modulate_fwd_dynamic(x, alpha, shift, scale, weight, bias, residual, gate)
        h, r = mod_ops.forward(x, alpha, shift, scale, weight, bias, residual, gate, launch=_launcher(x))
    else:
        out = reference.dyt_modulate(x, alpha, shift, scale, weight, bias, residual, gate)
        h, r = _as_launched((out, None) if residual is None else out, mod_ops.outputs_like(x, residual))
    return h, _empty(x) if r is None else r


@torch.library.custom_op("dyt_kernels::dyt_modulate_fwd_dynamic", mutates_args=())
def dyt_modulate_fwd_dynamic(x: Tensor, alpha: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor], residual: Optional[Tensor], gate: Optional[Tensor]
                             ) -> tuple[Tensor, Tensor]:
    """dyt_modulate_fwd traced with symbolic sizes (_symbolic): planned and launched when the graph runs."""
    return _or_empty(mod_ops.forward(x, alpha, shift, scale, weight, bias, residual, gate), x)


@dyt_modulate_fwd_dynamic.register_fake
def _(x, alpha, shift, scale, weight, bias, residual, gate):
    return _or_empty(mod_ops.outputs_like(x, residual), x)


@triton_op("dyt_kernels::dyt_modulate_bwd", mutates_args=())
def dyt_modulate_bwd(dh: Tensor, dr: Optional[Tensor], x: Tensor, r: Tensor, alpha: Tensor, shift: Tensor,
                     scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], gate: Optional[Tensor],
                     has_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dgate, dshift, dscale, dweight, dbias, dalpha), each shaped and typed like its
    input; absent ones come back empty, and so do dresidual, which equals dx without a gate, and a
    per-token shift's dshift, which is dh (custom-op outputs may not alias; _mod_grads)."""
    r = r if has_residual else x
    if _kernels(x):
        if _symbolic(dh, dr, x, r, alpha, shift, scale, weight, bias, gate):
            return torch.ops.dyt_kernels.dyt_modulate_bwd_dynamic(dh, dr, x, r, alpha, shift, scale, weight, bias,
                                                                  gate, has_residual)
        grads = mod_ops.backward(dh, dr, x, r, alpha, shift, scale, weight, bias, gate, has_residual,
                                 launch=_launcher(x))
    else:
        grads = _as_launched(
            reference.dyt_modulate_grads(dh, dr, x, r, alpha, shift, scale, weight, bias, gate, has_residual),
            mod_ops.grads_like(x, r, alpha, shift, scale, weight, bias, gate, has_residual))
    return _mod_grads(grads, x, r, has_residual, gate, shift)


def dres_is_dx(x: Tensor, r: Tensor, gate: Optional[Tensor], has_residual: bool) -> bool:
    """Whether the residual's gradient is dx itself (a residual, no gate, x and r of one dtype: the
    launcher writes it once), which the ops leave out (custom-op outputs may not alias) and callers
    take from dx. With x and r of different dtypes (bf16 x on an fp32 residual stream) both are
    written, dresidual in r's dtype; taking it from dx would round it to x's."""
    return has_residual and not mod_ops.writes_dx(x, r, gate, has_residual)


def _mod_grads(grads, x: Tensor, r: Tensor, has_residual: bool, gate: Optional[Tensor], shift: Tensor) -> tuple:
    """The op's outputs from mod_ops.backward's list: dresidual left out where it is dx (dres_is_dx),
    and a per-token shift's gradient (dh itself) left out: empty, or shaped like shift where shift
    is itself empty (a per-token shift of 0 elements), so that the callers, which take an empty
    dshift beside a non-empty shift for "dh", are handed a gradient of shift's shape either way."""
    grads = list(grads)
    if dres_is_dx(x, r, gate, has_residual):
        grads[1] = None
    if grads[3] is None and guard_or_false(shift.numel() == 0):
        grads[3] = shift.new_empty(shift.shape)
    return _or_empty(grads, x)


def shift_grad(dshift: Optional[Tensor], dh: Tensor, shift: Tensor) -> Tensor:
    """shift's gradient: dh itself, in shift's dtype, where shift is per token and dshift is left out
    (None from mod_ops.backward, empty from this module's op beside a non-empty shift); else dshift.
    autograd.py's eager and fused routes and the op's own autograd formula all take it from here."""
    if dshift is None or (dshift.numel() == 0 and guard_or_true(shift.numel() != 0)):
        return dh if dh.dtype == shift.dtype else dh.to(shift.dtype)
    return dshift


@torch.library.custom_op("dyt_kernels::dyt_modulate_bwd_dynamic", mutates_args=())
def dyt_modulate_bwd_dynamic(dh: Tensor, dr: Optional[Tensor], x: Tensor, r: Tensor, alpha: Tensor, shift: Tensor,
                             scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], gate: Optional[Tensor],
                             has_residual: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dyt_modulate_bwd traced with symbolic sizes (_symbolic): planned and launched when the graph runs."""
    grads = mod_ops.backward(dh, dr, x, r, alpha, shift, scale, weight, bias, gate, has_residual)
    return _mod_grads(grads, x, r, has_residual, gate, shift)


@dyt_modulate_bwd_dynamic.register_fake
def _(dh, dr, x, r, alpha, shift, scale, weight, bias, gate, has_residual):
    return _mod_grads(mod_ops.grads_like(x, r, alpha, shift, scale, weight, bias, gate, has_residual), x, r,
                      has_residual, gate, shift)


def _mod_setup(ctx, inputs, output):
    x, alpha, shift, scale, weight, bias, residual, gate = inputs
    _, r = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, r, alpha, shift, scale, weight, bias, gate)


def _mod_backward(ctx, dh, dr):
    x, r, alpha, shift, scale, weight, bias, gate = ctx.saved_tensors
    if _differentiable(dh):   # as in _dyt_backward
        dx, dres, dgate, dshift, dscale, dw, db, da = reference.dyt_modulate_grads(
            dh, dr if ctx.has_residual else None, x, r if ctx.has_residual else x, alpha, shift, scale, weight, bias,
            gate, ctx.has_residual)
    else:
        dx, dres, dgate, dshift, dscale, dw, db, da = torch.ops.dyt_kernels.dyt_modulate_bwd(
            dh, dr if ctx.has_residual else None, x, r, alpha, shift, scale, weight, bias, gate, ctx.has_residual)
        if dres_is_dx(x, r, gate, ctx.has_residual):
            dres = dx
    opt = lambda g, p: None if p is None else g  # noqa: E731
    return (dx, da, shift_grad(dshift, dh, shift), dscale, opt(dw, weight), opt(db, bias),
            dres if ctx.has_residual else None, opt(dgate, gate))


dyt_modulate_fwd.register_autograd(_mod_backward, setup_context=_mod_setup)
