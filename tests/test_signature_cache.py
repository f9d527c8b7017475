"""One argument signature, many memory layouts: calls that share shapes, dtypes and devices but not
strides, interleaved, each checked against float64.

The eager path caches per signature (functional.py) the launch configurations with every integer
argument worked out by the first call, and skips the checks on later matching calls; a later call
whose layout breaks an assumption of that first call would read the wrong elements without an
error. Each sequence starts with the call that fills the cache, then cycles through layouts that
hit the same signature or its neighbours, forward and backward, with and without autograd.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from dyt_kernels import dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula
from helpers import signature_guards


pytestmark = pytest.mark.usefixtures("on_device", "launches_keep_their_signature")

@pytest.fixture(autouse=True, params=["torch", "python"], ids=["TensorGuards", "PyGuards"])
def _guards(request):
    """Every case with signatures matched by torch's guards and by the Python fallback."""
    with signature_guards(request.param):
        yield

B, L, D = 3, 5, 24


def _x_layouts(shape):
    """The same shape in several layouts: dense, relaid (batch dim innermost in storage), a stepped
    slice of a wider buffer, an expansion (stride 0), an offset view that breaks 16-byte alignment."""
    dense = torch.randn(shape)
    yield "dense", dense
    yield "relaid", dense.transpose(0, 1).contiguous().transpose(0, 1)
    yield "stepped", torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    yield "expanded", torch.randn(1, *shape[1:]).expand(shape)
    yield "offset", torch.randn(dense.numel() + 1)[1:].view(shape)
    # rows of a wider buffer (one level, row stride 2D), then batch-inner columns of one (three
    # levels, as attention's head views), at two offsets of the same strides
    wide = torch.randn(*shape[:-1], 2 * shape[-1])
    yield "column slice", wide[..., :shape[-1]]
    yield "column slice, other half", wide[..., shape[-1]:]
    inner = torch.randn(shape[1], shape[0], 2 * shape[-1])
    yield "three levels", inner[..., :shape[-1]].transpose(0, 1)
    yield "three levels, other half", inner[..., shape[-1]:].transpose(0, 1)
    yield "dense again", torch.randn(shape)


def _mod_layouts():
    """shift, scale, gate for (B, L, D): chunks of one projection, dense, per token, (B, 1, D)."""
    yield "chunks", torch.randn(B, 3 * D).chunk(3, dim=-1)
    yield "dense", tuple(torch.randn(B, D) for _ in range(3))
    yield "chunks of another width", torch.randn(B, 4 * D)[:, :3 * D].chunk(3, dim=-1)
    yield "per token", tuple(torch.randn(B, L, D) for _ in range(3))
    yield "(B, 1, D)", tuple(torch.randn(B, 1, D) for _ in range(3))
    yield "chunks again", torch.randn(B, 3 * D).chunk(3, dim=-1)


def _grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_dyt_layouts_through_one_signature(grad):
    a, w, b = torch.rand(1) + 0.5, torch.randn(D), torch.randn(D)
    dy_layouts = itertools.cycle(["dense", "relaid", "like x"])
    for (name, x), _ in itertools.product(_x_layouts((B, L, D)), range(2)):   # twice: fill, then hit
        x = x.detach().requires_grad_()   # the layout itself (a leaf view of the same storage)
        leaves = (x, *(p.clone().requires_grad_() for p in (a, w, b)))
        with use_backend("triton"), torch.set_grad_enabled(grad):
            y = dyt(*leaves)
        ins64 = [t.detach().double().requires_grad_() for t in leaves]
        want = dyt_formula(*ins64)
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5, msg=name)
        if grad:
            # dy dense, relaid, or laid out as x where x is dense (autograd hands whatever comes)
            how = next(dy_layouts)
            dy = torch.randn(B, L, D)
            if how == "relaid":
                dy = dy.transpose(0, 1).contiguous().transpose(0, 1)
            elif how == "like x":
                dy = torch.empty_like(x).copy_(dy)
            with use_backend("triton"):
                got = _grads(y, leaves, dy)
            for n, g, g64 in zip(("x", "alpha", "weight", "bias"), got, _grads(want, ins64, dy.double())):
                # parameter gradients sum B * L = 15 rows (alpha: all 360 elements) of O(1) terms in fp32
                atol = 1e-5 if n == "x" else 1e-4   # dx is elementwise; the others are the sums above
                torch.testing.assert_close(g.double(), g64, atol=atol, rtol=1e-5, msg=f"{name}, dy {how}: d{n}")


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_modulate_layouts_through_one_signature(grad):
    a, w, b = torch.rand(1) + 0.5, torch.randn(D), torch.randn(D)
    xs, res = dict(_x_layouts((B, L, D))), torch.randn(B, L, D)
    for (mname, mods), xname, _ in itertools.product(_mod_layouts(), ["dense", "relaid"], range(2)):
        x = xs[xname].detach().requires_grad_()
        shift, scale, gate = (m.detach().requires_grad_() for m in mods)
        with use_backend("triton"), torch.set_grad_enabled(grad):
            h, r = dyt_modulate(x, a, shift, scale, w, b, residual=res, gate=gate)
        ins64 = [t.detach().double().requires_grad_() for t in (x, shift, scale, gate)]
        h64, r64 = modulate_formula(ins64[0], a.double(), ins64[1], ins64[2], w.double(), b.double(), res.double(),
                                    ins64[3])
        msg = f"{mname}, x {xname}"
        torch.testing.assert_close(h.double(), h64, atol=1e-5, rtol=1e-5, msg=msg)
        torch.testing.assert_close(r.double(), r64, atol=1e-5, rtol=1e-5, msg=msg)
        if grad:
            dh, dr = torch.randn(B, L, D), torch.randn(B, L, D)
            with use_backend("triton"):
                got = _grads((h, r), (x, shift, scale, gate), (dh, dr))
            want = _grads((h64, r64), ins64, (dh.double(), dr.double()))
            for n, g, g64 in zip(("x", "shift", "scale", "gate"), got, want):
                # per-sample modulation gradients sum over L = 5 tokens of O(1) terms in fp32
                torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-5, msg=f"{msg}: d{n}")


def _cf_layouts(shape):
    """An (N, C, H, W) shape for channels_last=False in several layouts: NCHW dense, stored NHWC
    (channels_last memory format), a stepped slice, an expansion over the batch, a misaligned offset
    view, batch innermost in storage; then NCHW and NHWC again (hits of the first two signatures)."""
    dense = torch.randn(shape)
    last = len(shape) - 1

    def nhwc(t):   # (N, C): column-major stands in
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.t().contiguous().t()
    yield "NCHW", dense
    yield "NHWC", nhwc(torch.randn(shape))
    yield "stepped", torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    yield "expanded", torch.randn(1, *shape[1:]).expand(shape)
    yield "offset", torch.randn(dense.numel() + 1)[1:].view(shape)
    yield "relaid", dense.transpose(0, last).contiguous().transpose(0, last)
    yield "NCHW again", torch.randn(shape)
    yield "NHWC again", nhwc(torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (3, 6, 1, 1), (5, 6)], ids=["NCHW", "Nx6x1x1", "NxC"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_dyt_channels_first_layouts_through_one_signature(grad, shape):
    """channels_last=False caches per signature too, with x's strides in it (they decide whether
    the kernels walk rows of one channel or channels along rows); a cached call launches on the
    tensors themselves, so every layout, and dy in a layout other than x's, must still be read right.
    Gradients of alpha (per channel), weight and bias are sums over N*H*W of O(1) terms in fp32."""
    C = shape[1]
    a, w, b = torch.rand(C) + 0.5, torch.randn(C), torch.randn(C)
    dy_layouts = itertools.cycle(["like x", "NCHW", "NHWC"])
    for (name, x), _ in itertools.product(_cf_layouts(shape), range(2)):   # twice: fill, then hit
        x = x.detach().requires_grad_()
        leaves = (x, *(p.clone().requires_grad_() for p in (a, w, b)))
        with use_backend("triton"), torch.set_grad_enabled(grad):
            y = dyt(*leaves, channels_last=False)
        ins64 = [t.detach().double().requires_grad_() for t in leaves]
        want = dyt_formula(*ins64, channels_last=False)
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5, msg=name)
        if grad:
            how = next(dy_layouts)
            dy = torch.randn(shape)
            if how == "like x":
                dy = torch.empty_like(x).copy_(dy)
            elif how == "NHWC":
                dy = dy.contiguous(memory_format=torch.channels_last) if dy.dim() == 4 else dy.t().contiguous().t()
            with use_backend("triton"):
                got = _grads(y, leaves, dy)
            for n, g, g64 in zip(("x", "alpha", "weight", "bias"), got, _grads(want, ins64, dy.double())):
                atol = 1e-5 if n == "x" else 1e-4   # dx is elementwise; the others are the sums above
                torch.testing.assert_close(g.double(), g64, atol=atol, rtol=1e-5, msg=f"{name}, dy {how}: d{n}")


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_the_channels_last_flag_is_part_of_the_signature(grad):
    """The same tensors with channels_last True, then False, then True again: (2, 8, 8) has C = 8 either
    way, so every tensor fact matches and only the flag tells the calls apart; a signature that
    ignored it would walk x by the first call's layout (the rows of the last dim) for the second."""
    x = torch.randn(2, 8, 8)
    a, w, b = torch.tensor([0.7]), torch.randn(8), torch.randn(8)
    leaves = [t.clone().requires_grad_(grad) for t in (x, a, w, b)]
    ins64 = [t.detach().double() for t in leaves]
    for channels_last in (True, False, True, False):
        with use_backend("triton"):
            y = dyt(*leaves, channels_last=channels_last)
        want = dyt_formula(*ins64, channels_last=channels_last)
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5, msg=f"channels_last={channels_last}")
        if grad:   # the backward's slot is the signature's too: its gradients against float64's
            dy = torch.randn_like(y)
            got = torch.autograd.grad(y, leaves, dy)
            ins64g = [t.clone().requires_grad_() for t in ins64]
            want_g = torch.autograd.grad(dyt_formula(*ins64g, channels_last=channels_last), ins64g, dy.double())
            for n, g, g64 in zip(("x", "alpha", "weight", "bias"), got, want_g):
                atol = 1e-5 if n == "x" else 1e-4   # dx is elementwise; the others are sums (as above)
                torch.testing.assert_close(g.double(), g64, atol=atol, rtol=1e-5,
                                           msg=f"channels_last={channels_last}: d{n}")


def _grads64(formula, leaves, out_grads, **kw):
    ins64 = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    outs = formula(*ins64, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, [t for t in ins64 if t is not None], [g.double() for g in out_grads])


@pytest.mark.parametrize("changed", ["weight", "bias", "alpha"])
def test_a_parameter_given_another_dtype_between_forward_and_backward(changed):
    """`module.half()` or `param.data = param.data.half()` between a forward and its backward: the
    parameter the backward sees has another dtype than the one the forward's signature holds (dbias
    is allocated from bias itself, which the Function keeps by reference). The backward must not take
    the signature's cached launches, whose kernels were compiled for the forward's dtypes; autograd
    casts each gradient back to the dtype its input had in the forward."""
    x, a, w, b = torch.randn(3, 5, 16), torch.tensor([0.7]), torch.randn(16), torch.randn(16)
    leaves = [t.clone().requires_grad_() for t in (x, a, w, b)]
    for step in range(3):   # the first calls fill the signature's slots, the last one changes a dtype
        with use_backend("triton"):
            y = dyt(*leaves)
        names = ("x", "alpha", "weight", "bias")
        if step == 2:
            leaves[names.index(changed)].data = leaves[names.index(changed)].data.to(torch.float16)
        # The backward recomputes from what it holds, so its gradients are the formula's at the values
        # it sees: the changed parameter's rounded to fp16 (float64's gradients taken after the change).
        want = _grads64(dyt_formula, leaves, [dy := torch.randn_like(y)])
        # (a leaf given another dtype gets a new gradient accumulator, so the graph no longer reaches
        # it; the backward still computes its gradient, with the kernels, as ctx.needs_input_grad asks)
        kept = [i for i, n in enumerate(names) if step < 2 or n != changed]
        got = torch.autograd.grad(y, [leaves[i] for i in kept], dy)
        for i, g in zip(kept, got):
            assert g.dtype == torch.float32, names[i]
            atol = 1e-5 if names[i] == "x" else 1e-4   # elementwise and sums, as in the flag test above
            torch.testing.assert_close(g.double(), want[i], atol=atol, rtol=1e-5,
                                       msg=f"step {step}, {changed} changed: d{names[i]}")


def test_a_modulation_given_another_dtype_between_forward_and_backward():
    """As above for dyt_modulate's per-sample shift (its gradient, written by the kernels, is allocated
    in shift's dtype at the backward) and its bias."""
    x, a, w, b = torch.randn(3, 5, 16), torch.tensor([0.7]), torch.randn(16), torch.randn(16)
    shift, scale, gate, res = torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 5, 16)
    names = ("x", "alpha", "shift", "scale", "weight", "bias", "residual", "gate")
    for changed in ("shift", "bias", "scale"):
        leaves = [t.clone().requires_grad_() for t in (x, a, shift, scale, w, b, res, gate)]
        for step in range(3):
            with use_backend("triton"):
                h, r = dyt_modulate(*leaves[:6], residual=leaves[6], gate=leaves[7])
            if step == 2:
                leaves[names.index(changed)].data = leaves[names.index(changed)].data.to(torch.float16)
            douts = [torch.randn_like(h), torch.randn_like(r)]
            want = _grads64(modulate_formula, leaves, douts)   # at the values the backward sees (above)
            kept = [i for i, n in enumerate(names) if step < 2 or n != changed]
            got = torch.autograd.grad((h, r), [leaves[i] for i in kept], douts)
            for i, g in zip(kept, got):
                assert g.dtype == torch.float32, names[i]
                torch.testing.assert_close(g.double(), want[i], atol=1e-4, rtol=1e-5,
                                           msg=f"step {step}, {changed} changed: d{names[i]}")
