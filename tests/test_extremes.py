"""The kernels' numerics at the edges: values, signs and sizes where a fused form can part from eager.

Each test compares the Triton backend (the interpreter here) and the torch backend with float64 or
with the eager expression `weight * torch.tanh(alpha * x) + bias` (and dyt_modulate's equivalent),
forward and backward. Tests marked "fails before" were written against a defect and failed on the
code before its fix; the others pin behaviour that was already right where the suite had no test.
docs/bad_inputs.md has a row for each.
"""
from __future__ import annotations

import math

import pytest
import torch

from dyt_kernels import dyt, dyt_modulate, use_backend

BACKENDS = ["triton", "torch"]


# --------------------------------------------------------------------------------------------------
# alpha given as a Python number
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["dyt", "modulate"])
def test_python_alpha_keeps_float64_precision(op, backend, device):
    """A float64 x with a Python-float alpha computes with alpha as a float64, as `0.1 * x` does.
    Fails before: alpha was made a float32 tensor whatever x's dtype, so dyt(x64, 0.1) used
    0.100000001490116... and was off by ~1.5e-8 relative (4e-9 here) where float64 is exact to 1e-16."""
    torch.manual_seed(0)
    x = 3 * torch.randn(4, 3, 8, dtype=torch.float64, device=device)
    alpha = 0.1
    if op == "dyt":
        with use_backend(backend):
            y = dyt(x, alpha)
        ref = torch.tanh(alpha * x)
    else:
        s = 0.5 * torch.randn(4, 8, dtype=torch.float64, device=device)
        with use_backend(backend):
            y = dyt_modulate(x, alpha, s, s)
        ref = torch.tanh(alpha * x) * (1 + s[:, None]) + s[:, None]
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=1e-14, atol=1e-14)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's inf * 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("alpha", [1e39, -1e300], ids=["1e39", "-1e300"])
def test_python_alpha_past_float32_range(alpha, dtype, backend, device):
    """A Python alpha beyond float32's range is taken as eager `alpha * x` takes it: float32 x rounds
    it to +-inf (tanh = +-1, NaN at x = 0 as inf * 0 is in eager), float64 x keeps it (0 at x = 0).
    Fails before: `RuntimeError: value cannot be converted to type float without overflow`, from
    the cast that made alpha a float32 tensor, while alpha=math.inf and a tensor alpha of 1e38 ran."""
    x = torch.tensor([[0.0, 1.5, -2.0, 1e-30, -3e-41]], dtype=dtype, device=device)
    with use_backend(backend):
        y = dyt(x, alpha)
    ref = torch.tanh(alpha * x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
    if dtype == torch.float32:   # the same as a float32 tensor alpha of that (rounded) value
        with use_backend(backend):
            same = dyt(x, torch.tensor([alpha], dtype=torch.float64, device=device).float())
        torch.testing.assert_close(y, same, rtol=0, atol=0, equal_nan=True)


def test_python_int_alpha_past_float64_range_is_refused_by_name():
    """An int no float holds (10**400): before, Python's bare 'OverflowError: int too large to convert
    to float', which named no argument."""
    with pytest.raises(ValueError, match=r"alpha must be a real number within float64's range, got an int of 1329 bits"):
        dyt(torch.randn(2, 4), 10 ** 400)


# --------------------------------------------------------------------------------------------------
# Infinite parameters where a tile has padded lanes
# --------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's inf * 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", [1, -1], ids=["+inf", "-inf"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("mode", ["BD", "B1D"])
def test_modulate_infinite_weight_without_bias(mode, residual, sign, backend, device):
    """weight[c] = +-inf and no bias, per-sample scale, 3 tokens (the backward's tiles have padded
    rows). dh's signs in channel c make float64's dscale there sum to +inf. Fails before (triton):
    dscale[:, c] was NaN: the padded rows' n = w * tanh(0) = inf * 0 entered the sum (with a bias,
    n was masked; tests/test_bad_inputs.py::test_inf_in_parameters covers that case only)."""
    from float64_checks import check_special_values, modulate_formula, modulate_inputs
    B, L, D, c = 2, 3, 8, 5
    torch.manual_seed(1)
    mshape = (B, D) if mode == "BD" else (B, 1, D)
    x = torch.randn(B, L, D, device=device)
    res = torch.randn(B, L, D, device=device) if residual else None
    gate = torch.randn(mshape, device=device) if residual else None
    weight = 1 + 0.5 * torch.randn(D, device=device)
    weight[c] = sign * math.inf
    alpha = torch.tensor([0.7], device=device)
    inputs = modulate_inputs(x, alpha, torch.randn(mshape, device=device), 0.5 * torch.randn(mshape, device=device),
                             weight, None, res, gate)
    r = x if res is None else res + gate.reshape(B, 1, D) * x
    douts = [torch.randn(B, L, D, device=device) for _ in range(2 if residual else 1)]
    douts[0][..., c] = douts[0][..., c].abs() * torch.sign(sign * r[..., c])   # dh * n > 0 in channel c
    out = check_special_values(dyt_modulate, modulate_formula, inputs, douts, backend=backend)
    assert (out["dscale"].reshape(B, D)[:, c] == math.inf).all()


# --------------------------------------------------------------------------------------------------
# Signed zero
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.5, -0.5, 0.0, -0.0], ids=str)
@pytest.mark.parametrize("layout", ["last", "first"])
def test_tanh_keeps_the_sign_of_zero(layout, alpha, backend, device):
    """tanh(-0) = -0, as torch.tanh gives it: dyt without a bias returns -0 where eager
    `weight * torch.tanh(alpha * x)` does (x = -0, or alpha = -0, or alpha = 0 with x < 0), and
    equals it bit for bit elsewhere on these values (the linear regime and subnormals included).
    Fails before (triton): the fp32 tanh form computed |z|'s tanh and negated it where z < 0, and
    -0 < 0 is false, so it returned +0 (1 / y: +inf where eager gives -inf)."""
    vals = torch.tensor([-0.0, 0.0, -1e-45, 1e-45, -3e-41, 2e-39, -1e-20, 1e-20, -2.5, 2.5],
                        device=device)
    C = vals.numel()
    x = vals.reshape(1, C) if layout == "last" else vals.reshape(1, C, 1, 1)
    weight = torch.linspace(0.5, 2.0, C, device=device)
    w = weight if layout == "last" else weight.reshape(C, 1, 1)
    with use_backend(backend):
        y = dyt(x, alpha, weight, channels_last=layout == "last")
    ref = w * torch.tanh(alpha * x)
    assert torch.equal(torch.signbit(y), torch.signbit(ref)), (y.flatten().tolist(), ref.flatten().tolist())
    # The tanh form's error (2 ulp, tests/test_tanh.py) at |tanh| = 0.987; exact in the linear regime.
    torch.testing.assert_close(y, ref, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


# --------------------------------------------------------------------------------------------------
# Already right, where the suite had no test: non-finite values without the full affine, aliased
# arguments, hidden sizes at the launch plans' block thresholds
# --------------------------------------------------------------------------------------------------

def _variants(wheres):
    """(affine, where) pairs: only a weight ("w"), only a bias ("b") or neither, and each input that
    variant has."""
    return [(affine, where) for affine in ("w", "b", "none") for where in wheres
            if not (where == "weight" and affine != "w") and not (where == "bias" and affine != "b")]


def _affine_variant(D, affine, device):
    weight = 1 + 0.5 * torch.randn(D, device=device) if "w" in affine else None
    bias = 0.5 * torch.randn(D, device=device) if "b" in affine else None
    return weight, bias


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's inf * 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine,where", _variants(["x", "alpha", "weight", "bias", "dy"]))
@pytest.mark.parametrize("layout", ["last", "first"])
def test_dyt_nonfinite_without_full_affine(layout, affine, where, backend, device):
    """inf, -inf and NaN in one input of dyt with only a weight, only a bias, or neither, and
    per-channel alpha (5 rows, 7 channels: padded lanes in every tile): NaN and +-inf exactly where
    float64 has them, float64's values elsewhere. The suite's non-finite tests use the full affine."""
    from float64_checks import check_special_values, dyt_formula, dyt_inputs
    shape, C = ((5, 7), 7) if layout == "last" else ((2, 7, 3), 7)
    for value in (math.inf, -math.inf, math.nan):
        x = 2 * torch.randn(shape, device=device)
        alpha = torch.rand(C, device=device) + 0.2
        weight, bias = _affine_variant(C, affine, device)
        dy = torch.randn(shape, device=device)
        target = {"x": x, "alpha": alpha, "weight": weight, "bias": bias, "dy": dy}[where]
        target.view(-1)[min(3, target.numel() - 1)] = value
        check_special_values(dyt, dyt_formula, dyt_inputs(x, alpha, weight, bias), [dy], backend=backend,
                             channels_last=layout == "last")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's inf * 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine,where", _variants(["x", "residual", "gate", "shift", "scale", "alpha", "weight",
                                                      "bias", "dh", "dr"]))
@pytest.mark.parametrize("mode", ["BD", "BLD"])
def test_modulate_nonfinite_without_full_affine(mode, affine, where, backend, device):
    """dyt_modulate's counterpart (residual and gate, per-channel alpha, 2 x 3 tokens of 7 channels):
    inf, -inf and NaN in one input, NaN and +-inf exactly where float64 has them."""
    from float64_checks import check_special_values, modulate_formula, modulate_inputs
    B, L, D = 2, 3, 7
    mshape = (B, D) if mode == "BD" else (B, L, D)
    for value in (math.inf, -math.inf, math.nan):
        t = {"x": torch.randn(B, L, D, device=device), "residual": torch.randn(B, L, D, device=device),
             "gate": torch.randn(mshape, device=device), "shift": torch.randn(mshape, device=device),
             "scale": 0.5 * torch.randn(mshape, device=device), "alpha": torch.rand(D, device=device) + 0.2,
             "dh": torch.randn(B, L, D, device=device), "dr": torch.randn(B, L, D, device=device)}
        t["weight"], t["bias"] = _affine_variant(D, affine, device)
        t[where].view(-1)[min(5, t[where].numel() - 1)] = value
        inputs = modulate_inputs(t["x"], t["alpha"], t["shift"], t["scale"], t["weight"], t["bias"],
                                 t["residual"], t["gate"])
        check_special_values(dyt_modulate, modulate_formula, inputs, [t["dh"], t["dr"]], backend=backend)


ALIASES = {   # dyt_modulate's arguments, some of them one tensor
    "shift-is-scale": dict(shift="m", scale="m"),
    "residual-is-x": dict(shift="m", scale="s", residual="x"),
    "residual-is-x-gate-is-shift": dict(shift="m", scale="s", residual="x", gate="m"),
    "weight-is-bias": dict(shift="m", scale="s", weight="w", bias="w", residual="r", gate="s"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ALIASES))
def test_modulate_aliased_arguments(case, backend, device):
    """One tensor passed as two arguments (shift and scale, x and residual, ...): outputs and the
    accumulated gradient of each tensor as float64 autograd of the same expression has them."""
    torch.manual_seed(2)
    B, L, D = 2, 3, 7
    base = {"x": torch.randn(B, L, D), "r": torch.randn(B, L, D), "m": torch.randn(B, D), "s": 0.5 * torch.randn(B, D),
            "w": 1 + 0.5 * torch.randn(D), "a": torch.tensor([0.6])}
    douts = [torch.randn(B, L, D, device=device) for _ in range(2)]

    def run(dtype, fn):
        leaves = {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in base.items()}
        kw = {k: leaves[v] for k, v in ALIASES[case].items()}
        outs = fn(leaves["x"], leaves["a"], **kw)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = torch.autograd.grad(outs, list(leaves.values()), [d.to(dtype) for d in douts[:len(outs)]],
                                    allow_unused=True)
        return outs, dict(zip(leaves, grads))

    def formula(x, a, shift, scale, weight=None, bias=None, residual=None, gate=None):
        r = x if residual is None else residual + (x if gate is None else gate[:, None] * x)
        n = torch.tanh(a * r)
        n = n if weight is None else n * weight
        n = n if bias is None else n + bias
        h = n * (1 + scale[:, None]) + shift[:, None]
        return h if residual is None else (h, r)

    with use_backend(backend):
        outs, grads = run(torch.float32, dyt_modulate)
    outs64, grads64 = run(torch.float64, formula)
    # fp32 math on O(1) values, sums of at most 6 terms: a few fp32 roundings of O(10) magnitudes
    for o, o64 in zip(outs, outs64):
        torch.testing.assert_close(o.double(), o64, rtol=1e-5, atol=1e-5)
    for k, g64 in grads64.items():
        if g64 is None:
            assert grads[k] is None, k
        else:
            torch.testing.assert_close(grads[k].double(), g64, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("D", [16, 17, 512, 513, 1024, 1025])
@pytest.mark.parametrize("op", ["dyt", "modulate"])
def test_hidden_sizes_at_block_thresholds(op, D, device):
    """Hidden sizes on each side of the plans' thresholds (plan.block_n_for: next power of two up to
    16, then padding within 1/8; the modulate backward's 512-wide and the dyt kernels' 1024-wide
    column blocks), fp32 and bf16, per-channel alpha, three-way against float64."""
    from float64_checks import check_dyt, check_modulate, dyt_inputs, modulate_inputs
    for dtype in (torch.float32, torch.bfloat16):
        if op == "dyt":
            x = (2 * torch.randn(3, D, device=device)).to(dtype)
            inputs = dyt_inputs(x, torch.rand(D, device=device) + 0.2, torch.randn(D, device=device),
                                torch.randn(D, device=device))
            check_dyt(inputs, torch.randn_like(x), backend="triton")
        else:
            B, L = 2, 3
            m = lambda s=1.0: (s * torch.randn(B, D, device=device)).to(dtype)  # noqa: E731
            inputs = modulate_inputs(torch.randn(B, L, D, device=device).to(dtype), torch.rand(D, device=device) + 0.2,
                                     m(), m(0.5), 1 + 0.5 * torch.randn(D, device=device),
                                     0.5 * torch.randn(D, device=device), torch.randn(B, L, D, device=device).to(dtype),
                                     m())
            check_modulate(inputs, torch.randn(B, L, D, device=device).to(dtype),
                           torch.randn(B, L, D, device=device).to(dtype), backend="triton")


# --------------------------------------------------------------------------------------------------
# A float64 residual stream beside a narrower x
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-gate"])
def test_float64_residual_stream_stays_float64(gate, backend, device):
    """residual (and so r, and the gradient dr reaching r) in float64, x and the modulation in fp32:
    r = residual + gate * x and dresidual = dr + alpha * dz keep the float64 stream's precision, as
    eager `residual + gate * x` and its autograd do. |residual|, |dr| ~ 1e3 make an fp32 rounding of
    them ~6e-5, far above the fp32 terms' own ~1e-6. Fails before: r and dresidual were computed in
    fp32 and returned as float64 (errors ~1e-4, on both backends)."""
    torch.manual_seed(3)
    B, L, D = 2, 3, 8
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    res = (1e3 * torch.randn(B, L, D, device=device, dtype=torch.float64)).requires_grad_()
    g = torch.randn(B, D, device=device, requires_grad=True) if gate else None
    shift, scale = torch.randn(B, D, device=device), 0.5 * torch.randn(B, D, device=device)
    dh = torch.randn(B, L, D, device=device)
    dr = 1e3 * torch.randn(B, L, D, device=device, dtype=torch.float64)
    with use_backend(backend):
        h, r = dyt_modulate(x, 0.5, shift, scale, residual=res, gate=g)
    assert h.dtype == torch.float32 and r.dtype == torch.float64
    leaves = [x, res] + ([g] if gate else [])
    grads = torch.autograd.grad((h, r), leaves, (dh, dr))

    x64, res64 = x.detach().double().requires_grad_(), res.detach().clone().requires_grad_()
    g64 = g.detach().double().requires_grad_() if gate else None
    r64 = res64 + (x64 if g64 is None else g64[:, None] * x64)
    h64 = torch.tanh(0.5 * r64) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    grads64 = torch.autograd.grad((h64, r64), [x64, res64] + ([g64] if gate else []), (dh.double(), dr))
    # r: float64's sum to a few float64 roundings of ~1e3 (gate * x of fp32 factors is exact in float64)
    torch.testing.assert_close(r, r64.detach(), rtol=0, atol=1e-9)
    # h: fp32 values of size ~3
    torch.testing.assert_close(h.double(), h64.detach(), rtol=0, atol=1e-5)
    # dresidual: dr exactly, plus an fp32 term of size ~1 (a few fp32 roundings: 1e-6)
    torch.testing.assert_close(grads[1], grads64[1], rtol=0, atol=1e-5)
    # dx (fp32, ~1e3: 2 fp32 roundings of it) and dgate (an fp32 sum of 3 terms ~1e3)
    torch.testing.assert_close(grads[0].double(), grads64[0], rtol=0, atol=4e-4)
    if gate:
        torch.testing.assert_close(grads[2].double(), grads64[2], rtol=0, atol=1e-3)
