"""The kernels' tanh forms against float64 tanh (primitives.tanh_f32).

TANH_F32 (fp32 outputs, and every dtype under the interpreter): a minimax polynomial below |z| = 0.9,
1 - 2/(1 + 2^(2z log2 e)) above. It runs here through the interpreter (numpy's exp2 and division);
on a GPU the same code runs ex2.approx and div.full, which PTX documents at <= 2 ulp each, and
test_f32_form_with_hardware_errors emulates that worst case on the CPU.
TANH_APPROX (bf16/fp16 outputs on a GPU): tanh.approx.f32, checked where a GPU runs the suite.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from dyt_kernels.backend import INTERPRETER
from dyt_kernels.ops import primitives as prim
from dyt_kernels.ops.primitives import TANH_APPROX, TANH_F32, tanh_f32
from helpers import FP32_EPS, TANH_APPROX_ERR, TANH_F32_ABS_ERR


@triton.jit
def _tanh_probe_kernel(z_ptr, t_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    tl.store(t_ptr + offs, tanh_f32(z, MODE), mask=mask)


def _grid(device):
    dense = torch.linspace(-20, 20, 400_001, dtype=torch.float32)
    limit = prim.TANH_POLY_LIMIT
    # Every fp32 value just around the polynomial / exponential switch, on both sides.
    switch = limit + torch.arange(-4000, 4001, dtype=torch.float32) * (FP32_EPS / 2)
    # Tiny |z| down to subnormals (tanh(z) = z there).
    tiny = torch.logspace(-44, -1, 4000, dtype=torch.float64).float()
    z = torch.cat([dense, switch, -switch, tiny, -tiny, torch.tensor([0.0, 30.0, -30.0, 1e30, -1e30])])
    return z.to(device)


def _errors(z, t):
    ref = torch.tanh(z.double())
    err = (t.double() - ref).abs()
    nz = ref != 0
    rel = torch.where(nz, err / ref.abs().clamp_min(1e-300), torch.zeros_like(err))
    return ref, err, rel, nz


@pytest.mark.parametrize("mode", [TANH_F32, TANH_APPROX], ids=["f32", "approx"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # exp2 -> inf gives tanh 1
def test_tanh_form_accuracy(mode, device):
    """Max error on a dense grid of z in [-20, 20], tiny |z|, and every fp32 value around the switch."""
    if INTERPRETER and mode == TANH_APPROX:
        pytest.skip("the interpreter runs no inline PTX; tanh.approx is checked where a GPU runs the suite")
    z = _grid(device)
    t = torch.full_like(z, float("nan"))
    block = 16384
    _tanh_probe_kernel[(triton.cdiv(z.numel(), block),)](z, t, z.numel(), MODE=mode, BLOCK=block)
    z, t = z.cpu(), t.cpu()
    ref, err, rel, nz = _errors(z, t)
    assert torch.isfinite(t).all(), "tanh returned NaN/inf for a finite input"
    assert (t == 0)[~nz].all(), "tanh(0) must be 0"
    assert (t.abs() <= 1).all(), "tanh must stay within [-1, 1]"
    worst_abs, at_abs = err.max().item(), z[err.argmax()].item()
    if mode == TANH_APPROX:
        # Judged on normal fp32 inputs: the hardware may flush subnormals to zero.
        normal = z.abs() >= torch.finfo(torch.float32).tiny
        assert rel[normal].max().item() <= TANH_APPROX_ERR, f"approx tanh rel. error {rel[normal].max().item():.3e}"
        assert worst_abs <= TANH_APPROX_ERR, f"approx tanh abs. error {worst_abs:.3e} at z={at_abs}"
        return
    # Abs error <= 4 * 2^-24 (2 ulps of values in [0.5, 1)): the TANH_F32_ABS_ERR every atol builds on.
    # Measured under the interpreter: 1.2 * 2^-24.
    assert worst_abs <= TANH_F32_ABS_ERR, f"max abs error {worst_abs:.3e} at z={at_abs}"
    # The polynomial keeps tanh's relative accuracy near 0 (measured 0.8 ulp = 1.6 * 2^-24; Horner in
    # fp32 adds a few half-ulp roundings): bound 3 * 2^-24. Above the switch |tanh| > 0.7, so the abs
    # bound is a relative one of 4 / 0.7 < 6 * 2^-24.
    poly = nz & (z.abs() < prim.TANH_POLY_LIMIT)
    assert rel[poly].max().item() <= 3 * 2.0 ** -24, f"rel. error {rel[poly].max().item() / 2 ** -24:.2f} * 2^-24"
    assert rel[nz & ~poly].max().item() <= 6 * 2.0 ** -24


def _f32_form_numpy(z: np.ndarray, exp_err: float, div_err: float) -> np.ndarray:
    """tanh_f32(z, TANH_F32) step by step in fp32 numpy, with exp2 and the division off by the given
    relative errors (as ex2.approx.f32 and div.full.f32 may be on a GPU)."""
    f32 = np.float32
    a = np.abs(z).astype(f32)
    a2 = (a * a).astype(f32)
    p = f32(prim.TANH_POLY[0])
    for c in prim.TANH_POLY[1:]:
        p = (p * a2 + f32(c)).astype(f32)
    small = (a + a * (p * a2).astype(f32)).astype(f32)
    e = (np.exp2((a * f32(prim.TWO_LOG2E)).astype(f32).astype(np.float64)) * (1 + exp_err)).astype(f32)
    q = ((f32(2) / (f32(1) + e)).astype(np.float64) * (1 + div_err)).astype(f32)
    t = np.where(a < f32(prim.TANH_POLY_LIMIT), small, (f32(1) - q).astype(f32))
    return np.where(z < 0, -t, t)


def test_f32_form_with_hardware_errors():
    """The GPU runs TANH_F32 with ex2.approx.f32 and div.full.f32, each within 2 ulp (2^-22 relative)
    by the PTX ISA. With every sign combination of those worst cases the form stays within
    TANH_F32_ABS_ERR (measured worst 3.3 * 2^-24, near |z| = 0.9)."""
    with np.errstate(over="ignore"):
        z = np.linspace(0, 20, 2_000_001, dtype=np.float32)
        ref = np.tanh(z.astype(np.float64))
        worst = 0.0
        for exp_err in (-2.0 ** -22, 0.0, 2.0 ** -22):
            for div_err in (-2.0 ** -22, 0.0, 2.0 ** -22):
                worst = max(worst, np.abs(_f32_form_numpy(z, exp_err, div_err) - ref).max())
    assert worst <= TANH_F32_ABS_ERR, f"worst abs error {worst / 2 ** -24:.2f} * 2^-24"
    if INTERPRETER:
        # The emulation is the kernel's formula: with exact exp2 and division it matches the
        # interpreter's run to an ulp (the interpreter's exp2 is numpy's fp32 one, rounded once more).
        zt = torch.from_numpy(z[::1000].copy())
        t = torch.full_like(zt, float("nan"))
        _tanh_probe_kernel[(1,)](zt, t, zt.numel(), MODE=TANH_F32, BLOCK=2048)
        assert np.abs(t.numpy() - _f32_form_numpy(z[::1000], 0.0, 0.0)).max() <= 2.0 ** -24
