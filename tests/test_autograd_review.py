"""Adversarial review of the eager autograd paths: batched gradients, autocast, threads.

Every gradient is held to float64 autograd of the formula (float64_checks), never to the library's
own reference.
"""
from __future__ import annotations

import pytest
import torch

from dyt_kernels import DyT, dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula
from helpers import run_in_threads

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


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_hook_on_r_sees_the_gradient_of_its_later_uses(backend):
    """r is an output of one fused op that also feeds the norm inside it, so a tensor hook on r (and
    r.retain_grad()) sees the gradient from r's later uses only; the norm's part (alpha * dz, through
    h) is added inside the op's backward. In an unfused block, where h is computed from r, r's hook
    sees the sum. Both backends, float64 autograd of the formula with the norm reading r before the
    hook: a hook that scales r's gradient scales only that part."""
    p = _modulate_inputs()
    q = _leaves64(*p)
    with use_backend(backend):
        h, r = _modulate(dyt_modulate, *p)
    r.retain_grad()
    r.register_hook(lambda g: 3 * g)
    x, alpha, weight, bias, mods, residual = q
    shift, scale, gate = mods.chunk(3, dim=-1)
    r64 = residual + gate[:, None] * x
    h64, _ = modulate_formula(r64, alpha, shift, scale, weight, bias)   # the norm reads r64 itself
    r_out = r64.view_as(r64)                                          # the output later uses see
    r_out.retain_grad()
    r_out.register_hook(lambda g: 3 * g)
    dh, dr = torch.randn(B, L, D), torch.randn(B, L, D)
    torch.autograd.backward([h, r], [dh, dr])
    torch.autograd.backward([h64, r_out], [dh.double(), dr.double()])
    torch.testing.assert_close(r.grad.double(), r_out.grad)   # dr itself: the hook runs after retain_grad
    _assert_grads([t.grad for t in p], [t.grad for t in q])


def test_threads_share_signatures_and_slots(serial_interpreter):
    """Threads calling dyt and dyt_modulate at once, forward and backward, on one signature (the first
    calls racing to create and fill its slot: the signatures start empty), a shape of their own, and
    the torch backend beside the Triton one; every result against float64."""
    import threading

    from dyt_kernels import functional
    functional._VALIDATED.clear()
    functional._VALIDATED_MOD.clear()
    plans = [("triton", B), ("triton", B), ("triton", B + 1), ("torch", B)]
    barrier, failures = threading.Barrier(len(plans)), []

    def work(backend, batch, seed):
        g = torch.Generator().manual_seed(seed)
        try:
            barrier.wait()
            for _ in range(6):
                x, a, w, b = _leaves(torch.randn(batch, L, D, generator=g), torch.rand(1, generator=g) + 0.5,
                                     torch.randn(D, generator=g), torch.randn(D, generator=g))
                p = _leaves(torch.randn(batch, L, D, generator=g), torch.rand(1, generator=g) + 0.5,
                            torch.randn(D, generator=g), torch.randn(D, generator=g),
                            torch.randn(batch, 3 * D, generator=g), torch.randn(batch, L, D, generator=g))
                dy = torch.randn(batch, L, D, generator=g)
                with use_backend(backend):
                    y = dyt(x, a, w, b)
                    grads = torch.autograd.grad(y, [x, a, w, b], dy)
                    h, r = _modulate(dyt_modulate, *p)
                    mod_grads = torch.autograd.grad([h, r], p, [dy, 2 * dy])
                q = _leaves64(x, a, w, b)
                y64 = dyt_formula(*q)
                torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
                _assert_grads(grads, torch.autograd.grad(y64, q, dy.double()))
                q = _leaves64(*p)
                h64, r64 = _modulate(modulate_formula, *q)
                torch.testing.assert_close(h.double(), h64, rtol=1e-5, atol=1e-5)
                _assert_grads(mod_grads, torch.autograd.grad([h64, r64], q, [dy.double(), 2 * dy.double()]))
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            failures.append(f"{backend}, batch {batch}: {type(e).__name__}: {e}")

    run_in_threads(work, [(*plan, i) for i, plan in enumerate(plans)])
    assert not failures, failures


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_keeps_x_dtype_and_fp32_parameter_gradients(backend, device):
    """Linear -> DyT -> Linear under bf16 autocast: DyT is on no autocast list, so it computes in fp32
    and returns its input's dtype, the Linear's bf16 (README: outputs in x's dtype). A LayerNorm there
    returns fp32 on CUDA (autocast's fp32 list); the next Linear casts either to bf16, the same
    round-to-nearest. The parameters' gradients come back fp32 and agree with float64 to bf16's
    precision (the Linears' bf16 products dominate; 3e-2 of the largest is ~4 bf16 ulps)."""
    torch.manual_seed(0)
    first, norm, last = torch.nn.Linear(D, D), DyT(D), torch.nn.Linear(D, D)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(4 * L, D)
    with use_backend(backend), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        z = norm(first(x))
        out = last(z)
    assert z.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    params = list(norm.parameters())
    assert all(p.grad.dtype == torch.float32 for p in params)
    q = _leaves64(*params)
    h = torch.nn.functional.linear(x.double(), first.weight.double(), first.bias.double())
    out64 = torch.nn.functional.linear(dyt_formula(h, *q), last.weight.double(), last.bias.double())
    # The bound: each bf16 rounding is within 2^-8 (~3.9e-3) relative, and these gradients pass through
    # about eight of them (the first Linear's output, z, the last Linear's inputs and output; back:
    # the output's gradient, dz, the matmul's output), so 8 * 2^-8 ~ 3.1e-2 of the largest entry.
    for p, g64 in zip(params, torch.autograd.grad(out64.pow(2).sum(), q)):
        torch.testing.assert_close(p.grad.double(), g64, rtol=0, atol=3e-2 * g64.abs().max().item())
