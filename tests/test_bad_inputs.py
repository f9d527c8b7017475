"""What a hostile but fair user gets from the public API on bad input: a correct result or a clear error.

Each test asserts either the float64 answer (NaN exactly where float64 is NaN) or an error whose
message names the argument. docs/bad_inputs.md ("Kernels and the public API") lists every case with
what the user gets.
The first section holds the defects issue 12 found (silently wrong results or raw errors before
the kernels' rewrite); each of its tests failed on the code of that time.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dyt_kernels import DyT, ModulatedDyT, dyt, dyt_modulate, layernorm_modulate, use_backend
from float64_checks import (check_dyt, check_modulate, check_special_values, dyt_formula, dyt_inputs,
                            modulate_formula, modulate_inputs, run_op)
from helpers import FP32_EPS, max_abs_err

BACKENDS = ["triton", "torch"]


def other_device(device: str) -> str:
    return "cpu" if device == "cuda" else "meta"


def alpha_of(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """|alpha| in [0.2, 1.2], random sign: never ~0, so its effect shows."""
    mag = torch.rand(n, device=device) + 0.2
    return torch.where(torch.rand(n, device=device) < 0.5, -mag, mag).to(dtype)


def dyt_case(shape, C, device, dtype=torch.float32, param_dtype=torch.float32, *, per_channel=True, affine=True):
    x = (2 * torch.randn(shape, device=device)).to(dtype)
    w = torch.randn(C, device=device).to(param_dtype) if affine else None
    b = torch.randn(C, device=device).to(param_dtype) if affine else None
    return dyt_inputs(x, alpha_of(C if per_channel else 1, device, param_dtype), w, b), torch.randn_like(x)


def modulate_case(B, L, D, device, dtype=torch.float32, mod_dtype=None, param_dtype=torch.float32, *,
                  residual=True, gate=True, affine=True, per_channel=False, mode="BD"):
    mod_dtype = mod_dtype or dtype
    mod_shape = {"BD": (B, D), "B1D": (B, 1, D), "BLD": (B, L, D)}[mode]
    mod = lambda s=1.0: (s * torch.randn(mod_shape, device=device)).to(mod_dtype)  # noqa: E731
    x, res = (torch.randn(B, L, D, device=device).to(dtype) for _ in range(2))
    inputs = modulate_inputs(
        x, alpha_of(D if per_channel else 1, device, param_dtype), mod(), mod(0.5),
        (1 + 0.5 * torch.randn(D, device=device)).to(param_dtype) if affine else None,
        (0.5 * torch.randn(D, device=device)).to(param_dtype) if affine else None,
        res if residual else None, mod() if residual and gate else None)
    douts = [torch.randn(B, L, D, device=device).to(dtype) for _ in range(2 if residual else 1)]
    return inputs, douts


# ==================================================================================================
# The defects issue 12 found, each once silently wrong or a raw error: regression tests.
# ==================================================================================================

NONCONTIGUOUS_2D = {
    "transposed": lambda d: (2 * torch.randn(8, 3, device=d)).t(),        # (3, 8), strides (1, 3)
    "column_step": lambda d: (2 * torch.randn(3, 16, device=d))[:, ::2],  # (3, 8), strides (16, 2)
}
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("kind", list(NONCONTIGUOUS_2D))
def test_channels_first_noncontiguous_2d(kind, grad, backend, device):
    """(N, C) input normalized over dim 1 (= the last dim), as a transposed or column-stepped view.
    Forward alone: today silently wrong (off by O(1)); with the backward: today a reshape error."""
    x = NONCONTIGUOUS_2D[kind](device)
    assert x.shape == (3, 8) and not x.is_contiguous()
    inputs, _ = dyt_case((3, 8), 8, device)
    inputs["x"] = x
    for v in inputs.values():
        v.requires_grad_(grad)
    check_dyt(inputs, torch.randn(3, 8, device=device), backend=backend, channels_last=False)


INF_ALPHA_OPS = {  # each leaves padded lanes in some tile: 5 rows, 5 columns, 3 tokens
    "dyt-last": (dyt, dyt_formula, lambda d: dyt_case((5, 7), 7, d, per_channel=False), {}),
    "dyt-first": (dyt, dyt_formula, lambda d: dyt_case((2, 3, 5), 3, d, per_channel=False),
                  {"channels_last": False}),
    "modulate": (dyt_modulate, modulate_formula, lambda d: modulate_case(2, 3, 7, d), {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", [1, -1], ids=["+inf", "-inf"])
@pytest.mark.parametrize("op", list(INF_ALPHA_OPS))
def test_infinite_alpha(op, sign, backend, device):
    """tanh(+-inf * x) = sign(x): outputs and the parameter sums are finite in float64; dx = inf * 0
    is NaN there, and must be NaN here too (no silent zero, no NaN elsewhere)."""
    fn, formula, make, flags = INF_ALPHA_OPS[op]
    inputs, douts = make(device)
    douts = douts if isinstance(douts, list) else [douts]
    inputs["alpha"] = torch.tensor([sign * math.inf], device=device, requires_grad=True)
    check_special_values(fn, formula, inputs, douts, backend=backend, **flags)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["dyt-last-affine", "dyt-first-alphaC", "modulate-affine"])
def test_zero_channels(case, backend, device):
    """0 channels: empty outputs, and zero gradients of the (empty) per-channel tensors."""
    if case == "modulate-affine":
        inputs, douts = modulate_case(2, 3, 0, device)
        check_modulate(inputs, *douts, backend=backend)
    elif case == "dyt-last-affine":
        inputs, dy = dyt_case((4, 0), 0, device, per_channel=False)
        check_dyt(inputs, dy, backend=backend)
    else:
        inputs, dy = dyt_case((2, 0, 3), 0, device, affine=False)
        check_dyt(inputs, dy, backend=backend, channels_last=False)


def test_jit_script_dyt(device):
    norm = DyT(8, device=device)
    x = torch.randn(2, 3, 8, device=device)
    with use_backend("torch"):
        scripted = torch.jit.script(norm)
        assert torch.equal(scripted(x), norm(x))


def test_jit_script_modulated_dyt(device):
    norm = ModulatedDyT(8, device=device)
    x, mod = torch.randn(2, 3, 8, device=device), torch.randn(2, 8, device=device)
    with use_backend("torch"):
        scripted = torch.jit.script(norm)
        assert torch.equal(scripted(x, mod, mod), norm(x, mod, mod))


def test_jit_trace_dyt(device):
    norm = DyT(8, device=device)
    x = torch.randn(2, 3, 8, device=device)
    with use_backend("torch"):
        assert torch.equal(torch.jit.trace(norm, x)(x), norm(x))


BAD_NORMALIZED_SHAPES = {
    "string": "384",   # today: silently normalized_shape (3, 8, 4)
    "negative": -1,    # today: torch.empty's "negative dimension"
    "float": 2.5,      # today: "'float' object is not iterable"
    "none": None,
    "bool": True,
}


@pytest.mark.parametrize("value", list(BAD_NORMALIZED_SHAPES.values()), ids=list(BAD_NORMALIZED_SHAPES))
def test_dyt_bad_normalized_shape(value):
    with pytest.raises((TypeError, ValueError), match="normalized_shape"):
        DyT(value)


def test_dyt_numpy_int_normalized_shape(device):
    """A hidden size read from a numpy config: works as nn.LayerNorm does, or a named error."""
    try:
        norm = DyT(np.int64(8), device=device)
    except (TypeError, ValueError) as e:
        assert "normalized_shape" in str(e), f"error does not name normalized_shape: {e}"
        return
    assert norm.normalized_shape == (8,)


@pytest.mark.parametrize("module", ["DyT", "ModulatedDyT"])
def test_module_integer_dtype(module):
    make = DyT if module == "DyT" else ModulatedDyT
    with pytest.raises((TypeError, ValueError), match="dtype"):
        make(8, dtype=torch.int32)


def test_dyt_module_non_tensor_input():
    with pytest.raises((TypeError, ValueError), match="x must be"):
        DyT(8)([0.5] * 8)


def test_channels_last_none(device):
    with pytest.raises((TypeError, ValueError), match="channels_last"):
        dyt(torch.randn(2, 3, 8, device=device), 0.5, torch.ones(8, device=device), channels_last=None)


@pytest.mark.parametrize("eps", [-1e-6, math.nan, math.inf], ids=["negative", "nan", "inf"])
def test_layernorm_modulate_bad_eps(eps, device):
    x, s = torch.randn(2, 3, 8, device=device), torch.zeros(2, 8, device=device)
    with pytest.raises((TypeError, ValueError), match="eps"):
        layernorm_modulate(x, s, s, eps=eps)


def test_layernorm_modulate_mixed_weight_dtype(device):
    """Either computed (as dyt_modulate does for mixed dtypes) or refused with an error naming weight."""
    B, L, D = 2, 3, 8
    x, s = torch.randn(B, L, D, device=device), torch.randn(B, D, device=device)
    w, b = (1 + 0.5 * torch.randn(D, device=device)).bfloat16(), (0.5 * torch.randn(D, device=device)).bfloat16()
    try:
        h = layernorm_modulate(x, s, s, w, b)
    except (TypeError, ValueError) as e:
        assert "weight" in str(e), f"error does not name weight: {e}"
        return
    n = torch.nn.functional.layer_norm(x.double(), (D,), w.double(), b.double(), 1e-6)
    want = n * (1 + s.double()[:, None]) + s.double()[:, None]
    # fp32 LayerNorm of 8 values: a few fp32 roundings of O(1) results; 1e-5 is ~100 eps32.
    assert h.dtype == x.dtype and max_abs_err(h, want) <= 1e-5


def test_layernorm_modulate_dtypes_match_dyt_modulate(device):
    """The LayerNorm twin is swapped in by one flag: its outputs must come back in the same dtypes."""
    x, res = (torch.randn(2, 3, 8, device=device, dtype=torch.bfloat16) for _ in range(2))
    s = torch.randn(2, 8, device=device)
    dyt_h, dyt_r = dyt_modulate(x, 0.5, s, s, residual=res, gate=s)
    ln_h, ln_r = layernorm_modulate(x, s, s, residual=res, gate=s)
    assert (ln_h.dtype, ln_r.dtype) == (dyt_h.dtype, dyt_r.dtype)


# ==================================================================================================
# Fixed on main: regression tests.
# ==================================================================================================

def test_modulated_dyt_refuses_other_hidden_size(device):
    mod = torch.zeros(2, 16, device=device)
    with pytest.raises(ValueError, match=r"x must be \(B, L, D\) with D=hidden_size=384, got \(2, 3, 16\)"):
        ModulatedDyT(384, device=device)(torch.randn(2, 3, 16, device=device), mod, mod)


@pytest.mark.parametrize("alpha", [True, False, np.bool_(True)], ids=["True", "False", "np.bool_"])
@pytest.mark.parametrize("op", ["dyt", "dyt_modulate"])
def test_bool_alpha_refused(op, alpha, device):
    x = torch.randn(2, 3, 8, device=device)
    s = torch.zeros(2, 8, device=device)
    call = (lambda: dyt(x, alpha)) if op == "dyt" else (lambda: dyt_modulate(x, alpha, s, s))
    with pytest.raises(TypeError, match=r"alpha must be a real number or a torch.Tensor, got (bool|bool_)"):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [np.float32(0.75), np.float64(0.75), np.int64(2), 2],
                         ids=["np.float32", "np.float64", "np.int64", "int"])
def test_numpy_and_int_alpha_accepted(alpha, backend, device):
    """A numpy or int alpha is the same number as a Python float: same result, bit for bit."""
    x = torch.randn(5, 8, device=device)
    with use_backend(backend):
        assert torch.equal(dyt(x, alpha), dyt(x, float(alpha)))


# ==================================================================================================
# Errors: each names the argument and what was expected.
# ==================================================================================================

def _x(d, *shape):
    return torch.randn(shape or (4, 8), device=d)


def _z(d, *shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype, device=d)


def _mod(d, *, x=None, alpha=0.5, shift="ok", scale="ok", **kw):
    """dyt_modulate on x (2, 3, 8) with zero (B, D) shift/scale unless given."""
    x = _x(d, 2, 3, 8) if x is None else x
    return dyt_modulate(x, alpha, _z(d, 2, 8) if isinstance(shift, str) else shift,
                        _z(d, 2, 8) if isinstance(scale, str) else scale, **kw)


def _ln(d, *, shift="ok", **kw):
    """layernorm_modulate on x (2, 3, 8) with zero (B, D) shift/scale unless given."""
    return layernorm_modulate(_x(d, 2, 3, 8), _z(d, 2, 8) if isinstance(shift, str) else shift, _z(d, 2, 8), **kw)


# case id -> (call on device d, exception type, regex its message must match)
ERRORS = {
    # dyt: x
    "dyt/x-int64": (lambda d: dyt(_x(d).long(), 0.5), TypeError,
                    r"x must be float32, bfloat16, float16 or float64, got torch.int64"),
    "dyt/x-bool": (lambda d: dyt(_x(d) > 0, 0.5), TypeError, r"x must be float32.*got torch.bool"),
    "dyt/x-complex": (lambda d: dyt(_x(d).to(torch.complex64), 0.5), TypeError,
                      r"x must be float32.*got torch.complex64"),
    "dyt/x-uint8": (lambda d: dyt(_x(d).to(torch.uint8), 0.5), TypeError, r"x must be float32.*got torch.uint8"),
    "dyt/x-list": (lambda d: dyt([[1.0, 2.0]], 0.5), TypeError, r"x must be a torch.Tensor, got list"),
    "dyt/x-sparse": (lambda d: dyt(_x(d).to_sparse(), 0.5), TypeError,
                     r"x must be a dense tensor, got layout torch.sparse_coo; convert it with .to_dense\(\)"),
    "dyt/x-sparse-channels-first": (lambda d: dyt(_x(d, 2, 8, 3).to_sparse(), 0.5, channels_last=False), TypeError,
                                    r"x must be a dense tensor, got layout torch.sparse_coo"),
    "dyt/x-csr": (lambda d: dyt(_x(d).to_sparse_csr(), 0.5), TypeError,
                  r"x must be a dense tensor, got layout torch.sparse_csr"),
    "dyt_modulate/shift-csr": (lambda d: _mod(d, shift=_z(d, 2, 8).to_sparse_csr()), TypeError,
                               r"shift must be a dense tensor, got layout torch.sparse_csr"),
    "dyt/weight-sparse": (lambda d: dyt(_x(d, 2, 8), 0.5, _z(d, 8).to_sparse()), TypeError,
                          r"weight must be a dense tensor, got layout torch.sparse_coo"),
    "dyt/alpha-sparse": (lambda d: dyt(_x(d, 2, 8), _z(d, 1).to_sparse()), TypeError,
                         r"alpha must be a dense tensor, got layout torch.sparse_coo"),
    "dyt/x-numpy": (lambda d: dyt(np.ones((2, 8), np.float32), 0.5), TypeError,
                    r"x must be a torch.Tensor, got ndarray"),
    "dyt/x-none": (lambda d: dyt(None, 0.5), TypeError, r"x must be a torch.Tensor, got NoneType"),
    "dyt/x-0d": (lambda d: dyt(torch.tensor(1.0, device=d), 0.5), ValueError, r"x must have at least 1 dims"),
    "dyt/x-1d-channels-first": (lambda d: dyt(_x(d, 8), 0.5, channels_last=False), ValueError,
                                r"x must have at least 2 dims"),
    # dyt: alpha
    "dyt/alpha-str": (lambda d: dyt(_x(d), "0.5"), TypeError,
                      r"alpha must be a real number or a torch.Tensor, got str"),
    "dyt/alpha-none": (lambda d: dyt(_x(d), None), TypeError, r"alpha must be .* got NoneType"),
    "dyt/alpha-complex": (lambda d: dyt(_x(d), 0.5j), TypeError, r"alpha must be .* got complex"),
    "dyt/alpha-list": (lambda d: dyt(_x(d), [0.5]), TypeError, r"alpha must be .* got list"),
    "dyt/alpha-numpy-array": (lambda d: dyt(_x(d), np.array([0.5])), TypeError, r"alpha must be .* got ndarray"),
    "dyt/alpha-int-tensor": (lambda d: dyt(_x(d), _z(d, 1, dtype=torch.int64)), TypeError,
                             r"alpha must be a floating-point tensor, got torch.int64"),
    "dyt/alpha-complex-tensor": (lambda d: dyt(_x(d), _z(d, 1, dtype=torch.complex64)), TypeError,
                                 r"alpha must be a floating-point tensor, got torch.complex64"),
    "dyt/alpha-2-of-8": (lambda d: dyt(_x(d), _z(d, 2)), ValueError,
                         r"alpha must have 1 element \(scalar\) or shape \(8,\) \(per channel\), got \(2\)"),
    "dyt/alpha-1x8": (lambda d: dyt(_x(d), _z(d, 1, 8)), ValueError, r"alpha must have 1 element .*got \(1, 8\)"),
    "dyt/alpha-other-device": (lambda d: dyt(_x(d), torch.ones(1, device=other_device(d))), ValueError,
                               r"alpha is on .* but x is on .*; move them to one device"),
    # dyt: weight and bias
    "dyt/weight-7-of-8": (lambda d: dyt(_x(d), 0.5, _z(d, 7)), ValueError, r"weight must have shape \(8,\), got \(7\)"),
    "dyt/weight-1x8": (lambda d: dyt(_x(d), 0.5, _z(d, 1, 8)), ValueError,
                       r"weight must have shape \(8,\), got \(1, 8\)"),
    "dyt/weight-int": (lambda d: dyt(_x(d), 0.5, _z(d, 8, dtype=torch.int32)), TypeError,
                       r"weight must be a floating-point tensor, got torch.int32"),
    "dyt/weight-bool": (lambda d: dyt(_x(d), 0.5, _z(d, 8, dtype=torch.bool)), TypeError,
                        r"weight must be a floating-point tensor, got torch.bool"),
    "dyt/weight-complex": (lambda d: dyt(_x(d), 0.5, _z(d, 8, dtype=torch.complex64)), TypeError,
                           r"weight must be a floating-point tensor, got torch.complex64"),
    "dyt/weight-list": (lambda d: dyt(_x(d), 0.5, [1.0] * 8), TypeError,
                        r"weight must be a torch.Tensor or None, got list"),
    "dyt/weight-other-device": (lambda d: dyt(_x(d), 0.5, torch.ones(8, device=other_device(d))), ValueError,
                                r"weight is on .* but x is on"),
    "dyt/bias-9-of-8": (lambda d: dyt(_x(d), 0.5, None, _z(d, 9)), ValueError,
                        r"bias must have shape \(8,\), got \(9\)"),
    "dyt/bias-float": (lambda d: dyt(_x(d), 0.5, None, 0.0), TypeError,
                       r"bias must be a torch.Tensor or None, got float"),
    "dyt/bias-other-device": (lambda d: dyt(_x(d), 0.5, None, torch.ones(8, device=other_device(d))), ValueError,
                              r"bias is on .* but x is on"),
    "dyt/channels-first-weight-of-last-dim": (lambda d: dyt(_x(d, 2, 3, 8), 0.5, _z(d, 8), channels_last=False),
                                              ValueError, r"weight must have shape \(3,\), got \(8\)"),
    # dyt: flags and arity
    "dyt/channels_last-str": (lambda d: dyt(_x(d), 0.5, channels_last="no"), TypeError,
                              r"channels_last must be True or False, got 'no'"),
    "dyt/five-positional": (lambda d: dyt(_x(d), 0.5, None, None, False), TypeError,
                            r"dyt\(\) takes from 2 to 4 positional arguments"),
    # dyt_modulate
    "dyt_modulate/x-2d": (lambda d: _mod(d, x=_x(d, 3, 8)), ValueError, r"x must be \(B, L, D\), got \(3, 8\)"),
    "dyt_modulate/x-4d": (lambda d: _mod(d, x=_x(d, 1, 2, 3, 8)), ValueError,
                          r"x must be \(B, L, D\), got \(1, 2, 3, 8\)"),
    "dyt_modulate/x-int": (lambda d: _mod(d, x=_x(d, 2, 3, 8).long()), TypeError,
                           r"x must be float32.*got torch.int64"),
    "dyt_modulate/x-list": (lambda d: _mod(d, x=[[[1.0]]]), TypeError, r"x must be a torch.Tensor, got list"),
    "dyt_modulate/x-sparse": (lambda d: _mod(d, x=_x(d, 2, 3, 8).to_sparse()), TypeError,
                              r"x must be a dense tensor, got layout torch.sparse_coo"),
    "dyt_modulate/shift-sparse": (lambda d: _mod(d, shift=_z(d, 2, 8).to_sparse()), TypeError,
                                  r"shift must be a dense tensor, got layout torch.sparse_coo"),
    "dyt_modulate/residual-csr": (lambda d: _mod(d, residual=_x(d, 2, 3, 8).to_sparse_csr()), TypeError,
                                  r"residual must be a dense tensor, got layout torch.sparse_csr"),
    "dyt_modulate/shift-none": (lambda d: _mod(d, shift=None), TypeError, r"shift and scale are required tensors"),
    "dyt_modulate/scale-none": (lambda d: _mod(d, scale=None), TypeError, r"shift and scale are required tensors"),
    "dyt_modulate/shift-float": (lambda d: _mod(d, shift=0.0), TypeError, r"shift must be a torch.Tensor, got float"),
    "dyt_modulate/shift-int": (lambda d: _mod(d, shift=_z(d, 2, 8, dtype=torch.int64)), TypeError,
                               r"shift must be a floating-point tensor, got torch.int64"),
    "dyt_modulate/shift-bool": (lambda d: _mod(d, shift=_z(d, 2, 8, dtype=torch.bool)), TypeError,
                                r"shift must be a floating-point tensor, got torch.bool"),
    "dyt_modulate/scale-complex": (lambda d: _mod(d, scale=_z(d, 2, 8, dtype=torch.complex64)), TypeError,
                                   r"scale must be a floating-point tensor, got torch.complex64"),
    "dyt_modulate/shift-1d": (lambda d: _mod(d, shift=_z(d, 8)), ValueError,
                             r"shift must be \(B, D\), \(B, 1, D\) or \(B, L, D\) with B=2, L=3, D=8, got \(8\)"),
    "dyt_modulate/shift-1xD": (lambda d: _mod(d, shift=_z(d, 1, 8)), ValueError, r"shift must be .*got \(1, 8\)"),
    "dyt_modulate/shift-wrong-D": (lambda d: _mod(d, shift=_z(d, 2, 7)), ValueError, r"shift must be .*got \(2, 7\)"),
    "dyt_modulate/scale-wrong-L": (lambda d: _mod(d, scale=_z(d, 2, 4, 8)), ValueError,
                                     r"scale must be .*got \(2, 4, 8\)"),
    "dyt_modulate/shift-other-device": (lambda d: _mod(d, shift=torch.zeros(2, 8, device=other_device(d))), ValueError,
                                        r"shift is on .* but x is on"),
    "dyt_modulate/gate-without-residual": (lambda d: _mod(d, gate=_z(d, 2, 8)), ValueError,
                                           r"gate scales x before the residual add, so it needs residual"),
    "dyt_modulate/gate-wrong-shape": (lambda d: _mod(d, residual=_x(d, 2, 3, 8), gate=_z(d, 2, 9)), ValueError,
                                      r"gate must be .*got \(2, 9\)"),
    "dyt_modulate/gate-int": (lambda d: _mod(d, residual=_x(d, 2, 3, 8), gate=_z(d, 2, 8, dtype=torch.int32)),
                              TypeError, r"gate must be a floating-point tensor"),
    "dyt_modulate/gate-other-device": (
        lambda d: _mod(d, residual=_x(d, 2, 3, 8), gate=torch.zeros(2, 8, device=other_device(d))),
        ValueError, r"gate is on .* but x is on"),
    "dyt_modulate/residual-wrong-shape": (lambda d: _mod(d, residual=_x(d, 2, 3, 7)), ValueError,
                                          r"residual must match x: shape \(2, 3, 8\) .*got \(2, 3, 7\)"),
    "dyt_modulate/residual-other-device": (lambda d: _mod(d, residual=_x(d, 2, 3, 8).to(other_device(d))), ValueError,
                                           r"residual must match x: .* on "),
    "dyt_modulate/residual-int": (lambda d: _mod(d, residual=_x(d, 2, 3, 8).long()), TypeError,
                                  r"residual must be float32.*got torch.int64"),
    "dyt_modulate/residual-list": (lambda d: _mod(d, residual=[0.0]), TypeError,
                                   r"residual must be a torch.Tensor, got list"),
    "dyt_modulate/alpha-2-of-8": (lambda d: _mod(d, alpha=_z(d, 2)), ValueError, r"alpha must have 1 element .*\(8,\)"),
    "dyt_modulate/alpha-str": (lambda d: _mod(d, alpha="0.5"), TypeError,
                               r"alpha must be a real number or a torch.Tensor, got str"),
    "dyt_modulate/weight-9-of-8": (lambda d: _mod(d, weight=_z(d, 9)), ValueError, r"weight must have shape \(8,\)"),
    "dyt_modulate/bias-other-device": (lambda d: _mod(d, bias=torch.ones(8, device=other_device(d))), ValueError,
                                       r"bias is on .* but x is on"),
    # layernorm_modulate
    "layernorm_modulate/x-int": (lambda d: layernorm_modulate(_x(d, 2, 3, 8).long(), _z(d, 2, 8), _z(d, 2, 8)),
                                 TypeError, r"x must be float32.*got torch.int64"),
    "layernorm_modulate/shift-wrong-D": (lambda d: _ln(d, shift=_z(d, 2, 7)), ValueError,
                                         r"shift must be .*got \(2, 7\)"),
    "layernorm_modulate/gate-without-residual": (lambda d: _ln(d, gate=_z(d, 2, 8)), ValueError,
                                                 r"gate .* needs residual"),
    "layernorm_modulate/eps-str": (lambda d: _ln(d, eps="1e-6"), ValueError, r"eps must be a finite number, got '1e-6'"),
    # DyT
    "DyT/wrong-trailing-dim": (lambda d: DyT(8, device=d)(_x(d, 2, 7)), ValueError,
                               r"x must end in normalized_shape=\(8,\), got shape \(2, 7\)"),
    "DyT/int-x": (lambda d: DyT(8, device=d)(_x(d, 2, 8).long()), TypeError, r"x must be float32.*got torch.int64"),
    "DyT/channels-first-1d-x": (lambda d: DyT(8, channels_last=False, device=d)(_x(d, 8)), ValueError,
                                r"x must be \(N, C=8, \.\.\.\) for channels_last=False, got shape \(8,\)"),
    "DyT/channels-first-wrong-C": (lambda d: DyT(8, channels_last=False, device=d)(_x(d, 2, 7, 3)), ValueError,
                                   r"x must be \(N, C=8, \.\.\.\)"),
    "DyT/channels-first-tuple-shape": (lambda d: DyT((2, 4), channels_last=False), ValueError,
                                       r"normalized_shape must be an int"),
    "DyT/zero-in-tuple-shape": (lambda d: DyT((4, 0)), ValueError,
                                r"normalized_shape must be positive ints .*, got \(4, 0\)"),
    "DyT/alpha_init_value-nan": (lambda d: DyT(8, alpha_init_value=math.nan), ValueError,
                                 r"alpha_init_value must be a finite number, got nan"),
    "DyT/alpha_init_value-str": (lambda d: DyT(8, alpha_init_value="0.5"), ValueError,
                                 r"alpha_init_value must be a finite number, got '0.5'"),
    "DyT/weight_init_value-inf": (lambda d: DyT(8, weight_init_value=math.inf), ValueError,
                                  r"weight_init_value must be a finite number, got inf"),
    "DyT/load-wrong-alpha": (
        lambda d: DyT(8).load_state_dict({"alpha": torch.ones(2), "weight": torch.ones(8), "bias": torch.zeros(8)}),
        RuntimeError, r"size mismatch for alpha"),
    # ModulatedDyT
    "ModulatedDyT/x-list": (lambda d: ModulatedDyT(8)([0.0], _z(d, 2, 8), _z(d, 2, 8)), ValueError,
                            r"x must be \(B, L, D\) with D=hidden_size=8, got list"),
    "ModulatedDyT/shift-wrong-D": (lambda d: ModulatedDyT(8, device=d)(_x(d, 2, 3, 8), _z(d, 2, 7), _z(d, 2, 8)),
                                   ValueError, r"shift must be .*got \(2, 7\)"),
    "ModulatedDyT/alpha_init_value-inf": (lambda d: ModulatedDyT(8, alpha_init_value=math.inf), ValueError,
                                          r"alpha_init_value must be a finite number"),
    # use_backend
    "use_backend/unknown": (lambda d: use_backend("TRITON").__enter__(), ValueError,
                            r"backend must be one of \('auto', 'triton', 'torch'\), got 'TRITON'"),
    "use_backend/none": (lambda d: use_backend(None).__enter__(), ValueError, r"backend must be one of .*got None"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_errors(case, backend, device):
    """Each bad input raises its exception, with a message naming the argument (on either backend:
    the checks run before the backend is chosen)."""
    call, exc, match = ERRORS[case]
    with use_backend(backend), pytest.raises(exc, match=match):
        call(device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_x_after_an_expanded_x_of_its_strides(backend, device):
    """A sparse x reports zero strides, as a dense x expanded from a scalar has: after such an x, a
    sparse one of the same shape is still refused by name (expanded x never caches its signature)."""
    a, w, b = torch.tensor([0.5], device=device), torch.ones(8, device=device), torch.zeros(8, device=device)
    expanded = torch.tensor(1.5, device=device).expand(4, 8)
    sparse = torch.randn(4, 8, device=device).to_sparse()
    assert sparse.stride() == expanded.stride() == (0, 0)
    with use_backend(backend):
        for _ in range(2):
            torch.testing.assert_close(dyt(expanded, a, w, b), torch.full((4, 8), math.tanh(0.75), device=device))
        with pytest.raises(TypeError, match="x must be a dense tensor, got layout torch.sparse_coo"):
            dyt(sparse, a, w, b)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "384", np.int64(8)], ids=str)
def test_modulated_dyt_bad_hidden_size(value):
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int, got"):
        ModulatedDyT(value)


def test_bad_backend_environment_variable(monkeypatch, device):
    monkeypatch.setenv("DYT_KERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"DYT_KERNELS_BACKEND must be one of .*got 'gpu'"):
        dyt(torch.randn(2, 4, device=device), 0.5)


# ==================================================================================================
# Unusual but valid input: the float64 answer.
# ==================================================================================================

MIXED_DTYPES = {  # (x dtype, alpha dtype, weight dtype, bias dtype)
    "x16-p64": (torch.float16, torch.float64, torch.float64, torch.float64),
    "xbf16-p32": (torch.bfloat16, torch.float32, torch.float32, torch.float32),
    "x32-pbf16": (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "x64-p16": (torch.float64, torch.float16, torch.float16, torch.float16),
    "x32-each-own": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "x64-p64": (torch.float64, torch.float64, torch.float64, torch.float64),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", list(MIXED_DTYPES))
def test_dyt_mixed_dtypes(dtypes, backend, device):
    """x and each parameter in its own dtype: y comes back in x's dtype, each gradient in its input's."""
    xd, ad, wd, bd = MIXED_DTYPES[dtypes]
    x = (2 * torch.randn(3, 5, 24, device=device)).to(xd)
    inputs = dyt_inputs(x, alpha_of(24, device, ad), torch.randn(24, device=device).to(wd),
                        torch.randn(24, device=device).to(bd))
    out = check_dyt(inputs, torch.randn_like(x), backend=backend)
    assert out["y"].dtype == xd and out["dalpha"].dtype == ad
    assert out["dweight"].dtype == wd and out["dbias"].dtype == bd


MODULATE_MIXED = {  # (x and residual dtype, shift/scale/gate dtype, alpha/weight/bias dtype)
    "xbf16-mod32": (torch.bfloat16, torch.float32, torch.float32),
    "x32-modbf16": (torch.float32, torch.bfloat16, torch.bfloat16),
    "x16-mod32-p64": (torch.float16, torch.float32, torch.float64),
    "x64-mod32": (torch.float64, torch.float32, torch.float32),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["BD", "BLD"])
@pytest.mark.parametrize("dtypes", list(MODULATE_MIXED))
def test_dyt_modulate_mixed_dtypes(dtypes, mode, backend, device):
    xd, md, pd = MODULATE_MIXED[dtypes]
    inputs, douts = modulate_case(2, 5, 24, device, xd, md, pd, affine=True, mode=mode)
    out = check_modulate(inputs, *douts, backend=backend)
    assert out["h"].dtype == xd and out["r"].dtype == xd
    assert out["dshift"].dtype == md and out["dgate"].dtype == md and out["dalpha"].dtype == pd


@pytest.mark.parametrize("backend", BACKENDS)
def test_dyt_modulate_residual_wider_than_x(backend, device):
    """r comes back in residual's dtype (fp32), h in x's (bf16): each within one rounding of float64."""
    B, L, D = 2, 5, 16
    x, s = torch.randn(B, L, D, device=device, dtype=torch.bfloat16), torch.randn(B, D, device=device)
    res = torch.randn(B, L, D, device=device)
    with use_backend(backend):
        h, r = dyt_modulate(x, 0.5, s, s, residual=res, gate=s)
    h64, r64 = modulate_formula(x.double(), 0.5, s.double(), s.double(), residual=res.double(), gate=s.double())
    assert h.dtype == torch.bfloat16 and r.dtype == torch.float32
    # r: one fp32 rounding of |r| <= ~10 (plus the product's); h: one bf16 rounding of |h| plus the fp32
    # tanh error scaled by |1 + scale| (<= ~4): eps(bf16) * max|h| covers both with room.
    assert max_abs_err(r, r64) <= 4 * FP32_EPS * r64.abs().max().item()
    assert max_abs_err(h, h64) <= torch.finfo(torch.bfloat16).eps * h64.abs().max().item()


def _poisoned_x(kind: str, shape, device) -> torch.Tensor:
    x = 2 * torch.randn(shape, device=device)
    flat = x.view(-1)
    if kind == "nan":
        flat[3] = math.nan
    elif kind == "inf":
        flat[3], flat[7] = math.inf, -math.inf
    elif kind == "huge":  # tanh saturates; gate * x and the sums stay finite in fp32 (alpha * x
        flat[3], flat[7] = 1e37, -1e37  # overflowing fp32 is test_extreme_alpha's 1e38)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nan", "inf", "huge"])
@pytest.mark.parametrize("layout", ["last", "first", "modulate"])
def test_nonfinite_x(layout, kind, backend, device):
    """NaN/inf/huge x: NaN exactly where float64 has NaN (the element, its channel's weight/alpha sums,
    NaN * 0 in dalpha for inf x), the float64 value everywhere else."""
    if layout == "modulate":
        inputs, douts = modulate_case(2, 3, 8, device, affine=True, per_channel=True)
        inputs["x"] = _poisoned_x(kind, (2, 3, 8), device).requires_grad_()
        check_special_values(dyt_modulate, modulate_formula, inputs, douts, backend=backend)
        return
    shape = (4, 8) if layout == "last" else (2, 4, 3)
    inputs, dy = dyt_case(shape, 8 if layout == "last" else 4, device)
    inputs["x"] = _poisoned_x(kind, shape, device).requires_grad_()
    check_special_values(dyt, dyt_formula, inputs, [dy], backend=backend, channels_last=layout == "last")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["weight", "bias", "shift", "scale", "gate", "residual"])
def test_nan_in_parameters(where, backend, device):
    """A NaN in a parameter or modulation tensor poisons exactly what it touches in float64."""
    inputs, douts = modulate_case(2, 3, 8, device, affine=True)
    with torch.no_grad():
        inputs[where].view(-1)[1] = math.nan
    check_special_values(dyt_modulate, modulate_formula, inputs, douts, backend=backend)


def _inf_cases():
    for where in ["weight", "bias", "scale", "shift", "gate", "residual"]:
        for backend in BACKENDS:
            yield pytest.param(where, backend, id=f"{where}-{backend}")


@pytest.mark.parametrize("where,backend", list(_inf_cases()))
def test_inf_in_parameters(where, backend, device):
    """An inf in channel 5 of a parameter or modulation tensor (3 tokens: the backward's tiles have
    padded rows). dh's signs in that channel are set so that float64's sums over it are +inf, not
    NaN: dscale (inf bias), dbias (inf scale), dalpha (inf weight)."""
    B, L, D, c = 2, 3, 8, 5
    inputs, douts = modulate_case(B, L, D, device, affine=True)
    spot = {"weight": (c,), "bias": (c,), "scale": (1, c), "shift": (1, c), "gate": (1, c), "residual": (1, 2, c)}
    with torch.no_grad():
        inputs[where][spot[where]] = math.inf
        f = lambda k: inputs[k].detach().double()  # noqa: E731
        r = f("residual") + f("gate")[:, None] * f("x")
        # Every term of the sum dalpha = sum dh*(1 + scale)*w*(1 - t^2)*r then has one sign in channel c.
        sign = torch.sign((1 + f("scale")[:, None, c]) * r[..., c]) if where == "weight" else 1.0
        douts[0][..., c] = douts[0][..., c].abs() * sign
    check_special_values(dyt_modulate, modulate_formula, inputs, douts, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [math.nan, 1e30, 1e38, 1e-30, 0.0, -0.0], ids=str)
@pytest.mark.parametrize("op", ["dyt", "modulate"])
def test_extreme_alpha(op, alpha, backend, device):
    """Huge alpha saturates tanh (1e38 * x overflows fp32 to inf: still tanh = +-1), tiny alpha makes
    DyT linear, 0 makes it the bias, NaN makes everything NaN; all as float64 has them. (No residual:
    its rounding, scaled by a huge alpha, would swamp the tolerances.)"""
    if op == "dyt":
        inputs, douts = dyt_case((5, 7), 7, device, per_channel=False)
        douts = [douts]
        fn, formula, check = dyt, dyt_formula, lambda: check_dyt(inputs, *douts, backend=backend)
    else:
        inputs, douts = modulate_case(2, 3, 7, device, residual=False)
        fn, formula, check = dyt_modulate, modulate_formula, lambda: check_modulate(inputs, douts[0], None,
                                                                                   backend=backend)
    inputs["alpha"] = torch.tensor([alpha], device=device, requires_grad=True)
    if math.isnan(alpha) or abs(alpha) > 1:
        # NaN, or saturated: dx = alpha * 0 and the tolerances' |alpha| factors mean nothing; the
        # float64 values (dx = 0 exactly) to SPECIAL_RTOL instead.
        check_special_values(fn, formula, inputs, douts, backend=backend)
    else:
        check()  # finite, moderate: the full three-way check, relative to the (tiny) magnitudes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("only", ["x", "alpha", "shift", "scale", "gate", "residual", "weight", "none"])
def test_dyt_modulate_one_input_requires_grad(only, backend, device):
    """Only one tensor needs a gradient: it gets the float64 one, the others get none."""
    inputs, douts = modulate_case(2, 5, 16, device, affine=True, mode="BLD" if only == "gate" else "BD")
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v.requires_grad_(k == only)
    if only == "none":
        with use_backend(backend):
            h, r = dyt_modulate(**inputs)
        assert not h.requires_grad and not r.requires_grad
        return
    out = check_modulate(inputs, *douts, backend=backend)
    assert [k for k in out if k.startswith("d")] == [f"d{only}"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 8), (2, 0, 8), (0, 0, 8)], ids=["B0", "L0", "B0L0"])
@pytest.mark.parametrize("mode", ["BD", "BLD"])
def test_dyt_modulate_empty(shape, mode, backend, device):
    """No samples or no tokens: empty outputs, zero per-sample and per-channel gradients."""
    inputs, douts = modulate_case(*shape, device, affine=True, per_channel=True, mode=mode)
    out = check_modulate(inputs, *douts, backend=backend)
    for k in ("dalpha", "dweight", "dbias"):
        assert torch.count_nonzero(out[k]) == 0, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_give_shapes(backend):
    """Meta tensors (shape inference, no data) pass through either backend as meta results."""
    x = torch.empty(2, 3, 8, device="meta")
    s = torch.empty(2, 8, device="meta")
    with use_backend(backend):
        y = dyt(x, 0.5, torch.empty(8, device="meta"))
        h, r = dyt_modulate(x, 0.5, s, s, residual=x, gate=s)
    assert y.device.type == h.device.type == r.device.type == "meta"
    assert y.shape == h.shape == r.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_exact_under_triton_backend(backend, device):
    """float64 input always runs the float64 path: the formula to float64 rounding."""
    inputs, dy = dyt_case((3, 7, 10), 10, device, torch.float64, torch.float64)
    (y,), grads = run_op(dyt, inputs, [dy], backend)
    x, a, w, b = (inputs[k].detach() for k in ("x", "alpha", "weight", "bias"))
    # float64 both ways, different order of the same operations: ~1e-16 relative.
    torch.testing.assert_close(y, dyt_formula(x, a, w, b), rtol=1e-12, atol=1e-12)
    assert all(g.dtype == torch.float64 for g in grads.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_float64(backend, device):
    """Second derivatives (a gradient penalty): with create_graph=True the backward takes reference.py's
    formulas, which autograd differentiates, so the float64 value on either backend."""
    x = torch.randn(3, 5, device=device, requires_grad=True)
    a = torch.tensor([0.7], device=device, requires_grad=True)
    with use_backend(backend):
        (gx,) = torch.autograd.grad(dyt(x, a).pow(2).sum(), x, create_graph=True)
        (gga,) = torch.autograd.grad(gx.pow(2).sum(), a)
    x64, a64 = x.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(torch.tanh(a64 * x64).pow(2).sum(), x64, create_graph=True)
    (gga64,) = torch.autograd.grad(gx64.pow(2).sum(), a64)
    torch.testing.assert_close(gga.double(), gga64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_modified_in_place_after_forward(backend, device):
    """Changing x in place between forward and backward: autograd's version check refuses it."""
    x = torch.randn(3, 5, device=device, requires_grad=True)
    h = x * 1
    with use_backend(backend):
        y = dyt(h, 0.5)
        h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_and_no_grad(backend, device):
    norm = DyT(8, device=device)
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    with use_backend(backend):
        with torch.inference_mode():
            y_inf = norm(x)
        with torch.no_grad():
            y_ng = norm(x)
        y = norm(x)
    assert not y_inf.requires_grad and not y_ng.requires_grad and y.requires_grad
    assert torch.equal(y_inf, y.detach()) and torch.equal(y_ng, y.detach())


@pytest.mark.parametrize("gate", [False, True], ids=["residual", "residual+gate"])
def test_dyt_modulate_residual_wider_than_x_gradients(gate, device):
    """bf16 x with an fp32 residual: the kernels write dresidual (fp32) and dx (bf16) as two outputs,
    even without a gate, where they are the same values in two dtypes. Gradients match the torch
    backend (the reference formulas, the same roundings) on the same upstream gradients."""
    B, L, D = 2, 5, 24
    x = torch.randn(B, L, D, device=device).bfloat16().requires_grad_()
    res, s, g = (torch.randn(*shape, device=device, requires_grad=True) for shape in ((B, L, D), (B, D), (B, D)))
    dh, dr = torch.randn(B, L, D, device=device).bfloat16(), torch.randn(B, L, D, device=device)
    leaves = (x, res, s, g) if gate else (x, res, s)
    got = {}
    for backend in BACKENDS:
        with use_backend(backend):
            h, r = dyt_modulate(x, 0.5, s, s, residual=res, gate=g if gate else None)
        got[backend] = torch.autograd.grad((h, r), leaves, (dh, dr))
    for name, a, b in zip(("dx", "dresidual", "dshift+dscale", "dgate"), got["triton"], got["torch"]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # dx: one bf16 rounding apart at most (fp32 values a tanh-form error apart can round either way);
        # the fp32 ones: a few fp32 eps of their scale, times the L = 5 tokens a per-sample sum adds.
        bound = (torch.finfo(torch.bfloat16).eps if a.dtype == torch.bfloat16 else 8 * L * FP32_EPS)
        assert max_abs_err(a, b) <= bound * b.float().abs().max().item(), name
