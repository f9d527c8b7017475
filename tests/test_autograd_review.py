"""Adversarial review of the eager autograd paths: batched gradients, autocast, threads.

Every gradient is held to float64 autograd of the formula (float64_checks), never to the library's
own reference.
"""
from __future__ import annotations

import pytest
import torch

from dyt_kernels import DyT, dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula

pytestmark = pytest.mark.usefixtures("on_device")

B, L, D = 2, 3, 16


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _leaves64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _modulate_inputs():
    return _leaves(torch.randn(B, L, D), torch.rand(1) + 0.5, torch.randn(D), torch.randn(D), torch.randn(B, 3 * D),
                   torch.randn(B, L, D))


def _modulate(fn, x, alpha, weight, bias, mods, residual):
    shift, scale, gate = mods.chunk(3, dim=-1)   # adaLN's strided chunks
    if fn is dyt_modulate:
        return fn(x, alpha, shift, scale, weight, bias, residual=residual, gate=gate)
    return fn(x, alpha, shift, scale, weight, bias, residual, gate)


def _assert_grads(grads, grads64):
    # fp32 sums of <= B*L*4 = 24 rows of O(1) terms against float64
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-4, msg=lambda m: f"gradient {i}: {m}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_batched_gradients_of_dyt(backend):
    """torch.autograd.grad(..., is_grads_batched=True) (what autograd.functional.jacobian(vectorize=True)
    runs): the backward gets legacy-vmap batched gradients, which have no storage. The Triton backward
    handed them to the kernels: 'Cannot access storage of BatchedTensorImpl' where eager and the torch
    backend give every row of the Jacobian-vector products. Twice: the second call takes the
    signature's cached backward."""
    for _ in range(2):
        x, a, w, b = _leaves(torch.randn(B, L, D), torch.rand(1) + 0.5, torch.randn(D), torch.randn(D))
        v = torch.randn(4, B, L, D)
        with use_backend(backend):
            grads = torch.autograd.grad(dyt(x, a, w, b), [x, a, w, b], v, is_grads_batched=True)
        q = _leaves64(x, a, w, b)
        _assert_grads(grads, torch.autograd.grad(dyt_formula(*q), q, v.double(), is_grads_batched=True))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("outputs", ["h", "both"])
def test_batched_gradients_of_dyt_modulate(backend, outputs):
    for _ in range(2):
        p = _modulate_inputs()
        with use_backend(backend):
            h, r = _modulate(dyt_modulate, *p)
        q = _leaves64(*p)
        h64, r64 = _modulate(modulate_formula, *q)
        vh, vr = torch.randn(4, B, L, D), torch.randn(4, B, L, D)
        if outputs == "h":
            grads = torch.autograd.grad(h, p, vh, is_grads_batched=True)
            grads64 = torch.autograd.grad(h64, q, vh.double(), is_grads_batched=True)
        else:
            grads = torch.autograd.grad([h, r], p, [vh, vr], is_grads_batched=True)
            grads64 = torch.autograd.grad([h64, r64], q, [vh.double(), vr.double()], is_grads_batched=True)
        _assert_grads(grads, grads64)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vmap_over_autograd_grad(backend):
    """torch.func.vmap over torch.autograd.grad of a graph built outside it (vector-Jacobian products
    for many vectors at once): the backward gets functorch BatchedTensors, which the Triton backward
    handed to the kernels ('Cannot access storage of BatchedTensorImpl')."""
    x, a, w, b = _leaves(torch.randn(B, L, D), torch.rand(1) + 0.5, torch.randn(D), torch.randn(D))
    p = _modulate_inputs()
    v = torch.randn(4, B, L, D)
    with use_backend(backend):
        y = dyt(x, a, w, b)
        h, r = _modulate(dyt_modulate, *p)
        for _ in range(2):   # the second call: the signature's cached backward
            grads = torch.func.vmap(lambda u: torch.autograd.grad(y, [x, a, w, b], u, retain_graph=True))(v)
            mod_grads = torch.func.vmap(lambda u: torch.autograd.grad([h, r], p, [u, 2 * u], retain_graph=True))(v)
    q = _leaves64(x, a, w, b)
    _assert_grads(grads, torch.autograd.grad(dyt_formula(*q), q, v.double(), is_grads_batched=True))
    q = _leaves64(*p)
    h64, r64 = _modulate(modulate_formula, *q)
    _assert_grads(mod_grads, torch.autograd.grad([h64, r64], q, [v.double(), 2 * v.double()], is_grads_batched=True))
