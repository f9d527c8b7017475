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
from .ops import library  # registers torch.ops.dyt_kernels.*
from .ops import modulate as mod_ops


def _present(g, p):
    """A custom op's gradient, None where its input was None (custom ops return empty tensors)."""
    return None if p is None else g


def _library_dyt_backward(dy, x, alpha, weight, bias, channels_last):
    dx, da, dw, db = torch.ops.dyt_kernels.dyt_bwd(dy, x, alpha, weight, bias, channels_last)
    return dx, da, _present(dw, weight), _present(db, bias)


def _library_modulate_grads(dh, dr, x, r, alpha, shift, scale, weight, bias, gate, has_residual):
    """The custom op's gradients in mod_ops.backward's convention (None where absent; a per-token
    shift's dshift stays empty, which library.shift_grad reads as dh)."""
    dx, dres, dgate, dshift, dscale, dw, db, da = torch.ops.dyt_kernels.dyt_modulate_bwd(
        dh, dr, x, r, alpha, shift, scale, weight, bias, gate, has_residual)
    if library.dres_is_dx(x, r, gate, has_residual):
        dres = dx  # the op returns it once (outputs may not alias)
    return (dx, dres if has_residual else None, _present(dgate, gate), dshift, dscale, _present(dw, weight),
            _present(db, bias), da)


_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _storeless(t) -> bool:
    """Whether a gradient is a batched or transformed wrapper with no storage of its own: the legacy
    vmap's, which torch.autograd.grad(..., is_grads_batched=True) runs the backward under
    (autograd.functional's jacobian and hessian with vectorize=True), or a functorch wrapper
    (torch.func.vmap over torch.autograd.grad of a graph built outside it)."""
    return _legacy_batched(t) or _functorch_wrapped(t)


def _formulas_only(dy, dr=None) -> bool:
    """Whether a backward must take reference.py's formulas rather than the kernels: create_graph=True
    (grad mode on; the kernels are not differentiable), or a gradient with no storage for a kernel to
    read ("Cannot access storage of BatchedTensorImpl"; torch ops have their batching rules)."""
    return torch.is_grad_enabled() or _storeless(dy) or (dr is not None and _storeless(dr))


def _backward_slot(slot):
    """The signature's slot for the backward, or None while saved-tensor hooks are active.

    A slot's backward call has every stride fixed from the forward's inputs, but hooks hand the
    backward whatever they unpack: save_on_cpu and offloading copy a chunked modulation back dense,
    a clone densifies it, a checkpoint recomputes; the fixed strides then read the wrong elements
    (silently wrong gradients, before this). Without a slot the backward works its arguments out
    from the tensors it gets. One C call, ~45 ns, per forward with autograd."""
    return slot if _saved_tensors_hooks(False) is None else None


def _save_dyt(ctx, x, alpha, weight, bias, channels_last):
    ctx.save_for_backward(x, alpha, weight, bias)
    ctx.channels_last = channels_last


class DyTFunction(torch.autograd.Function):
    """Eager Triton path; `slot` carries the call signature's cached launch configurations.

    The backward never reads bias's values (dbias = sum dy), only its dtype and shape to allocate
    dbias, so bias is kept as a plain reference rather than a saved tensor (a saved tensor costs a
    version check and a wrapper on both ends; at small shapes the host is the cost)."""

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, channels_last, slot):
        ctx.save_for_backward(x, alpha, weight)
        ctx.bias, ctx.channels_last, ctx.slot = bias, channels_last, _backward_slot(slot)
        return dyt_ops.forward(x, alpha, weight, bias, channels_last, None, slot)

    @staticmethod
    def backward(ctx, dy):
        if _formulas_only(dy):
            # create_graph=True (a gradient penalty): the kernels are not differentiable, the
            # reference formulas are; they give the same gradients in torch ops autograd can follow.
            # Batched gradients (is_grads_batched=True): the same formulas, under vmap.
            return (*reference.dyt_backward(dy, *ctx.saved_tensors, ctx.bias, ctx.channels_last), None, None)
        return (*dyt_ops.backward(dy, *ctx.saved_tensors, ctx.bias, ctx.channels_last, slot=ctx.slot), None, None)


# torch.autograd.Function.apply is C++ in recent torch releases. Before (torch 2.11 among them) it is a
# Python classmethod: it binds arguments for a setup_context (these Functions define none), sends
# functorch transforms elsewhere (functional.py has sent those to the plain ops before any Function
# is applied), unwraps dead functorch wrappers (tensors that escaped a finished transform) over
# every argument, then calls the C apply: ~2 µs a call on torch 2.11, more than the rest of a
# small forward's Python. Where it is Python, the eager paths call the C apply themselves after
# unwrapping their tensor arguments the same way, except for a call that found its signature's
# slot: such a call's tensors are plain (functional.py never remembers a functorch wrapper, and
# one never matches a signature plain tensors left), so there is nothing to unwrap (~0.12 µs a
# tensor on torch 2.11).
PYTHON_APPLY = isinstance(torch.autograd.Function.__dict__.get("apply"), classmethod)
_unwrap = torch._C._functorch.unwrap_if_dead


def lean_dyt_apply(fn, python_apply: bool = PYTHON_APPLY):
    """fn.apply(x, alpha, weight, bias, channels_last, slot), skipping torch's Python apply where
    there is one (`python_apply`; tests force it on a torch whose apply is C++)."""
    if not python_apply:
        return fn.apply
    base = super(torch.autograd.Function, fn).apply   # the C apply, bound to fn

    def apply(x, alpha, weight, bias, channels_last, slot):
        if slot is not None:
            return base(x, alpha, weight, bias, channels_last, slot)
        return base(_unwrap(x), _unwrap(alpha), None if weight is None else _unwrap(weight),
                    None if bias is None else _unwrap(bias), channels_last, slot)
    return apply


def lean_modulate_apply(fn, python_apply: bool = PYTHON_APPLY):
    """fn.apply(x, alpha, shift, scale, weight, bias, residual, gate, slot), as lean_dyt_apply."""
    if not python_apply:
        return fn.apply
    base = super(torch.autograd.Function, fn).apply

    def apply(x, alpha, shift, scale, weight, bias, residual, gate, slot):
        if slot is not None:
            return base(x, alpha, shift, scale, weight, bias, residual, gate, slot)
        return base(_unwrap(x), _unwrap(alpha), _unwrap(shift), _unwrap(scale),
                    None if weight is None else _unwrap(weight), None if bias is None else _unwrap(bias),
                    None if residual is None else _unwrap(residual), None if gate is None else _unwrap(gate), slot)
    return apply


class DyTReference(torch.autograd.Function):
    """The torch backend in eager mode: reference.py's forward and its explicit VJP formulas."""

    @staticmethod
    def forward(ctx, x, alpha, weight, bias, channels_last):
        _save_dyt(ctx, x, alpha, weight, bias, channels_last)
        return reference.dyt(x, alpha, weight, bias, channels_last)

    @staticmethod
    def backward(ctx, dy):
        return (*reference.dyt_backward(dy, *ctx.saved_tensors, ctx.channels_last), None)


class DyTFused(DyTReference):
    """Compiled path: the pointwise forward (the compiler fuses it), our kernel for the backward."""

    @staticmethod
    def backward(ctx, dy):
        return (*_library_dyt_backward(dy, *ctx.saved_tensors, ctx.channels_last), None)


def _save_modulate(ctx, x, r, alpha, shift, scale, weight, bias, gate):
    ctx.save_for_backward(x, r, alpha, shift, scale, weight, bias, gate)
    ctx.has_residual = r is not None


def _modulate_backward(ctx, dh, dr, grads, **kwargs):
    """The Function's gradients from a `grads` with mod_ops.backward's signature and convention."""
    x, r, alpha, shift, scale, weight, bias, gate = ctx.saved_tensors
    dx, dres, dgate, dshift, dscale, dw, db, da = grads(
        dh, dr, x, r if ctx.has_residual else x, alpha, shift, scale, weight, bias, gate, ctx.has_residual,
        **kwargs)
    return dx, da, library.shift_grad(dshift, dh, shift), dscale, dw, db, dres, dgate


def _reference_modulate(x, alpha, shift, scale, weight, bias, residual, gate):
    out = reference.dyt_modulate(x, alpha, shift, scale, weight, bias, residual, gate)
    return (out, None) if residual is None else out


class DyTModulateFunction(torch.autograd.Function):
    """Eager Triton path; `slot` carries the call signature's cached launches (functional.py)."""

    @staticmethod
    def forward(ctx, x, alpha, shift, scale, weight, bias, residual, gate, slot):
        h, r = mod_ops.forward(x, alpha, shift, scale, weight, bias, residual, gate, None, slot)
        _save_modulate(ctx, x, r, alpha, shift, scale, weight, bias, gate)
        ctx.slot = _backward_slot(slot)
        return h if r is None else (h, r)

    @staticmethod
    def backward(ctx, dh, dr=None):
        if _formulas_only(dh, dr):   # create_graph=True, batched gradients: the reference formulas
            return (*_modulate_backward(ctx, dh, dr, reference.dyt_modulate_grads), None)
        return (*_modulate_backward(ctx, dh, dr, mod_ops.backward, slot=ctx.slot), None)


class DyTModulateReference(torch.autograd.Function):
    """The torch backend in eager mode: reference.py's forward and its explicit VJP formulas."""

    @staticmethod
    def forward(ctx, x, alpha, shift, scale, weight, bias, residual, gate):
        h, r = _reference_modulate(x, alpha, shift, scale, weight, bias, residual, gate)
        _save_modulate(ctx, x, r, alpha, shift, scale, weight, bias, gate)
        return h if r is None else (h, r)

    @staticmethod
    def backward(ctx, dh, dr=None):
        return _modulate_backward(ctx, dh, dr, reference.dyt_modulate_grads)


class DyTModulateFused(DyTModulateReference):
    """Compiled path for dyt_modulate: the pointwise forward, our kernels for the backward."""

    @staticmethod
    def backward(ctx, dh, dr=None):
        return _modulate_backward(ctx, dh, dr, _library_modulate_grads)


dyt_apply = lean_dyt_apply(DyTFunction)
modulate_apply = lean_modulate_apply(DyTModulateFunction)
