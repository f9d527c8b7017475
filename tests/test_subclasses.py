"""Tensor subclasses through dyt and dyt_modulate: nested jagged tensors (variable-length batches),
DTensor (tensor and sequence parallelism), and a wrapper subclass (torch's TwoTensor), on both
backends, values and gradients against float64.

The kernels read a plain tensor's storage, so a subclass takes reference.py's plain ops, whose
rules every subclass has (functional._plain_ops). Before, on the Triton backend (CUDA's default)
each of these failed with an error from deep inside the launcher ("Attempted to access the data
pointer on an invalid python storage", "cannot view shape (2, j2, 8)"). Bound: fp32 pointwise math and
sums over <= 8 rows against float64, atol = rtol = 1e-5 (a few fp32 ulps of O(1) values, with room).
"""
from __future__ import annotations

import pytest
import torch

from dyt_kernels import DyT, dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula

TOL = dict(atol=1e-5, rtol=1e-5)
BACKENDS = ["torch", "triton"]


def _params(D, device):
    return [torch.rand(1, device=device) + 0.5, torch.randn(D, device=device), torch.randn(D, device=device)]


def _grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_jagged_tensors(backend, device):
    D = 8
    lengths = [3, 5, 1]
    rows = [torch.randn(n, D, device=device) for n in lengths]
    nt = torch.nested.nested_tensor(rows, layout=torch.jagged, requires_grad=True)
    a, w, b = (p.requires_grad_() for p in _params(D, device))
    with use_backend(backend):
        y = dyt(nt, a, w, b)
        assert y.is_nested and [t.shape[0] for t in y.unbind()] == lengths
        dy = torch.randn_like(y.values())
        got = _grads(y.values(), (nt, a, w, b), dy)
    x64 = torch.cat(rows).double().requires_grad_()
    p64 = [t.detach().double().requires_grad_() for t in (a, w, b)]
    want = dyt_formula(x64, *p64)
    torch.testing.assert_close(y.values().double(), want, **TOL)
    want_grads = _grads(want, (x64, *p64), dy.double())
    torch.testing.assert_close(got[0].values().double(), want_grads[0], **TOL)
    for g, g64 in zip(got[1:], want_grads[1:]):
        torch.testing.assert_close(g.double(), g64, **TOL)
    # the module, as a model applies it to a variable-length batch
    with use_backend(backend):
        norm = DyT(D).to(device)
        out = norm(nt)
    torch.testing.assert_close(out.values().double(),
                               dyt_formula(x64.detach(), *(p.detach().double() for p in norm.parameters())), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_jagged_modulate(backend, device):
    """A variable-length batch through the adaLN norm: per-sample modulations broadcast over each
    sample's own tokens, residual and x sharing the batch's offsets."""
    D, lengths = 8, [4, 2]
    x_rows = [torch.randn(n, D, device=device) for n in lengths]
    r_rows = [torch.randn(n, D, device=device) for n in lengths]
    nt = torch.nested.nested_tensor(x_rows, layout=torch.jagged)
    res = torch.nested.nested_tensor_from_jagged(torch.cat(r_rows), nt.offsets())
    a, w, b = _params(D, device)
    shift, scale, gate = (torch.randn(2, 1, D, device=device) for _ in range(3))
    with use_backend(backend):
        h, r = dyt_modulate(nt, a, shift, scale, w, b, residual=res, gate=gate)
    for i in range(len(lengths)):
        h64, r64 = modulate_formula(x_rows[i][None].double(), a.double(), shift[i:i + 1].double(),
                                    scale[i:i + 1].double(), w.double(), b.double(), r_rows[i][None].double(),
                                    gate[i:i + 1].double())
        torch.testing.assert_close(h.unbind()[i].double(), h64[0], **TOL)
        torch.testing.assert_close(r.unbind()[i].double(), r64[0], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrapper_subclass(backend, device):
    """torch's TwoTensor (a __torch_dispatch__ wrapper holding two tensors): every op applies to both."""
    from torch.testing._internal.two_tensor import TwoTensor

    D = 8
    xa, xb = torch.randn(4, 3, D, device=device), torch.randn(4, 3, D, device=device)
    x = TwoTensor(xa, xb).requires_grad_()
    a, w, b = _params(D, device)
    shift, scale = torch.randn(4, D, device=device), torch.randn(4, D, device=device)
    with use_backend(backend):
        y = dyt(x, a, w, b)
        h = dyt_modulate(x, a, shift, scale, w, b)
        (dx,) = torch.autograd.grad(y.sum(), x)
    assert type(y) is TwoTensor and type(h) is TwoTensor and type(dx) is TwoTensor
    for part, xp in (("a", xa), ("b", xb)):
        x64 = xp.double().requires_grad_()
        want = dyt_formula(x64, a.double(), w.double(), b.double())
        torch.testing.assert_close(getattr(y, part).double(), want, **TOL)
        torch.testing.assert_close(getattr(dx, part).double(), torch.autograd.grad(want.sum(), x64)[0], **TOL)
        h64, _ = modulate_formula(xp.double(), a.double(), shift.double(), scale.double(), w.double(), b.double())
        torch.testing.assert_close(getattr(h, part).double(), h64, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_sequence_parallel(backend, one_rank_group):
    """A DTensor sharded over tokens with replicated parameters (sequence parallelism), on a one-rank
    CPU mesh: outputs stay DTensors with x's placement; values and gradients as float64 gives them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    D = 8
    x = torch.randn(2, 6, D)
    a, w, b = _params(D, "cpu")
    shift, scale = torch.randn(2, D), torch.randn(2, D)
    xd = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    ad, wd, bd = (distribute_tensor(p, mesh, [Replicate()]).requires_grad_() for p in (a, w, b))
    sd, cd = (distribute_tensor(m, mesh, [Replicate()]) for m in (shift, scale))
    with use_backend(backend):
        y = dyt(xd, ad, wd, bd)
        h = dyt_modulate(xd, ad, sd, cd, wd, bd)
        grads = torch.autograd.grad((y * y).sum() + h.sum(), (xd, ad, wd, bd))
    assert y.placements == (Shard(1),)
    x64 = x.double().requires_grad_()
    p64 = [p.double().requires_grad_() for p in (a, w, b)]
    y64 = dyt_formula(x64, *p64)
    h64, _ = modulate_formula(x64, p64[0], shift.double(), scale.double(), p64[1], p64[2])
    want = torch.autograd.grad((y64 * y64).sum() + h64.sum(), (x64, *p64))
    torch.testing.assert_close(y.full_tensor().double(), y64, **TOL)
    torch.testing.assert_close(h.full_tensor().double(), h64, **TOL)
    for g, g64 in zip(grads, want):   # sums over 12 rows
        torch.testing.assert_close(g.full_tensor().double(), g64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cached", [False, True], ids=["first", "after-plain-calls"])
def test_subclass_among_the_other_arguments(cached, backend, device):
    """A plain x with a subclass weight (dyt) or residual (dyt_modulate): the plain ops too (before,
    the Triton backend failed in the launcher), the values of each part against float64. Also after
    plain tensors of the same shapes have cached their signatures (before, the subclass argument
    matched those and reached the kernels: this test failed in some test orders)."""
    from torch.testing._internal.two_tensor import TwoTensor

    D = 8
    x = torch.randn(2, 3, D, device=device, requires_grad=True)
    a, w, b = _params(D, device)
    wa, wb = torch.randn(D, device=device), torch.randn(D, device=device)
    ra, rb = torch.randn(2, 3, D, device=device), torch.randn(2, 3, D, device=device)
    shift, scale, gate = (torch.randn(2, D, device=device) for _ in range(3))
    with use_backend(backend):
        if cached:
            for _ in range(2):
                dyt(x, a, wa, b)
                dyt_modulate(x, a, shift, scale, w, b, residual=ra, gate=gate)
        y = dyt(x, a, TwoTensor(wa, wb), b)
        h, r = dyt_modulate(x, a, shift, scale, w, b, residual=TwoTensor(ra, rb), gate=gate)
    assert type(y) is TwoTensor and type(h) is TwoTensor and type(r) is TwoTensor
    x64 = x.detach().double()
    for part, wp, rp in (("a", wa, ra), ("b", wb, rb)):
        torch.testing.assert_close(getattr(y, part).double(), dyt_formula(x64, a.double(), wp.double(), b.double()),
                                   **TOL)
        h64, r64 = modulate_formula(x64, a.double(), shift.double(), scale.double(), w.double(), b.double(),
                                    rp.double(), gate.double())
        torch.testing.assert_close(getattr(h, part).double(), h64, **TOL)
        torch.testing.assert_close(getattr(r, part).double(), r64, **TOL)
