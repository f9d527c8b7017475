"""One dyt / dyt_modulate call checked against float64, for test_layouts.py and test_bad_inputs.py.

The oracle is written here from docs/DESIGN.md "The math" in plain float64 PyTorch, and its gradients come
from float64 autograd of that forward formula: it shares no code with dyt_kernels (reference.py
included), so a formula slip in the library cannot hide in its own oracle. test_layouts.py checks
reference.py against it.

Every comparison is three-way (helpers.assert_close_3way): the error against float64 may be at most
2x the error of plain PyTorch computing the same formula in the dtype under test, plus an atol
derived below from what the library does that the plain run does not (its fp32 tanh forms, rounding
the residual sum before the norm, fp32 reductions split across programs).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from dyt_kernels import dyt, dyt_modulate, use_backend
from helpers import (FP32_EPS, TANH_F32_ABS_ERR, assert_close_3way, assert_fresh, elementwise_atol,
                     eps, max_abs, max_abs_err, poisoned_empty, reduction_atol, rms, tanh_abs_err)

DYT_GRADS = ("x", "alpha", "weight", "bias")
MODULATE_GRADS = ("x", "residual", "shift", "scale", "gate", "weight", "bias", "alpha")


def sequential_sum_err(terms64: Tensor, *, total: bool = False) -> float:
    """Error against float64 of summing `terms64` (rows, k) row by row in fp32, per column (and then
    the k column sums, if total).

    helpers.reduction_atol models the rounding of an fp32 sum as a random walk, which holds for
    random-sign terms. Repeated terms (an expanded dy, as y.sum().backward() gives; repeated rows)
    round the same way at every step and add up coherently. A row-by-row fp32 sum is the least
    accurate common order and the one the Triton interpreter's tl.sum follows (numpy reduces axis 0
    one row at a time), so twice its error joins each reduction's atol: the kernels' sums may be no
    worse than plain sequential fp32 accumulation, which docs/DESIGN.md prescribes.
    """
    t = terms64.detach().double().cpu()
    acc = np.zeros(t.shape[1:], dtype=np.float32)
    for row in t.float().numpy():
        acc += row
    got, want = torch.from_numpy(acc), t.sum(0)
    if total:
        got, want = torch.from_numpy(np.atleast_1d(acc.sum(dtype=np.float32))), want.sum().reshape(1)
    return max_abs_err(got, want)


def _rows(t: Tensor, channels_last: bool = True) -> Tensor:
    """t as (rows, channels): the layout of a per-channel reduction."""
    if not channels_last:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1]) if t.shape[-1] else t.reshape(t.numel(), 0)


@contextlib.contextmanager
def repro(description: str) -> Iterator[None]:
    """Prefix any failure inside the block with the case's description, so it can be rerun as is."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  (a kernel error is a failure of the case too)
        raise AssertionError(f"{description}\n{type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------------
# The formulas (docs/DESIGN.md "The math"), in whatever dtype they are given.
# --------------------------------------------------------------------------------------------------

def _channel(p: Tensor | float, x: Tensor, channels_last: bool) -> Tensor | float:
    """A per-channel vector shaped to broadcast against x; a one-element alpha as a 0-d tensor."""
    if not isinstance(p, Tensor):
        return p
    if p.numel() == 1:
        return p.reshape(())
    if channels_last:
        return p
    return p.reshape(-1, *([1] * (x.dim() - 2)))


def dyt_formula(x, alpha, weight, bias, channels_last=True, dtype=None):
    """y = weight * tanh(alpha * x) + bias over the channel dim; parameters cast to `dtype` first."""
    dtype = dtype or x.dtype
    cast = lambda p: p.to(dtype) if isinstance(p, Tensor) else p  # noqa: E731
    y = torch.tanh(_channel(cast(alpha), x, channels_last) * x)
    if weight is not None:
        y = y * _channel(cast(weight), x, channels_last)
    if bias is not None:
        y = y + _channel(cast(bias), x, channels_last)
    return y


def _per_sample(m: Tensor) -> Tensor:
    """(B, D) -> (B, 1, D) to broadcast over tokens; (B, 1, D) and (B, L, D) as they are."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def modulate_formula(x, alpha, shift, scale, weight=None, bias=None, residual=None, gate=None, dtype=None):
    """r = residual + gate*x (with a residual); h = (w*tanh(a*r) + b)*(1 + scale) + shift. Returns (h, r)."""
    dtype = dtype or x.dtype
    cast = lambda p: None if p is None else (p.to(dtype) if isinstance(p, Tensor) else p)  # noqa: E731
    r = x
    if residual is not None:
        r = residual + (x if gate is None else _per_sample(cast(gate)) * x)
    n = dyt_formula(r, alpha, weight, bias, dtype=dtype)
    h = n * (1 + _per_sample(cast(scale))) + _per_sample(cast(shift))
    return h, r


# --------------------------------------------------------------------------------------------------
# Running a call: the op under test, the float64 oracle, the same-dtype naive run.
# --------------------------------------------------------------------------------------------------

def leaf(t):
    """t as an autograd leaf with the same strides and storage (so the op sees the same layout)."""
    return t.detach().requires_grad_() if isinstance(t, Tensor) and t.dtype.is_floating_point else t


def _grads(outs, inputs: dict, douts) -> dict:
    keys = [k for k, v in inputs.items() if isinstance(v, Tensor) and v.requires_grad]
    if not keys:
        return {}
    got = torch.autograd.grad(outs, [inputs[k] for k in keys], douts)
    return dict(zip(keys, got))


def run_op(op, inputs: dict, douts, backend: str, **flags):
    """outs, grads of op(**inputs) on `backend`, with every torch.empty inside NaN-filled: a kernel that
    leaves an output element unwritten leaves a NaN behind."""
    with use_backend(backend), poisoned_empty():
        outs = op(**inputs, **flags)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = _grads(outs, inputs, douts)
    return outs, grads


def float64_run(formula, inputs: dict, douts, **flags):
    """outs, grads of the formula in float64 (autograd), on float64 copies of the very same values."""
    inputs64 = {k: leaf(v.detach().double()) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    outs = formula(**inputs64, **flags)
    outs = outs if isinstance(outs, tuple) else (outs,)
    # modulate_formula also returns r (x itself without a residual); only outputs the op returns get a gradient.
    return outs, _grads(outs[: len(douts)], inputs64, [d.double() for d in douts]), inputs64


def naive_run(formula, inputs: dict, douts, dtype, **flags):
    """The same formula in plain PyTorch in the dtype under test (parameters cast to it), with autograd."""
    copies = {k: leaf(v.detach().clone()) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    outs = formula(**copies, dtype=dtype, **flags)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs, _grads(outs[: len(douts)], copies, douts)


def _check_fresh(outs, grads, inputs: dict) -> None:
    """Outputs and gradients share no storage with the inputs, nor the outputs with each other."""
    tensors = [v for v in inputs.values() if isinstance(v, Tensor)]
    for o in outs:
        assert_fresh(o, *tensors)
    for a in range(len(outs)):
        for b in range(a + 1, len(outs)):
            assert_fresh(outs[a], outs[b])
    for k, g in grads.items():
        try:
            assert_fresh(g, *tensors)
        except AssertionError:
            raise AssertionError(f"d{k} shares storage with an input") from None


# --------------------------------------------------------------------------------------------------
# dyt: one call, every output and gradient three-way against float64.
# --------------------------------------------------------------------------------------------------

def dyt_inputs(x, alpha, weight=None, bias=None) -> dict:
    """Autograd leaves for every tensor argument (a Python-number alpha stays a number)."""
    return {"x": leaf(x), "alpha": leaf(alpha), "weight": leaf(weight), "bias": leaf(bias)}


def check_dyt(inputs: dict, dy: Tensor, *, backend: str, channels_last: bool = True) -> dict:
    """Three-way check of y and of the gradients of every leaf in inputs; returns {"y": y, "dx": ...}."""
    x, alpha, weight = inputs["x"], inputs["alpha"], inputs["weight"]
    (y,), grads = run_op(dyt, inputs, [dy], backend, channels_last=channels_last)
    _check_fresh([y], grads, {**inputs, "dy": dy})
    (y64,), grads64, in64 = float64_run(dyt_formula, inputs, [dy], channels_last=channels_last)
    (yn,), gradsn = naive_run(dyt_formula, inputs, [dy], x.dtype, channels_last=channels_last)

    C = x.shape[-1] if channels_last else x.shape[1]
    rows = x.numel() // C if C else 0
    x64, dy64 = in64["x"].detach(), dy.double()
    a64 = _channel(alpha.detach().double() if isinstance(alpha, Tensor) else alpha, x64, channels_last)
    w64 = 1.0 if weight is None else _channel(weight.detach().double(), x64, channels_last)
    w_max = max_abs(torch.as_tensor(w64))
    tanh_err = tanh_abs_err(x.dtype)
    # y = w*t + b: the tanh form is off by <= tanh_err, scaled by |w|, plus ~2 fp32 roundings.
    atol = {"y": elementwise_atol(y64, x.dtype, tanh_err * w_max + 2 * FP32_EPS * max_abs(y64))}
    # dx = a*dy*w*(1 - t^2): |d(1 - t^2)| <= 2|dt| for |t| <= 1, scaled by |a*dy*w|, plus ~4 roundings.
    if "x" in grads:
        atol["x"] = elementwise_atol(grads64["x"], x.dtype, 2 * tanh_err * max_abs(a64 * dy64 * w64)
                                     + 4 * FP32_EPS * max_abs(grads64["x"]))
    # Reductions (helpers.reduction_atol: ~sqrt(n) * per-term error * term scale). dalpha sums
    # dy*w*(1-t^2)*x over every element (one alpha) or over the rows (per channel); the tanh error
    # enters through (1 - t^2) absolutely (x2), so the term scale is |dy*w*x|. dweight sums dy*t
    # (tanh error scaled by |dy|), dbias sums dy (no tanh).
    # Plus twice the error of a row-by-row fp32 sum of the same terms (sequential_sum_err).
    per_term = 8 * FP32_EPS + 2 * (tanh_err - TANH_F32_ABS_ERR)
    t64 = torch.tanh(a64 * x64)
    seq = lambda terms, total=False: 2 * sequential_sum_err(_rows(terms, channels_last), total=total)  # noqa: E731
    if "alpha" in grads:
        n_alpha = x.numel() if alpha.numel() == 1 else rows
        atol["alpha"] = (reduction_atol(n_alpha, rms(dy64 * w64 * x64), grads64["alpha"], alpha.dtype, per_term)
                         + seq(dy64 * w64 * (1 - t64 * t64) * x64, alpha.numel() == 1))
    if "weight" in grads:
        atol["weight"] = reduction_atol(rows, rms(dy64), grads64["weight"], weight.dtype, per_term) + seq(dy64 * t64)
    if "bias" in grads:
        atol["bias"] = reduction_atol(rows, rms(dy64), grads64["bias"], inputs["bias"].dtype) + seq(dy64)

    assert_close_3way("y", y, y64, yn, atol["y"])
    for k in DYT_GRADS:
        if k in grads:
            assert_close_3way(f"d{k}", grads[k], grads64[k], gradsn[k], atol[k])
    return {"y": y, **{f"d{k}": g for k, g in grads.items()}}


# --------------------------------------------------------------------------------------------------
# dyt_modulate: the same for h, r and the gradients of x, residual, shift, scale, gate, w, b, alpha.
# --------------------------------------------------------------------------------------------------

def modulate_inputs(x, alpha, shift, scale, weight=None, bias=None, residual=None, gate=None) -> dict:
    return {"x": leaf(x), "alpha": leaf(alpha), "shift": leaf(shift), "scale": leaf(scale),
            "weight": leaf(weight), "bias": leaf(bias), "residual": leaf(residual), "gate": leaf(gate)}


def _modulate_atols(inputs: dict, in64: dict, outs64, grads64: dict, douts) -> dict:
    """atols for h, r and every gradient, derived from what the fused op does beyond the naive run.

    t_err bounds the error of t = tanh(a*r) in the op: its tanh form, and, with a residual, r rounded
    to residual's dtype before the norm (the naive run rounds r too, the float64 oracle does not;
    |dt/dr| <= |a|, and the rounding is <= eps * |r|).
    """
    x, alpha = inputs["x"], inputs["alpha"]
    B, L, D = x.shape
    d = lambda k: None if in64.get(k) is None else in64[k].detach()  # noqa: E731
    x64, r64 = d("x"), outs64[1].detach()
    a64 = torch.as_tensor(_channel(d("alpha") if isinstance(alpha, Tensor) else alpha, x64, True), dtype=torch.float64)
    w64 = torch.ones((), dtype=torch.float64) if d("weight") is None else d("weight")
    b64 = torch.zeros((), dtype=torch.float64) if d("bias") is None else d("bias")
    one_plus = 1 + _per_sample(d("scale"))
    gate64 = torch.ones((), dtype=torch.float64) if d("gate") is None else _per_sample(d("gate"))
    dh64 = douts[0].double()
    dr64 = douts[1].double() if inputs["residual"] is not None else torch.zeros((), dtype=torch.float64)
    t64 = torch.tanh(a64 * r64)
    n64 = w64 * t64 + b64
    dn64 = dh64 * one_plus
    drt64 = a64 * dn64 * w64 * (1 - t64 * t64) + dr64
    a_max, w_max = max_abs(a64), max_abs(w64)
    r_eps = eps(inputs["residual"].dtype) if inputs["residual"] is not None else 0.0
    t_err = tanh_abs_err(x.dtype) + a_max * r_eps * max_abs(r64)
    # Elementwise fp32 error of dr_total = a*dn*w*(1 - t^2) + dr before its rounding.
    drt_err = 2 * t_err * a_max * w_max * max_abs(dn64) + 4 * FP32_EPS * (max_abs(drt64) + max_abs(dr64))
    atol = {
        "h": elementwise_atol(outs64[0], x.dtype, w_max * max_abs(one_plus) * t_err
                              + 4 * FP32_EPS * (max_abs(n64 * one_plus) + max_abs(outs64[0]))),
        "x": elementwise_atol(grads64.get("x", r64), x.dtype, max_abs(gate64) * drt_err),
    }
    if inputs["residual"] is not None:
        atol["r"] = elementwise_atol(r64, inputs["residual"].dtype, 2 * FP32_EPS * max_abs(r64))
        atol["residual"] = elementwise_atol(grads64.get("residual", r64), inputs["residual"].dtype, drt_err)
    per_term = 8 * FP32_EPS + 2 * t_err + r_eps
    # The exact terms of each sum, for its sequential-order error (sequential_sum_err).
    terms = {"shift": dh64, "scale": dh64 * n64, "gate": drt64 * x64,
             "weight": dn64 * t64, "bias": dn64, "alpha": dn64 * w64 * (1 - t64 * t64) * r64}
    for k, ref in grads64.items():
        if k in atol:
            continue
        dtype = inputs[k].dtype
        if k in ("shift", "scale", "gate") and ref.numel() == B * L * D and L != 1:  # per token: elementwise
            fp32_err = {"shift": 0.0,  # dshift is dh itself
                        "scale": w_max * t_err * max_abs(dh64) + 4 * FP32_EPS * max_abs(dh64 * n64),
                        "gate": max_abs(x64) * drt_err}[k]
            atol[k] = elementwise_atol(ref, dtype, fp32_err)
        elif k in ("shift", "scale", "gate"):  # per sample: sums over the L tokens
            scale_of_terms = {"shift": rms(dh64),
                              "scale": rms(dh64 * n64) + w_max * rms(dh64),
                              "gate": rms(drt64 * x64) + a_max * w_max * rms(dn64 * x64)}[k]
            over_tokens = terms[k].expand(B, L, D).transpose(0, 1).reshape(L, B * D)
            atol[k] = reduction_atol(L, scale_of_terms, ref, dtype, per_term) + 2 * sequential_sum_err(over_tokens)
        else:  # weight, bias, alpha: sums over the B*L rows (every element for a one-element alpha)
            n_terms = B * L * D if (k == "alpha" and alpha.numel() == 1) else B * L
            scale_of_terms = {"weight": rms(dn64), "bias": rms(dn64), "alpha": rms(dn64 * w64 * r64)}[k]
            atol[k] = (reduction_atol(n_terms, scale_of_terms, ref, dtype, 8 * FP32_EPS if k == "bias" else per_term)
                       + 2 * sequential_sum_err(_rows(terms[k].expand(B, L, D)), total=n_terms == B * L * D))
    return atol


def check_modulate(inputs: dict, dh: Tensor, dr: Tensor | None, *, backend: str) -> dict:
    """Three-way check of h (and r) and of the gradients of every leaf in inputs."""
    douts = [dh] if inputs["residual"] is None else [dh, dr]
    outs, grads = run_op(dyt_modulate, inputs, douts, backend)
    # (Not checked against dh: a per-token dshift IS dh, as plain PyTorch autograd hands it on too.)
    _check_fresh(list(outs), grads, inputs)
    outs64, grads64, in64 = float64_run(modulate_formula, inputs, douts)
    naive_outs, gradsn = naive_run(modulate_formula, inputs, douts, inputs["x"].dtype)
    atol = _modulate_atols(inputs, in64, outs64, grads64, douts)
    assert len(outs) == len(douts), f"dyt_modulate returned {len(outs)} tensors, expected {len(douts)}"
    assert_close_3way("h", outs[0], outs64[0], naive_outs[0], atol["h"])
    if len(outs) == 2:
        assert_close_3way("r", outs[1], outs64[1], naive_outs[1], atol["r"])
    for k in MODULATE_GRADS:
        if k in grads:
            assert_close_3way(f"d{k}", grads[k], grads64[k], gradsn[k], atol[k])
    return {"h": outs[0], **({"r": outs[1]} if len(outs) == 2 else {}), **{f"d{k}": g for k, g in grads.items()}}


def finite_pattern_equal(name: str, out: Tensor, ref64: Tensor) -> None:
    """out is NaN exactly where the float64 result is, and +-inf exactly where it is (same sign)."""
    o, r = out.detach().double().cpu(), ref64.detach().double().cpu()
    for what, mo, mr in (("NaN", o.isnan(), r.isnan()), ("+inf", o == math.inf, r == math.inf),
                         ("-inf", o == -math.inf, r == -math.inf)):
        if not torch.equal(mo, mr):
            idx = tuple(int(i) for i in (mo != mr).nonzero()[0])
            raise AssertionError(f"{name}: {what} pattern differs from float64 at index {idx}: "
                                 f"got {o[idx].item()}, float64 {r[idx].item()} "
                                 f"({int(mo.sum())} {what} vs {int(mr.sum())} in float64)")


# Special-value tests (NaN/inf inputs, infinite or huge alpha) run fp32 on a few dozen elements, sums
# of at most ~50 terms of size O(1): fp32 rounding stays below 50 * 8 eps32 ~ 5e-5 of the result's
# scale (1 + its largest finite magnitude), while a wrong, missing or NaN-poisoned term is O(0.1-1).
SPECIAL_RTOL = 1e-4


def check_special_values(op, formula, inputs: dict, douts, *, backend: str, **flags) -> dict:
    """Every output and gradient NaN/inf exactly where float64 is, and close to it everywhere else."""
    outs, grads = run_op(op, inputs, douts, backend, **flags)
    outs64, grads64, _ = float64_run(formula, inputs, douts, **flags)
    names = ["y"] if op is dyt else ["h", "r"]
    pairs = list(zip(names, outs, outs64)) + [(f"d{k}", g, grads64[k]) for k, g in grads.items()]
    for name, out, ref in pairs:
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
        finite_pattern_equal(name, out, ref)
        finite = torch.isfinite(ref.detach())
        bound = SPECIAL_RTOL * (1 + max_abs(ref.detach()[finite]))
        err = max_abs_err(out.detach()[finite], ref.detach()[finite])
        assert err <= bound, f"{name}: max|out - float64| = {err:.3e} on the finite entries exceeds {bound:.3e}"
    return {**dict(zip(names, outs)), **{f"d{k}": g for k, g in grads.items()}}
