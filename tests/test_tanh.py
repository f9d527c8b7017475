"""Accuracy of the kernels' three tanh forms against float64 (see TANH_* in dyt_kernels/ops/launch.py).

Measured here, the numbers the README quotes:
- exp-based (the interpreter's form): max abs error 1.1e-7 (~1.8 x 2^-24), max rel 6.4e-7 on the grid below.
- libdevice tanh (fp32 outputs on GPU) and tanh.approx.f32 (bf16/fp16 outputs): need a GPU; the
  tests below measure them there and print the numbers (pytest -s or -rA shows them).
"""
import pytest
import torch
import triton
import triton.language as tl

from dyt_kernels.backend import interpreter_active
from dyt_kernels.ops.launch import TANH_ACCURATE, TANH_APPROX, TANH_EXP, tanh_f32


@triton.jit
def _tanh_kernel(z_ptr, t_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(t_ptr + offs, tanh_f32(tl.load(z_ptr + offs, mask=ok), MODE), mask=ok)


def _grid_points(device):
    """Dense in [-20, 20], log-spaced down to 1e-30 on both sides, and dense around the 0.125 switch."""
    lin = torch.linspace(-20, 20, 200001)
    tiny = torch.logspace(-30, 1, 50000)
    switch = torch.linspace(0.12, 0.13, 10001)
    return torch.cat([lin, tiny, -tiny, switch, -switch]).float().to(device)


def _measure(mode, device, rel_floor=0.0):
    """(max abs error, max relative error over |z| >= rel_floor) of one tanh form."""
    z = _grid_points(device)
    t = torch.empty_like(z)
    _tanh_kernel[(triton.cdiv(z.numel(), 32768),)](z, t, z.numel(), MODE=mode, BLOCK=32768)
    ref = torch.tanh(z.double())
    err = (t.double() - ref).abs()
    keep = z.abs() >= rel_floor
    rel = (err[keep] / ref[keep].abs()).max().item()
    return err.max().item(), rel


@pytest.mark.skipif(not interpreter_active(), reason="the exp-based form is the interpreter's")
def test_exp_form_accuracy(device):
    abs_err, rel_err = _measure(TANH_EXP, device)
    print(f"exp-based tanh: max abs {abs_err:.3e}, max rel {rel_err:.3e}")
    # A few fp32 roundings in (1 - e)/(1 + e) and the series: within 4 x 2^-24 absolute, and
    # 16 fp32 ulps relative (the series keeps the relative error small near 0).
    assert abs_err <= 4 * 2.0 ** -24
    assert rel_err <= 16 * 2.0 ** -23


@pytest.mark.skipif(not torch.cuda.is_available() or interpreter_active(), reason="libdevice and PTX need a GPU")
@pytest.mark.parametrize("mode,abs_bound,rel_bound,rel_floor", [
    # libdevice tanhf: a few ulps everywhere.
    (TANH_ACCURATE, 4 * 2.0 ** -24, 8 * 2.0 ** -23, 0.0),
    # tanh.approx.f32: documented around 2^-11 relative; allow 2^-10.5, judged on |z| >= 2^-14 (the
    # smallest normal fp16: below it the hardware may flush, an absolute error under 2^-14). bf16
    # keeps 8 bits (half-ulp 2^-9), so this is invisible there; fp16 keeps 11 (half-ulp 2^-12),
    # so fp16 outputs are where this form costs most: up to about one extra fp16 ulp.
    (TANH_APPROX, 2.0 ** -10.5, 2.0 ** -10.5, 2.0 ** -14),
])
def test_gpu_forms_accuracy(mode, abs_bound, rel_bound, rel_floor):
    abs_err, rel_err = _measure(mode, "cuda", rel_floor)
    print(f"tanh mode {mode}: max abs {abs_err:.3e}, max rel {rel_err:.3e}")
    assert abs_err <= abs_bound
    assert rel_err <= rel_bound
