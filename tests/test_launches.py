"""The launch budget, measured: a forward is one kernel, a backward at most two, for every variant.

Triton launches are counted by wrapping the interpreter's launcher; torch work by a dispatch mode
that sees every aten op outside those launches, counting the ones that would be a CUDA kernel (not
views, allocations or metadata). On CUDA the kernels run natively and only torch ops are seen, so
these tests run under the interpreter.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dyt_kernels import dyt, dyt_modulate, functional, use_backend
from dyt_kernels.backend import INTERPRETER
from helpers import MOD_CASES, modulate_case_inputs

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="counts launches through the Triton interpreter")

FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "reshape", "_reshape_alias",
        "select", "unsqueeze", "squeeze", "as_strided", "t", "detach", "alias", "expand", "movedim", "permute",
        "slice", "_unsafe_view", "lift_fresh", "transpose", "split", "unbind", "split_with_sizes", "clone_noop",
        "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_to_copy_noop",
        "unflatten", "flatten", "narrow", "view_as", "expand_as", "contiguous", "size", "stride", "dim",
        "is_contiguous", "numel", "_local_scalar_dense", "result_type", "set_", "zeros_like_noop"}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.torch_ops: list[str] = []
        self.in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_launch and name not in FREE:
            self.torch_ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting():
    import triton.runtime.interpreter as interp
    counter = _Counter()
    triton_launches = []
    original = interp.InterpretedFunction.run

    def run(self, *args, **kwargs):
        triton_launches.append(self.fn.__name__)
        counter.in_launch += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.in_launch -= 1

    interp.InterpretedFunction.run = run
    # The counter is a dispatch mode, under which the ops take their custom ops (functional._dispatch_modes)
    # and the mode would see one op, not the work inside it: the count is of the path a call takes with
    # no mode active, so the ops are told none is. (test_a_mode_sees_the_custom_ops_launch_the_same_kernels
    # counts the mode's path.)
    modes, functional._dispatch_modes = functional._dispatch_modes, lambda: 0
    try:
        with counter:
            yield triton_launches, counter.torch_ops
    finally:
        interp.InterpretedFunction.run = original
        functional._dispatch_modes = modes


def _count(fn):
    with counting() as (triton_launches, torch_ops):
        out = fn()
    return list(triton_launches), list(torch_ops), out


DYT_CASES = {
    "2d alpha1 w+b": ((64, 96), True, dict(per_channel=False, weight=True, bias=True)),
    "3d alphaC w": ((2, 8, 96), True, dict(per_channel=True, weight=True, bias=False)),
    "no affine": ((64, 96), True, dict(per_channel=False, weight=False, bias=False)),
    "NCHW alpha1 w+b": ((2, 6, 5, 7), False, dict(per_channel=False, weight=True, bias=True)),
    "NCHW alphaC b": ((2, 6, 5, 7), False, dict(per_channel=True, weight=False, bias=True)),
    "NHWC-stored w+b": ((2, 6, 5, 7), False, dict(per_channel=False, weight=True, bias=True, nhwc=True)),
    "(N, C) first": ((40, 12), False, dict(per_channel=True, weight=True, bias=True)),
}


@pytest.mark.parametrize("case", list(DYT_CASES))
def test_dyt_launches(case):
    shape, channels_last, o = DYT_CASES[case]
    C = shape[-1] if channels_last else shape[1]
    x = torch.randn(shape)
    if o.get("nhwc"):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    alpha = (torch.rand(C if o["per_channel"] else 1) + 0.2).requires_grad_()
    w = torch.randn(C, requires_grad=True) if o["weight"] else None
    b = torch.randn(C, requires_grad=True) if o["bias"] else None
    inputs = [t for t in (x, alpha, w, b) if t is not None]
    with use_backend("triton"):
        tl_fwd, torch_fwd, y = _count(lambda: dyt(x, alpha, w, b, channels_last=channels_last))
        dy = torch.randn_like(y)  # in y's memory format, as the layer after it would hand it back
        tl_bwd, torch_bwd, _ = _count(lambda: torch.autograd.grad(y, inputs, dy))
    assert len(tl_fwd) + len(torch_fwd) == 1, (tl_fwd, torch_fwd)
    assert tl_fwd == ["_dyt_fwd_kernel"]
    assert len(tl_bwd) + len(torch_bwd) <= 2, (tl_bwd, torch_bwd)
    assert tl_bwd == ["_dyt_bwd_kernel", "_finish_kernel"], tl_bwd


@pytest.mark.parametrize("case", list(MOD_CASES))
def test_dyt_modulate_launches(case):
    x, alpha, shift, scale, w, b, residual, gate = modulate_case_inputs(case)
    inputs = [t for t in (x, alpha, shift, scale, w, b, residual, gate) if t is not None]
    with use_backend("triton"):
        tl_fwd, torch_fwd, out = _count(lambda: dyt_modulate(x, alpha, shift, scale, w, b, residual=residual,
                                                             gate=gate))
        outs = list(out) if isinstance(out, tuple) else [out]
        douts = [torch.randn_like(t) for t in outs]
        tl_bwd, torch_bwd, _ = _count(lambda: torch.autograd.grad(outs, inputs, douts))
    assert tl_fwd == ["_modulate_fwd_kernel"] and not torch_fwd, (tl_fwd, torch_fwd)
    assert tl_bwd == ["_modulate_bwd_kernel", "_finish_kernel"] and not torch_bwd, (tl_bwd, torch_bwd)


def test_counter_sees_torch_kernels():
    """The counter would catch a torch sum or cast (what the old backward launched)."""
    with counting() as (_, torch_ops):
        torch.randn(4, 8).sum(0).to(torch.bfloat16)
    assert "sum" in torch_ops and "_to_copy" in torch_ops


def test_a_mode_sees_the_custom_ops_launch_the_same_kernels():
    """Under a dispatch mode (functional._dispatch_modes) the calls go through the custom ops: the mode sees
    one op each way, and inside them the same kernels launch as on the eager path."""
    x, alpha, w, b = (t.requires_grad_() for t in (torch.randn(2, 8, 96), torch.rand(1) + 0.2, torch.randn(96),
                                                    torch.randn(96)))
    mods = torch.randn(3, 2, 96)
    import triton.runtime.interpreter as interp
    launches, counter, original = [], _Counter(), interp.InterpretedFunction.run
    interp.InterpretedFunction.run = lambda self, *a, **k: launches.append(self.fn.__name__) or original(self, *a, **k)
    try:
        with use_backend("triton"), counter:
            y = dyt(x, alpha, w, b)
            fwd_ops, fwd = list(counter.torch_ops), list(launches)
            h, r = dyt_modulate(y, alpha, mods[0], mods[1], w, b, residual=x, gate=mods[2])
            mod_ops, mod = counter.torch_ops[len(fwd_ops):], launches[len(fwd):]
            del launches[:], counter.torch_ops[:]
            torch.autograd.grad((h * r).sum(), (x, alpha, w, b))
    finally:
        interp.InterpretedFunction.run = original
    assert (fwd_ops, fwd) == (["dyt_fwd"], ["_dyt_fwd_kernel"])
    assert (mod_ops, mod) == (["dyt_modulate_fwd"], ["_modulate_fwd_kernel"])
    assert {"dyt_bwd", "dyt_modulate_bwd"} <= set(counter.torch_ops), counter.torch_ops
    assert sorted(launches) == sorted(["_dyt_bwd_kernel", "_finish_kernel", "_modulate_bwd_kernel", "_finish_kernel"]), launches
