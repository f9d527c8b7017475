"""Tensors with the negative bit: lazily negated views, which the ops must read negated.

Torch marks some views as negated instead of negating their memory: `z.conj().imag` of a complex z is
the most common (public API; autograd's backward of `torch.complex` hands such a view on as a
gradient), and any view of one keeps the bit. The kernels read storage through raw pointers, so such
a tensor read in place gives -x for x, silently. Each case here first lets a plain tensor of the very
same shape and strides fill the signature cache (functional.py), then calls with the negated view, and
checks outputs and gradients against float64 on the resolved values.
"""
from __future__ import annotations

import pytest
import torch

from dyt_kernels import dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula, repro
from helpers import signature_guards


pytestmark = pytest.mark.usefixtures("on_device", "launches_keep_their_signature")

@pytest.fixture(autouse=True, params=["torch", "python"], ids=["TensorGuards", "PyGuards"])
def _guards(request):
    """Every case with signatures matched by torch's guards and by the Python fallback."""
    with signature_guards(request.param):
        yield


def _neg(shape, route):
    """A float32 tensor of `shape` with the negative bit set, by a public route or torch's private
    _neg_view (unit strides: the layout a kernel reads in place)."""
    if route == "neg_view":
        t = torch._neg_view(torch.randn(shape))
    elif route == "imag":                      # strides 2x a dense tensor's
        t = torch.randn(shape, dtype=torch.complex64).conj().imag
    elif route == "imag, unsqueezed":          # a unit-stride last dim: shape's last dim must be 1
        t = torch.randn(shape[:-1], dtype=torch.complex64).conj().imag.unsqueeze(-1)
    else:
        raise ValueError(route)
    assert t.is_neg() and t.shape == shape
    return t


def _plain_like(t):
    """A plain tensor with t's shape and strides (no negative bit)."""
    p = torch.empty_strided(t.shape, t.stride())
    p.copy_(torch.randn(t.shape))
    return p


def _close(got, want, what):
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=what)


ROUTES = ["neg_view", "imag", "imag, unsqueezed"]
SHAPES = [(4, 8), (3, 1), (2, 3, 1, 1), (2, 3, 4, 5)]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["last", "first"])
@pytest.mark.parametrize("route", ROUTES)
def test_dyt_negated_x(route, channels_last, grad):
    with use_backend("triton"):
        for shape in SHAPES:
            if route == "imag, unsqueezed":
                shape = (*shape[:-1], 1)
            x = _neg(shape, route)
            C = shape[-1] if channels_last else shape[1]
            a, w, b = torch.rand(1) + 0.5, torch.randn(C), torch.randn(C)
            dyt(_plain_like(x), a, w, b, channels_last=channels_last)   # fills the signature
            for call in range(2):   # the first call and a cached one
                with repro(f"{route} x {shape}, channels_last={channels_last}, call {call}"):
                    want = dyt_formula(x.resolve_neg().double(), a.double(), w.double(), b.double(),
                                       channels_last)
                    xl = x.detach().requires_grad_(grad)
                    with torch.set_grad_enabled(grad):
                        y = dyt(xl, a, w, b, channels_last=channels_last)
                    _close(y, want, "y")
                    if grad:
                        dy = torch.randn(shape)
                        (dx,) = torch.autograd.grad(y, xl, dy)
                        x64 = x.resolve_neg().double().requires_grad_()
                        (want_dx,) = torch.autograd.grad(
                            dyt_formula(x64, a.double(), w.double(), b.double(), channels_last), x64, dy.double())
                        _close(dx, want_dx, "dx")


@pytest.mark.parametrize("param", ["alpha", "weight", "bias"])
def test_dyt_negated_parameters(param):
    """A one-channel parameter (any stride is unit stride) or a contiguous negated view."""
    with use_backend("triton"):
        for C, route in ((1, "imag"), (8, "neg_view")):
            x = torch.randn(5, C)
            args = {"alpha": torch.rand(1) + 0.5, "weight": torch.randn(C), "bias": torch.randn(C)}
            dyt(x, **args)   # fills the signature
            args[param] = _neg((1,) if param == "alpha" else (C,), route)
            with repro(f"negated {param}, C={C}"):
                want = dyt_formula(x.double(), *(args[k].resolve_neg().double() for k in ("alpha", "weight", "bias")))
                _close(dyt(x, **args), want, "y")
                leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
                xl = x.clone().requires_grad_()
                dy = torch.randn_like(x)
                got = torch.autograd.grad(dyt(xl, **leaves), [xl, *leaves.values()], dy)
                l64 = {k: v.resolve_neg().double().requires_grad_() for k, v in args.items()}
                x64 = x.double().requires_grad_()
                want = torch.autograd.grad(dyt_formula(x64, *l64.values()), [x64, *l64.values()], dy.double())
                for name, g, wg in zip(["x", *args], got, want):
                    _close(g, wg, f"d{name}")


@pytest.mark.parametrize("route", ["neg_view", "complex backward"])
def test_dyt_negated_incoming_gradient(route):
    """dy with the negative bit: handed in directly, or by autograd's backward of torch.complex."""
    with use_backend("triton"):
        C = 1 if route == "complex backward" else 8   # (5, 1): imag's strides are unit strides there
        x, a, w, b = torch.randn(5, C), torch.rand(1) + 0.5, torch.randn(C), torch.randn(C)
        xl = x.clone().requires_grad_()
        y = dyt(xl, a, w, b)
        torch.autograd.grad(y, xl, torch.randn(5, C), retain_graph=True)   # fills the backward's slot
        dy = torch.randn(5, C)
        if route == "neg_view":
            (dx,) = torch.autograd.grad(y, xl, torch._neg_view(dy))
            want_dy = -dy
        else:
            # z = other + i y; loss = sum(imag(conj(z)) * dy) = -sum(y * dy)
            z = torch.complex(torch.zeros_like(y), y)
            (dx,) = torch.autograd.grad((z.conj().imag * dy).sum(), xl)
            want_dy = -dy
        x64 = x.double().requires_grad_()
        (want,) = torch.autograd.grad(dyt_formula(x64, a.double(), w.double(), b.double()), x64, want_dy.double())
        _close(dx, want, "dx")


B, L, D = 2, 3, 8


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("arg", ["x", "residual", "shift", "scale", "gate", "weight", "bias"])
def test_dyt_modulate_negated_arguments(arg, grad):
    with use_backend("triton"):
        shapes = {"x": (B, L, D), "residual": (B, L, D), "shift": (B, D), "scale": (B, D), "gate": (B, D),
                  "weight": (D,), "bias": (D,)}
        args = {k: torch.randn(s) for k, s in shapes.items()}
        a = torch.rand(1) + 0.5
        dyt_modulate(alpha=a, **args)   # fills the signature
        args[arg] = _neg(shapes[arg], "neg_view")
        with repro(f"negated {arg}"):
            leaves = {k: v.detach().requires_grad_(grad) for k, v in args.items()}
            with torch.set_grad_enabled(grad):
                h, r = dyt_modulate(alpha=a, **leaves)
            a64 = {k: v.resolve_neg().double().requires_grad_() for k, v in args.items()}
            h64, r64 = modulate_formula(alpha=a.double(), **a64)
            _close(h, h64, "h")
            _close(r, r64, "r")
            if grad:
                dh = torch.randn(B, L, D)
                got = torch.autograd.grad(h, list(leaves.values()), dh)
                want = torch.autograd.grad(h64, list(a64.values()), dh.double())
                for name, g, wg in zip(args, got, want):
                    _close(g, wg, f"d{name}")


def test_dyt_modulate_negated_incoming_gradient():
    with use_backend("triton"):
        x, res = torch.randn(B, L, D, requires_grad=True), torch.randn(B, L, D)
        shift, scale, gate = torch.randn(3, B, D).unbind(0)
        a = torch.rand(1) + 0.5
        h, r = dyt_modulate(x, a, shift, scale, residual=res, gate=gate)
        torch.autograd.grad((h, r), x, (torch.randn(B, L, D), torch.randn(B, L, D)), retain_graph=True)
        dh, dr = torch.randn(B, L, D), torch.randn(B, L, D)
        (dx,) = torch.autograd.grad((h, r), x, (torch._neg_view(dh), torch._neg_view(dr)))
        x64 = x.detach().double().requires_grad_()
        h64, r64 = modulate_formula(x64, a.double(), shift.double(), scale.double(), residual=res.double(),
                                    gate=gate.double())
        (want,) = torch.autograd.grad((h64, r64), x64, (-dh.double(), -dr.double()))
        _close(dx, want, "dx")
