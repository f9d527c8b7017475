"""Tensors on a GPU other than the current one: the kernels launch on the tensor's device.

Triton launches on the current device and its current stream. A model spread over GPUs in one
process (accelerate's device_map="auto") runs layers on cuda:1.. while cuda:0 is current; before,
the kernels were launched on cuda:0 with cuda:1's pointers (an illegal address, or a race with the
stream that wrote them). functional._on_device switches to x's device first, as PyTorch's own ops do.
CUDA only; the two-GPU test needs two.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import dyt_kernels.functional as functional
from dyt_kernels import dyt, dyt_modulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _calls(D, device):
    x = torch.randn(4, 9, D, device=device, requires_grad=True)
    a, w, b = torch.rand(1, device=device) + 0.5, torch.randn(D, device=device), torch.randn(D, device=device)
    res = torch.randn(4, 9, D, device=device)
    shift, scale, gate = torch.randn(3, 4, D, device=device).unbind(0)
    return {
        "dyt": lambda: dyt(x, a, w, b),
        "dyt_modulate": lambda: dyt_modulate(x, a, shift, scale, w, b, residual=res, gate=gate)[0],
    }, x


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_launches_switch_to_the_tensors_device(grad, monkeypatch):
    """One GPU: the current device is made to read as another one, so the switch is taken; it
    enters x's device, and the results are bitwise the plain call's."""
    calls, x = _calls(64, "cuda")
    want = {}
    with torch.set_grad_enabled(grad):
        for name, call in calls.items():
            want[name] = call()
    entered = []
    real = torch.cuda.device

    @contextlib.contextmanager
    def recording(device):
        entered.append(torch.device(device))
        with real(device):
            yield

    monkeypatch.setattr(functional, "_cuda_device", lambda: x.get_device() + 1)
    monkeypatch.setattr(torch.cuda, "device", recording)
    with torch.set_grad_enabled(grad):
        for name, call in calls.items():
            entered.clear()
            got = call()
            assert entered == [x.device], (name, entered)
            assert torch.equal(got, want[name]), name
            if grad:
                torch.autograd.grad(got.sum(), x)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_while_the_first_is_current():
    """x on cuda:1 with cuda:0 current: forward and backward as they are with cuda:1 current."""
    torch.cuda.set_device(0)
    calls, x = _calls(64, "cuda:1")
    for name, call in calls.items():
        y = call()
        (dx,) = torch.autograd.grad(y.float().square().sum(), x)
        with torch.cuda.device(1):
            y1 = call()
            (dx1,) = torch.autograd.grad(y1.float().square().sum(), x)
        torch.cuda.synchronize(1)
        assert y.device == x.device and torch.equal(y, y1) and torch.equal(dx, dx1), name
