"""The public functional ops: argument checks, the backend chosen once, then one path.

Eager: a lean autograd.Function over the launchers (Triton backend) or over reference.py's formulas
(torch backend); autograd.py. Under torch.compile: plain pointwise ops for the torch backend, and
autograd.py's fused or opaque paths for Triton.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.nn import Parameter

from . import reference
from ._checks import (as_alpha, check_finite, check_input, check_modulation, check_param, check_same_kind,
                      shape_str)
from .autograd import (DyTFused, DyTModulateFused, DyTModulateReference, DyTReference, dyt_apply,
                       modulate_apply)
from .backend import traced_backend, use_triton
from .ops import dyt as dyt_ops
from .ops import modulate as mod_ops
from .ops.direct import _current_device as _cuda_device
from ._signatures import Signatures, absent


def _compiled_route(x: Tensor) -> str:
    """Under torch.compile: "torch" (plain ops), "fused" (pointwise forward, kernel backward) or
    "opaque" (our kernels both ways, use_backend("triton"))."""
    name = traced_backend()
    if _plain_ops(x) or not use_triton(x, name) or torch.onnx.is_in_onnx_export():
        # (ONNX's exporter has no translation for the custom ops: torch.onnx.export gets plain ops)
        return "torch"
    return "opaque" if name == "triton" else "fused"


def dyt(x: Tensor, alpha: Tensor | float, weight: Tensor | None = None, bias: Tensor | None = None, *,
        channels_last: bool = True) -> Tensor:
    """Dynamic Tanh: ``weight * tanh(alpha * x) + bias`` over the channel dim.

    The channel dim is the last one (``channels_last=True``) or dim 1 of an (N, C, ...) tensor.
    alpha has 1 element or one per channel; weight and bias are (C,) or None. Differentiable in x,
    alpha, weight and bias. Triton kernels on CUDA, plain PyTorch on CPU (see ``use_backend``).

    >>> import torch
    >>> from dyt_kernels import dyt
    >>> x = torch.randn(4, 16, 384)
    >>> y = dyt(x, torch.tensor([0.5]), torch.ones(384), torch.zeros(384))
    >>> y.shape
    torch.Size([4, 16, 384])
    """
    if channels_last is not True and channels_last is not False:
        raise TypeError(f"channels_last must be True or False, got {channels_last!r}")
    if torch.compiler.is_compiling():   # traced: no signature cache (see _compiled_dyt)
        return _compiled_dyt(*_check_dyt_args(x, alpha, weight, bias, channels_last), channels_last)
    # A signature (_signatures.py) this call's tensors match: its slot, and the checks are skipped.
    slot = None
    try:
        for flag, guard, s in _VALIDATED.get(x.shape, ()):
            if flag is channels_last and guard.check(x, alpha, _NO_WEIGHT if weight is None else weight,
                                                     _NO_BIAS if bias is None else bias):
                slot = s
                break
    except (AttributeError, TypeError, RuntimeError):   # x without a shape; a layout without strides
        pass                                              # (the checks name them)
    if slot is None:
        args = _check_dyt_args(x, alpha, weight, bias, channels_last)
        if _subclass_among(args[1:]):
            return reference.dyt(*args, channels_last)
        if (type(x) is Tensor or type(x) is Parameter) and all(a is b for a, b in zip(args, (x, alpha, weight, bias))):
            # a plain x, and nothing copied or converted by the checks
            # [forward launch, backward launch, how x is read in place (an InPlace, or None)]: the
            # launchers fill them (ops/dyt.py)
            slot = _VALIDATED.add(x.shape, channels_last, (x, alpha, _NO_WEIGHT if weight is None else weight,
                                                           _NO_BIAS if bias is None else bias), [None, None, None])
        x, alpha, weight, bias = args
    if (type(x) is not Tensor and type(x) is not Parameter) or _forward_ad._current_level >= 0 \
            or _functorch_active() or _jit_tracing() is not None:   # _plain_ops(x), inlined
        return reference.dyt(x, alpha, weight, bias, channels_last)
    if use_triton(x):
        if x.is_cuda and x.get_device() != _cuda_device():
            return _on_device(x, _dyt_triton, x, alpha, weight, bias, channels_last, slot)
        if _dispatch_modes():   # a TorchDispatchMode sees the op, not the launchers' allocations
            return torch.ops.dyt_kernels.dyt_fwd(x, alpha, weight, bias, channels_last)
        if not torch.is_grad_enabled():   # no_grad / inference_mode (sampling): no graph to record
            return dyt_ops.forward(x, alpha, weight, bias, channels_last, None, slot)
        return dyt_apply(x, alpha, weight, bias, channels_last, slot)
    return DyTReference.apply(x, alpha, weight, bias, channels_last)


def _dyt_triton(x, alpha, weight, bias, channels_last, slot):
    if _dispatch_modes():
        return torch.ops.dyt_kernels.dyt_fwd(x, alpha, weight, bias, channels_last)
    if not torch.is_grad_enabled():
        return dyt_ops.forward(x, alpha, weight, bias, channels_last, None, slot)
    return dyt_apply(x, alpha, weight, bias, channels_last, slot)


def _on_device(x: Tensor, call, *args):
    """call(*args) with x's GPU as the current device.

    Triton launches on the current device, on its current stream; a tensor on another GPU (a model
    spread over GPUs in one process, as accelerate's device_map="auto" places it, without
    torch.cuda.set_device) would be read from the wrong device, unordered with the stream that
    wrote it: an illegal address, or a race. PyTorch's own ops switch to their tensors' device, so
    the kernels do too. (Backward needs nothing: autograd runs it with the device set.)"""
    with torch.cuda.device(x.device):
        return call(*args)


_functorch_active = torch._C._are_functorch_transforms_active

# torch.jit.trace's state (None when not tracing; ~0.06 us). A traced call takes reference.py's plain
# ops: the kernels' launches would see the sizes as traced tensors, and the eager Functions would be
# recorded as Python ops that torch.jit.save refuses; the legacy ONNX exporter traces the same way.
_jit_tracing = torch._C._get_tracing_state

# Whether a TorchDispatchMode is active (~0.03 us). The eager Functions launch into buffers they
# allocate with torch.empty, which a mode sees as bare allocations that something else fills: selective
# activation checkpointing (torch.utils.checkpoint with create_selective_checkpoint_contexts) caches
# them and hands the cached buffer back on recompute, where the launch writes into it again ("Tensor
# cached during selective activation checkpoint has been mutated"). Under a mode the ops go through
# their torch.library custom ops instead (ops/library.py), which a mode sees, caches and replays as one op.
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _plain_ops(x: Tensor) -> bool:
    """Whether a call takes reference.py's plain ops, whatever the backend: x is a tensor subclass
    (DTensor, a nested jagged tensor, any wrapper subclass), or a torch.func transform (vmap, grad,
    jvp, jacrev, hessian, ...) or forward-mode AD (torch.autograd.forward_ad) is active.

    Torch has every subclass's and every transform's rule for those ops; the kernels read a plain
    tensor's storage through raw pointers, the eager Functions have no vmap or jvp rule, and the
    custom ops neither (torch.func.jvp through the opaque compiled route gave a zero tangent,
    silently). Also under torch.jit.trace (eager only: _jit_tracing). The eager paths inline this: a type
    check and three flag reads, ~0.12 us per call.
    Traced (_compiled_route), the fake and functional tensors of a trace (torch.export's non-strict
    mode runs this code on them) stand for plain tensors; dynamo shows x's own type, and guards on
    the transform state."""
    return ((type(x) is not Tensor and type(x) is not Parameter and not isinstance(x, _TRACING))
            or _forward_ad._current_level >= 0 or _functorch_active())


_TRACING = (FakeTensor, FunctionalTensor)


def _subclass_among(tensors) -> bool:
    """Whether a tensor subclass is among the arguments other than x (a plain x: _plain_ops has let
    it through). Such a call takes the plain ops too and its signature is never cached, so every
    call with it comes back here; the signatures hold those arguments' types, so a signature plain
    tensors cached never matches it (before they did, and a subclass residual with a cached plain
    one's shape reached the kernels)."""
    return any(t is not None and type(t) is not Tensor and type(t) is not Parameter for t in tensors)


def _compiled_dyt(x, alpha, weight, bias, channels_last):
    """dyt as torch.compile or torch.export traces it. The eager path's signature cache is left out:
    hashing a shape would specialize every dynamic dim (torch.compile(dynamic=True) recompiling for
    each new shape; torch.export with a Dim refusing the model)."""
    route = _compiled_route(x)
    if route == "fused":
        return DyTFused.apply(x, alpha, weight, bias, channels_last)
    if route == "opaque":
        return torch.ops.dyt_kernels.dyt_fwd(x, alpha, weight, bias, channels_last)
    return reference.dyt(x, alpha, weight, bias, channels_last)


def _check_dyt_args(x, alpha, weight, bias, channels_last):
    x = check_input("x", x, min_dim=1 if channels_last else 2)
    channels = x.shape[-1] if channels_last else x.shape[1]
    return (x, as_alpha(alpha, x, channels), check_param("weight", weight, x, channels),
            check_param("bias", bias, x, channels))


# Argument signatures that passed the checks unchanged, each with a slot for its launch configurations:
# a call that matches one skips the checks. Absent optional tensors stand as their own placeholders.
_VALIDATED = Signatures()
_NO_WEIGHT, _NO_BIAS = absent(), absent()


def _check_modulate_args(x, shift, scale, weight, bias, residual, gate):
    x = check_input("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got {shape_str(x)}")
    D = x.shape[2]
    shift, scale = check_modulation("shift", shift, x), check_modulation("scale", scale, x)
    if shift is None or scale is None:
        raise TypeError("shift and scale are required tensors; pass zeros to disable one")
    if residual is not None:
        residual = check_same_kind("residual", check_input("residual", residual), x)
        if residual.shape != x.shape or residual.device != x.device:
            raise ValueError(f"residual must match x: shape {shape_str(x)} on {x.device}, "
                             f"got {shape_str(residual)} on {residual.device}")
    elif gate is not None:
        raise ValueError("gate scales x before the residual add, so it needs residual; got residual=None")
    gate = check_modulation("gate", gate, x)
    return x, shift, scale, check_param("weight", weight, x, D), check_param("bias", bias, x, D), residual, gate


def dyt_modulate(x: Tensor, alpha: Tensor | float, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                 bias: Tensor | None = None, *, residual: Tensor | None = None, gate: Tensor | None = None):
    """adaLN-modulated DyT, the norm + modulate (+ gated residual) of a DiT/PixArt-alpha/FLUX block, fused.

    x is (B, L, D); shift, scale and gate are (B, D) or (B, 1, D) (one per sample, broadcast over
    the L tokens) or (B, L, D) (one per token); weight/bias are (D,) or None::

        r = residual + gate * x          (only when residual is given; gate optional)
        h = (weight * tanh(alpha * r) + bias) * (1 + scale) + shift

    Returns h, or (h, r) when residual is given. Differentiable in every tensor argument.

    >>> import torch
    >>> from dyt_kernels import dyt_modulate
    >>> x, res = torch.randn(2, 16, 384), torch.randn(2, 16, 384)
    >>> shift, scale, gate = torch.randn(3, 2, 384).unbind(0)
    >>> h, r = dyt_modulate(x, torch.tensor([0.5]), shift, scale, residual=res, gate=gate)
    >>> h.shape, r.shape
    (torch.Size([2, 16, 384]), torch.Size([2, 16, 384]))
    """
    if torch.compiler.is_compiling():   # traced: no signature cache (see _compiled_dyt)
        x, shift, scale, weight, bias, residual, gate = _check_modulate_args(x, shift, scale, weight, bias,
                                                                             residual, gate)
        return _compiled_modulate(x, as_alpha(alpha, x, x.shape[2]), shift, scale, weight, bias, residual, gate)
    slot = None   # as in dyt
    try:
        for _, guard, s in _VALIDATED_MOD.get(x.shape, ()):
            if guard.check(x, alpha, shift, scale, _NO_WEIGHT if weight is None else weight,
                           _NO_BIAS if bias is None else bias, _NO_RESIDUAL if residual is None else residual,
                           _NO_GATE if gate is None else gate):
                slot = s
                break
    except (AttributeError, TypeError, RuntimeError):
        pass
    if slot is None:
        checked = _check_modulate_args(x, shift, scale, weight, bias, residual, gate)
        checked_alpha = as_alpha(alpha, x, x.shape[2])
        if _subclass_among((*checked[1:], checked_alpha)):
            (x, shift, scale, weight, bias, residual, gate), alpha = checked, checked_alpha
            return reference.dyt_modulate(x, alpha, shift, scale, weight, bias, residual, gate)
        given = (x, shift, scale, weight, bias, residual, gate, alpha)
        if (type(x) is Tensor or type(x) is Parameter) and all(a is b for a, b in zip((*checked, checked_alpha), given)):
            # [forward call, {has_dr: backward call}, whether the launches read every tensor in place]
            # (ops/modulate.py fills the calls)
            in_place = (all(t is None or t.is_contiguous() for t in (x, alpha, weight, bias, residual))
                        and all(t is None or t.stride(-1) == 1 for t in (shift, scale, gate)))
            slot = _VALIDATED_MOD.add(x.shape, None, (
                x, alpha, shift, scale, _NO_WEIGHT if weight is None else weight, _NO_BIAS if bias is None else bias,
                _NO_RESIDUAL if residual is None else residual, _NO_GATE if gate is None else gate),
                [None, {}, in_place])
        (x, shift, scale, weight, bias, residual, gate), alpha = checked, checked_alpha
    args = (x, alpha, shift, scale, weight, bias, residual, gate)
    if (type(x) is not Tensor and type(x) is not Parameter) or _forward_ad._current_level >= 0 \
            or _functorch_active() or _jit_tracing() is not None:   # _plain_ops(x), inlined
        return reference.dyt_modulate(*args)
    if use_triton(x) and (residual is None or residual.dtype != torch.float64):
        # (a float64 residual stream stays in PyTorch, as a float64 x does: the kernels add in fp32)
        if x.is_cuda and x.get_device() != _cuda_device():
            return _on_device(x, _modulate_triton, args, slot)
        if _dispatch_modes():   # as in dyt
            return _modulate_op(args)
        if not torch.is_grad_enabled():   # no_grad / inference_mode (sampling): no graph to record
            h, r = mod_ops.forward(*args, None, slot)
            return h if residual is None else (h, r)
        return modulate_apply(*args, slot)
    return DyTModulateReference.apply(*args)


def _modulate_triton(args, slot):
    if _dispatch_modes():
        return _modulate_op(args)
    if not torch.is_grad_enabled():
        h, r = mod_ops.forward(*args, None, slot)
        return h if args[6] is None else (h, r)
    return modulate_apply(*args, slot)


def _compiled_modulate(*args):
    """dyt_modulate as torch.compile or torch.export traces it (no signature cache: _compiled_dyt)."""
    route = _compiled_route(args[0])
    if args[6] is not None and args[6].dtype == torch.float64:   # a float64 residual stream: as eager
        route = "torch"
    if route == "fused":
        return DyTModulateFused.apply(*args)
    if route == "opaque":
        return _modulate_op(args)
    return reference.dyt_modulate(*args)


def _modulate_op(args):
    h, r = torch.ops.dyt_kernels.dyt_modulate_fwd(*args)
    return h if args[6] is None else (h, r)


# Argument signatures of dyt_modulate that passed the checks unchanged, each with its slot.
_VALIDATED_MOD = Signatures()
_NO_RESIDUAL, _NO_GATE = absent(), absent()


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                       bias: Tensor | None = None, *, residual: Tensor | None = None, gate: Tensor | None = None,
                       eps: float = 1e-6):
    """dyt_modulate's LayerNorm twin (plain PyTorch; eps 1e-6, no affine unless given), same arguments
    but no alpha, so a model switches norms with one flag.

    >>> import torch
    >>> from dyt_kernels import layernorm_modulate
    >>> x = torch.randn(2, 16, 384)
    >>> layernorm_modulate(x, torch.zeros(2, 384), torch.zeros(2, 384)).shape
    torch.Size([2, 16, 384])
    """
    x, shift, scale, weight, bias, residual, gate = _check_modulate_args(x, shift, scale, weight, bias, residual,
                                                                         gate)
    if check_finite("eps", eps) <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return reference.layernorm_modulate(x, shift, scale, weight, bias, residual=residual, gate=gate, eps=eps)
