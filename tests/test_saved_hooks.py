"""Saved-tensor hooks (activation offloading, save_on_cpu, compression hooks) and non-reentrant
activation checkpointing, which is built on them, through dyt and dyt_modulate.

A validated signature's backward call fixes every stride from the forward's inputs. Hooks hand the
backward whatever they unpack: a clone or a copy back from the CPU makes adaLN's chunked modulations
dense, a relayout changes x's strides. Before autograd._backward_slot, a backward after such a call
read the wrong elements: gradients off by orders of magnitude, silently. The first call of each test
fills the signature's slot, as training's earlier steps do; every gradient is held to float64.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from dyt_kernels import dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula


# (conftest.py) no runner ever handed two sets of argument dtypes
pytestmark = pytest.mark.usefixtures("launches_keep_their_signature")


def _relayout(t):
    """The same values in another memory layout (x's batch dim outermost in storage no more)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() == 3 else t.clone()


HOOKS = {
    "clone": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t),
    "relayout": lambda: torch.autograd.graph.saved_tensors_hooks(_relayout, lambda t: t),
    "save_on_cpu": lambda: torch.autograd.graph.save_on_cpu(),
}


def _inputs(device):
    D = 32
    t = lambda *s: torch.randn(*s, device=device, requires_grad=True)  # noqa: E731
    return dict(x=t(3, 5, D), alpha=(torch.rand(1, device=device) + 0.5).requires_grad_(), weight=t(D), bias=t(D),
                mods=t(3, 3 * D), residual=t(3, 5, D))


def _dyt(p):
    return dyt(p["x"], p["alpha"], p["weight"], p["bias"])


def _modulate(p):
    shift, scale, gate = p["mods"].chunk(3, dim=-1)   # strided views, as adaLN makes them
    h, r = dyt_modulate(p["x"], p["alpha"], shift, scale, p["weight"], p["bias"], residual=p["residual"], gate=gate)
    return h * r


def _oracle(op, p):
    q = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    if op is _dyt:
        out = dyt_formula(q["x"], q["alpha"], q["weight"], q["bias"])
    else:
        shift, scale, gate = q["mods"].chunk(3, dim=-1)
        h, r = modulate_formula(q["x"], q["alpha"], shift, scale, q["weight"], q["bias"], q["residual"], gate)
        out = h * r
    return out, q


def _filled(op, device):
    """Inputs, leaf names, upstream gradient, after one call that fills the signature's slot (as
    training's earlier steps do)."""
    p = _inputs(device)
    names = ["x", "alpha", "weight", "bias"] + (["mods", "residual"] if op is _modulate else [])
    dout = torch.randn(3, 5, 32, device=device)
    with use_backend("triton"):
        torch.autograd.grad(op(p), [p[n] for n in names], dout)
    return p, names, dout


def _check(op, p, names, dout, out, grads):
    want, q = _oracle(op, p)
    want_grads = torch.autograd.grad(want, [q[n] for n in names], dout.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    for n, g, g64 in zip(names, grads, want_grads):
        # fp32 sums of <= 15 rows of O(1) terms (alpha: of all 480 elements) against float64
        torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("op", [_dyt, _modulate], ids=["dyt", "dyt_modulate"])
@pytest.mark.parametrize("mode", [*HOOKS, "checkpoint"])
def test_gradients_under_saved_tensor_hooks(op, mode, device):
    p, names, dout = _filled(op, device)
    leaves = [p[n] for n in names]
    with use_backend("triton"):
        if mode == "checkpoint":
            out = checkpoint(op, p, use_reentrant=False)
            grads = torch.autograd.grad(out, leaves, dout)
        else:
            with HOOKS[mode]():
                out = op(p)
                grads = torch.autograd.grad(out, leaves, dout)
    _check(op, p, names, dout, out, grads)


def _relayout_vector(t):
    """A 1-D tensor's values at stride 2 (a hook may unpack any layout); others relaid as above."""
    if t.dim() == 1:
        return torch.stack([t, t], dim=1)[:, 0]
    return _relayout(t)


@pytest.mark.parametrize("op", [_dyt, _modulate], ids=["dyt", "dyt_modulate"])
@pytest.mark.parametrize("pack", [lambda t: t.clone(), _relayout_vector], ids=["clone", "relayout"])
def test_gradients_with_hooks_on_single_saved_tensors(op, pack, device):
    """Hooks registered on each saved tensor after the forward (grad_fn._raw_saved_tensors[i]
    .register_hooks), which the forward cannot see: the backward checks what it unpacks against its
    cached call (before: NaN and 1e23 for adaLN's chunked modulations), and reads vectors unpacked at
    stride 2 through contiguous copies."""
    p, names, dout = _filled(op, device)
    with use_backend("triton"):
        out = op(p)
        node = out.grad_fn if op is _dyt else out.grad_fn.next_functions[0][0]   # h * r: the op's node is h's
        assert "DyT" in type(node).__name__, type(node).__name__
        for saved in node._raw_saved_tensors:
            if saved is not None:
                saved.register_hooks(pack, lambda t: t)
        grads = torch.autograd.grad(out, [p[n] for n in names], dout)
    _check(op, p, names, dout, out, grads)


def _cf_nchw(device):
    return torch.randn(2, 8, 3, 4, device=device)


def _cf_nhwc(device):
    return torch.randn(2, 8, 3, 4, device=device).contiguous(memory_format=torch.channels_last)


def _head_view(device):
    qkv = torch.randn(2, 5, 3 * 2 * 8, device=device)
    return qkv.view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)[1]     # (B, H, L, d), three strided levels


def _swap_layout(t):
    """x in the other layout: NCHW <-> NHWC for 4-D channels-first data, dense for a head view."""
    if t.dim() == 4 and t.shape[1] == 8:
        fmt = torch.contiguous_format if not t.is_contiguous() else torch.channels_last
        return t.contiguous(memory_format=fmt)
    return t.contiguous()


@pytest.mark.parametrize("make,channels_last", [(_cf_nchw, False), (_cf_nhwc, False), (_head_view, True)],
                         ids=["NCHW channels-first", "NHWC channels-first", "head view"])
def test_a_hook_relaying_x_after_the_forward(make, channels_last, device):
    """A signature whose x the forward read in place records how (rows of one channel, channels along
    rows, three strided levels) and its backward launch; a hook on the saved x that unpacks it in
    another layout must take its own walk and launch, not the recorded ones (before, the channels-first
    backward kept the slot's launch for another layout). Gradients against float64."""
    C = 8
    x0 = make(device)
    a, w, b = (torch.rand(C, device=device) + 0.5), torch.randn(C, device=device), torch.randn(C, device=device)
    dy = torch.randn(x0.shape, device=device)
    for hooked in (False, False, True):   # fill the slot, hit it, then hook x
        x = x0.detach().requires_grad_()
        leaves = [x] + [t.clone().requires_grad_() for t in (a, w, b)]
        with use_backend("triton"):
            y = dyt(*leaves, channels_last=channels_last)
            if hooked:
                saved = y.grad_fn._raw_saved_tensors[0]   # x
                saved.register_hooks(_swap_layout, lambda t: t)
            grads = torch.autograd.grad(y, leaves, dy)
        q = [t.detach().double().requires_grad_() for t in leaves]
        want = dyt_formula(*q, channels_last=channels_last)
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
        for n, g, g64 in zip(("x", "alpha", "weight", "bias"), grads, torch.autograd.grad(want, q, dy.double())):
            # fp32 sums of <= 24 O(1) terms per channel against float64
            torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4, msg=f"{n}, hooked={hooked}")


def _to_double(t):
    """A hook that unpacks another dtype than it was given (float64: the same values, exactly)."""
    return t.double()


@pytest.mark.parametrize("op", [_dyt, _modulate], ids=["dyt", "dyt_modulate"])
def test_a_hook_unpacking_another_dtype(op, device):
    """A hook on each saved tensor that unpacks it as float64 after an fp32 forward (the same values):
    the kernels must read each tensor in the dtype it comes in, or cast it back (before, a cached
    backward read float64 memory through the forward's fp32 pointers, silently). Gradients against
    float64, as without the hook."""
    p, names, dout = _filled(op, device)
    with use_backend("triton"):
        out = op(p)
        node = out.grad_fn if op is _dyt else out.grad_fn.next_functions[0][0]
        for saved in node._raw_saved_tensors:
            if saved is not None:
                saved.register_hooks(lambda t: t, _to_double)
        grads = torch.autograd.grad(out, [p[n] for n in names], dout)
    _check(op, p, names, dout, out, grads)


def test_dyt_with_a_hook_unpacking_bf16(device):
    """x unpacked as bf16 after an fp32 forward: the backward computes at the values the hook hands
    back (the oracle takes the bf16-rounded x), in the forward's dtype."""
    p, names, dout = _filled(_dyt, device)
    with use_backend("triton"):
        out = _dyt(p)
        out.grad_fn._raw_saved_tensors[0].register_hooks(lambda t: t, lambda t: t.to(torch.bfloat16))
        grads = torch.autograd.grad(out, [p[n] for n in names], dout)
    q = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    xr = p["x"].detach().to(torch.bfloat16).double().requires_grad_()
    want = dyt_formula(xr, q["alpha"], q["weight"], q["bias"])
    want_grads = torch.autograd.grad(want, [xr, q["alpha"], q["weight"], q["bias"]], dout.double())
    for n, g, g64 in zip(names, grads, want_grads):
        assert g.dtype == torch.float32, n
        # fp32 sums of <= 15 rows of O(1) terms (alpha: of all 480 elements) against float64
        torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4, msg=n)
