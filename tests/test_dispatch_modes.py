"""The ops under TorchDispatchModes and activation checkpointing.

Selective activation checkpointing (torch.utils.checkpoint with create_selective_checkpoint_contexts)
runs the forward under a TorchDispatchMode that caches what its policy saves and hands it back on
recompute. The eager Functions allocate their outputs with torch.empty and fill them from a launch,
so the mode cached bare allocations and, on recompute, the kernel wrote into the cached buffer again:
"Tensor cached during selective activation checkpoint has been mutated". Under a mode the ops now go
through their custom ops, which a mode sees, saves and replays as one op.

Gradients are held to float64 autograd of the formula (float64_checks). The custom ops launch the kernels
(on a CPU through the Triton interpreter, called eagerly: ops/library.py's _kernels).
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dyt_kernels import DyT, dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula

pytestmark = pytest.mark.usefixtures("on_device")

B, L, D = 2, 3, 16


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _assert_grads(grads, grads64):
    # fp32 sums of <= B*L = 6 rows of O(1) terms (and the sin/product around them) against float64
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-4, msg=lambda m: f"gradient {i}: {m}")


def _policy(kind):
    if kind == "ops":   # a list of ops to save: the usual way to pass a policy
        return functools.partial(create_selective_checkpoint_contexts,
                                 [torch.ops.aten.mm.default, torch.ops.dyt_kernels.dyt_fwd.default,
                                  torch.ops.dyt_kernels.dyt_modulate_fwd.default])
    decision = {"save": CheckpointPolicy.MUST_SAVE, "recompute": CheckpointPolicy.PREFER_RECOMPUTE}[kind]
    return functools.partial(create_selective_checkpoint_contexts, lambda ctx, op, *a, **k: decision)


def _dyt_block(x, alpha, weight, bias, m):
    return (dyt(x @ m, alpha, weight, bias).sin() * 2).sum()


def _dyt_block64(x, alpha, weight, bias, m):
    return (dyt_formula(x @ m, alpha, weight, bias).sin() * 2).sum()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["save", "recompute", "ops", "plain"])
def test_dyt_under_activation_checkpointing(backend, kind):
    """Save everything (the case that raised), recompute everything, save a list of ops, and plain
    non-reentrant checkpointing; twice, so the second call takes the signature cache."""
    for _ in range(2):
        p = _leaves(torch.randn(B, L, D), torch.rand(1) + 0.5, torch.randn(D), torch.randn(D), torch.randn(D, D))
        extra = {} if kind == "plain" else {"context_fn": _policy(kind)}
        with use_backend(backend):
            loss = checkpoint(_dyt_block, *p, use_reentrant=False, **extra)
            grads = torch.autograd.grad(loss, p)
        q = [t.detach().double().requires_grad_() for t in p]
        _assert_grads(grads, torch.autograd.grad(_dyt_block64(*q), q))


def _modulate_block(fn, x, alpha, weight, bias, mods, residual):
    shift, scale, gate = mods.chunk(3, dim=-1)
    if fn is dyt_modulate:
        h, r = fn(x, alpha, shift, scale, weight, bias, residual=residual, gate=gate)
    else:
        h, r = fn(x, alpha, shift, scale, weight, bias, residual, gate)
    return (h.sin() * r).sum()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["save", "recompute", "ops"])
def test_dyt_modulate_under_selective_checkpointing(backend, kind):
    for _ in range(2):
        p = _leaves(torch.randn(B, L, D), torch.rand(1) + 0.5, torch.randn(D), torch.randn(D), torch.randn(B, 3 * D),
                    torch.randn(B, L, D))
        with use_backend(backend):
            loss = checkpoint(_modulate_block, dyt_modulate, *p, use_reentrant=False, context_fn=_policy(kind))
            grads = torch.autograd.grad(loss, p)
        q = [t.detach().double().requires_grad_() for t in p]
        _assert_grads(grads, torch.autograd.grad(_modulate_block(modulate_formula, *q), q))


def test_reentrant_checkpoint_of_a_dyt_module():
    """The reentrant form (timm's and older diffusers' default) reruns the forward inside backward()."""
    torch.manual_seed(1)
    block = torch.nn.Sequential(torch.nn.Linear(D, D), DyT(D, alpha_init_value=0.7), torch.nn.Linear(D, D))
    x = torch.randn(B, L, D, requires_grad=True)
    with use_backend("triton"):
        checkpoint(block, x, use_reentrant=True).square().sum().backward()
    got = [x.grad] + [p.grad for p in block.parameters()]
    block64 = block.double()
    x64 = x.detach().double().requires_grad_()
    for p in block64.parameters():
        p.grad = None
    with use_backend("torch"):
        block64(x64).square().sum().backward()
    _assert_grads(got, [x64.grad] + [p.grad for p in block64.parameters()])


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [True, False])
def test_a_dispatch_mode_sees_one_op_each_way(grad):
    """Under a mode the Triton backend's calls show as the custom ops, forward and backward, not as
    allocations that nothing visible fills."""
    x, a, w, b = _leaves(torch.randn(B, L, D), torch.rand(1) + 0.5, torch.randn(D), torch.randn(D))
    mods = torch.randn(3, B, D)
    with use_backend("triton"), torch.set_grad_enabled(grad), _Log() as log:
        y = dyt(x, a, w, b)
        h, r = dyt_modulate(x, a, mods[0], mods[1], w, b, residual=y, gate=mods[2])
        if grad:
            (h + r).sum().backward()
    names = {str(f) for f in log.ops}
    expected = {"dyt_kernels.dyt_fwd.default", "dyt_kernels.dyt_modulate_fwd.default"}
    if grad:
        expected |= {"dyt_kernels.dyt_bwd.default", "dyt_kernels.dyt_modulate_bwd.default"}
    assert expected <= names, names
    assert "aten.empty.memory_format" not in names and "aten.empty_strided.default" not in names, names
    y64 = dyt_formula(*(t.detach().double() for t in (x, a, w, b)))
    h64, r64 = modulate_formula(x.detach().double(), a.detach().double(), *mods.double().unbind(0)[:2],
                                w.detach().double(), b.detach().double(), y64, mods[2].double())
    torch.testing.assert_close(h.detach().double(), h64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.detach().double(), r64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mutation_of_saved_inputs_under_allow_mutation_on_saved_tensors(backend):
    """torch.autograd.graph.allow_mutation_on_saved_tensors (a dispatch mode with saved-tensor hooks) lets a
    tensor the forward saved be changed in place before backward: the gradients are those of the values
    the forward saw."""
    p = _leaves(torch.randn(B, L, D), torch.rand(1) + 0.5, torch.randn(D), torch.randn(D), torch.randn(B, 3 * D),
                torch.randn(B, L, D))
    with use_backend(backend), torch.autograd.graph.allow_mutation_on_saved_tensors():
        x, residual = p[0] * 1.0, p[5] * 1.0   # non-leaf copies, which may be changed in place
        loss = (dyt(x, *p[1:4]).cos() * x).sum() + _modulate_block(dyt_modulate, x, *p[1:5], residual)
        x.mul_(3)
        residual.add_(1)
        grads = torch.autograd.grad(loss, p)
    q = [t.detach().double().requires_grad_() for t in p]
    loss64 = (dyt_formula(*q[:4]).cos() * q[0]).sum() + _modulate_block(modulate_formula, *q)
    _assert_grads(grads, torch.autograd.grad(loss64, q))
