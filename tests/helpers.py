"""Shared test utilities: the three-way tolerance check, its atol helpers, NaN-poisoned allocation.

Three-way tolerance (docs/DESIGN.md, testing, after flash-attention's norm tests): the tested
output's max-abs error against a float64 oracle must be at most ``factor`` (2) times the error of
plain PyTorch computing the same thing in the same dtype, plus a small atol. The naive run sets the
scale that dtype allows (bf16 rounding, fp16 rounding, fp32 reduction noise), so one rule covers
every dtype; atol only absorbs the few places where the naive run is luckier than it has a right to
be (an exactly representable result, a one-term sum) and must be derived, never tuned.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor

from dyt_kernels.backend import INTERPRETER
from dyt_kernels.ops import dyt as dyt_ops, plan
from dyt_kernels.ops.primitives import TANH_APPROX

FP32_EPS = torch.finfo(torch.float32).eps  # 2^-23

# Max abs error of the kernels' fp32 tanh form (TANH_F32), asserted by tests/test_tanh.py: within
# 4 * 2^-24 = 2 * FP32_EPS of tanh over all of R, also with the 2-ulp errors PTX allows its exp2 and
# division. atol derivations below build on this number.
TANH_F32_ABS_ERR = 2 * FP32_EPS
# tanh.approx.f32's documented max relative error (PTX ISA: 2^-10.987), rounded up; the form the
# kernels use for bf16/fp16 outputs on a GPU.
TANH_APPROX_ERR = 2.0 ** -10.9


def tanh_abs_err(dtype: torch.dtype) -> float:
    """Bound on |tanh form - tanh| for the form the kernels pick for this output dtype (|tanh| <= 1,
    so the approx form's relative bound is also an absolute one; tests/test_tanh.py pins both).
    torch's own fp32 tanh, on the torch backend, is within the fp32 bound too."""
    mode = dyt_ops.tanh_mode(dtype, plan.INTERPRETER_PROPS if INTERPRETER else plan.HOPPER)
    return TANH_APPROX_ERR if mode == TANH_APPROX else TANH_F32_ABS_ERR


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon (spacing of values in [1, 2)) of a floating dtype."""
    return torch.finfo(dtype).eps


def max_abs(t: Tensor) -> float:
    return 0.0 if t.numel() == 0 else t.detach().abs().max().item()


def rms(t: Tensor) -> float:
    return 0.0 if t.numel() == 0 else t.detach().double().pow(2).mean().sqrt().item()


def max_abs_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| computed in float64 (0.0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def elementwise_atol(ref64: Tensor, out_dtype: torch.dtype, fp32_err_scale: float = 0.0) -> float:
    """atol for an elementwise result computed in fp32 and rounded once to out_dtype.

    eps(out_dtype) * max|ref| is one rounding of the largest value into the output dtype (the
    naive run rounds at least that much too, so this only covers midpoint ties); fp32_err_scale is
    the caller's bound on the fp32 math error before that rounding (e.g. |w| * TANH_F32_ABS_ERR).
    """
    return eps(out_dtype) * max_abs(ref64) + fp32_err_scale


def reduction_atol(n_terms: int, term_rms: float, ref64: Tensor, out_dtype: torch.dtype,
                   per_term_err: float = 8 * FP32_EPS) -> float:
    """atol for a sum of n_terms fp32 terms (dweight, dbias, dalpha), derived from the reduced length.

    Each term carries a few fp32 errors of its own, of random sign, so over n terms they add like a
    random walk: ~ sqrt(n) * per_term_err * (typical term scale). term_rms is the caller's rms of the
    factors that multiply those errors. The default per-term budget, 8 eps32, covers the fp32 tanh
    forms (TANH_F32_ABS_ERR = 2 eps), ~4 roundings in dy*w*(1-t^2)*x and the accumulator's own
    rounding, with margin; pass more for a coarser tanh (tanh.approx). Plus one rounding of the
    result into out_dtype, the parameter's dtype.
    """
    return math.sqrt(max(n_terms, 1)) * per_term_err * term_rms + eps(out_dtype) * max_abs(ref64)


def assert_close_3way(name: str, out: Tensor, ref64: Tensor, naive: Tensor, atol: float,
                      *, factor: float = 2.0) -> None:
    """Assert max|out - ref64| <= factor * max|naive - ref64| + atol, with a readable message.

    out: the result under test; ref64: the float64 oracle; naive: plain PyTorch in the dtype under
    test (its dtype is the dtype `out` must have). Also checks shape, dtype and that out has no NaN
    or inf where the oracle is finite (NaN-poisoned buffers must have been overwritten).
    """
    assert isinstance(out, Tensor), f"{name}: expected a tensor, got {type(out).__name__}"
    assert tuple(out.shape) == tuple(ref64.shape), f"{name}: shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    assert out.dtype == naive.dtype, f"{name}: dtype {out.dtype}, expected {naive.dtype}"
    if out.numel() == 0:
        return
    o, r = out.detach().double().cpu(), ref64.detach().double().cpu()
    bad = ~torch.isfinite(o) & torch.isfinite(r)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {o.numel()} values are NaN/inf "
                             f"(first at index {idx}: got {o[idx].item()}, float64 reference {r[idx].item()})")
    err = (o - r).abs()
    naive_err = max_abs_err(naive.cpu(), r)
    bound = factor * naive_err + atol
    worst = err.max().item()
    if not worst <= bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name} ({out.dtype}): max|out - float64 ref| = {worst:.3e} at index {idx} "
            f"(out {o[idx].item():.8g}, ref {r[idx].item():.8g}) exceeds {factor:g} x plain-PyTorch "
            f"{naive.dtype} error {naive_err:.3e} + atol {atol:.3e} = {bound:.3e}")


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.fill_(float("nan"))
        return t
    return wrapper


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Within the block, torch.empty / torch.empty_like return NaN-filled floating tensors.

    Kernel launchers allocate outputs and partial-sum buffers with these; any element a kernel
    forgets to write then reads NaN instead of whatever (often zero) memory the allocator had.
    """
    orig_empty, orig_empty_like = torch.empty, torch.empty_like
    torch.empty, torch.empty_like = _poisoned(orig_empty), _poisoned(orig_empty_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = orig_empty, orig_empty_like


def assert_fresh(out: Tensor, *inputs: Tensor | None) -> None:
    """out shares no storage with any input (an op must not return or overwrite its inputs)."""
    for t in inputs:
        if t is None or t.numel() == 0 or out.numel() == 0:
            continue
        assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), \
            "output shares storage with an input"


def far_apart_rows(shape: tuple, dtype: torch.dtype, device, gap: int = (1 << 30) + 64) -> Tensor:
    """Random data of `shape`, its rows (every index but the last) `gap` elements apart in one storage:
    from the third row on, element offsets pass 2^31 while the tensor itself holds a few elements.
    Only those elements are written: the rest of the storage (4 GiB for a 2-byte dtype) stays
    untouched virtual memory on a CPU."""
    rows, cols = math.prod(shape[:-1]), shape[-1]
    big = torch.empty((rows - 1) * gap + cols, dtype=dtype, device=device)
    strides = [gap * math.prod(shape[i + 1:-1]) for i in range(len(shape) - 1)] + [1]
    view = big.as_strided(shape, strides)
    view.copy_(torch.randn(shape, device=device).to(dtype))
    return view


@contextlib.contextmanager
def signature_guards(name: str) -> Iterator[None]:
    """Run a block with the signature cache matching calls by torch's TensorGuards ("torch", where
    _signatures chose it) or by PyGuards ("python", its fallback), both caches emptied before and
    after, so each implementation's own entries are the ones tested."""
    from dyt_kernels import _signatures, functional
    chosen = {"torch": _signatures._c_guards(), "python": _signatures.PyGuards}[name]
    if chosen is None:
        raise RuntimeError("torch's TensorGuards is not usable here")
    saved = _signatures.GUARDS
    functional._VALIDATED.clear()
    functional._VALIDATED_MOD.clear()
    _signatures.GUARDS = chosen
    try:
        yield
    finally:
        _signatures.GUARDS = saved
        functional._VALIDATED.clear()
        functional._VALIDATED_MOD.clear()


def run_in_threads(work, args_list) -> None:
    """work(*args) in one thread per args, started together, with a thread switch every few bytecodes
    (sys.setswitchinterval) so that their Python interleaves as much as it can; joins them all."""
    import sys
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=args) for args in args_list]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)


# dyt_modulate's variants for the per-call tests (launch counts, host reads): residual, gate, per-token
# modulation, affine, per-channel alpha, and a sequence long enough to split samples across programs.
MOD_CASES = {
    "plain": dict(residual=False, gate=False, token=False, affine=False, alpha_c=False),
    "residual": dict(residual=True, gate=False, token=False, affine=False, alpha_c=False),
    "residual+gate": dict(residual=True, gate=True, token=False, affine=False, alpha_c=False),
    "per-token residual+gate affine alphaC": dict(residual=True, gate=True, token=True, affine=True, alpha_c=True),
    "split samples": dict(residual=True, gate=True, token=False, affine=True, alpha_c=False, L=300),
}


def modulate_case_inputs(case: str, B: int = 2, D: int = 48) -> tuple:
    """(x, alpha, shift, scale, weight, bias, residual, gate) of MOD_CASES[case], leaves that require
    grad (absent ones None)."""
    o = MOD_CASES[case]
    L = o.get("L", 16)
    mod_shape = (B, L, D) if o["token"] else (B, D)
    x = torch.randn(B, L, D, requires_grad=True)
    shift, scale = (torch.randn(mod_shape, requires_grad=True) for _ in range(2))
    residual = torch.randn(B, L, D, requires_grad=True) if o["residual"] else None
    gate = torch.randn(mod_shape, requires_grad=True) if o["gate"] else None
    alpha = (torch.rand(D if o["alpha_c"] else 1) + 0.2).requires_grad_()
    w, b = (torch.randn(D, requires_grad=True), torch.randn(D, requires_grad=True)) if o["affine"] else (None, None)
    return x, alpha, shift, scale, w, b, residual, gate
