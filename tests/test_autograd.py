"""The paths autograd.py gives a call: eager Functions, and under torch.compile the fused path
(pointwise forward the compiler fuses, our backward kernel as a custom op) and the opaque one.

The compiled paths are traced on the test device: on CPU the custom ops compute with reference.py,
on a GPU the same graphs launch the kernels (bench/gpu_check.sh runs them). Every path is checked
against the same float64 oracle as the eager kernels.
"""
from __future__ import annotations

import pytest
import torch

from dyt_kernels import dyt, dyt_modulate, reference, use_backend
from dyt_kernels.autograd import DyTFused, DyTModulateFused

# Tensors made here land on the test device: on a GPU machine the Triton backend refuses CPU tensors
# and the same graphs launch the kernels.
pytestmark = pytest.mark.usefixtures("on_device")


class _Graphs:
    """A torch.compile backend that keeps the graphs dynamo hands it and runs them as they are."""

    def __init__(self):
        self.code: list[str] = []

    def __call__(self, gm, example_inputs):
        self.code.append(gm.code)
        for sub in gm.modules():
            if sub is not gm and hasattr(sub, "code"):
                self.code.append(sub.code)
        return gm.forward


def _inputs(shape, C, dtype=torch.float32):
    x = (2 * torch.randn(shape)).to(dtype).requires_grad_()
    a = torch.tensor([0.7], requires_grad=True)
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    return x, a, w, b


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("channels_last", [True, False], ids=["last", "first"])
def test_fused_path_compiles_to_pointwise_forward_and_kernel_backward(channels_last):
    """DyTFused under torch.compile(fullgraph): no graph break, the forward is torch's tanh (fusable),
    the backward is dyt_kernels::dyt_bwd; values equal reference.py's float64 answer to fp32 rounding."""
    torch._dynamo.reset()
    shape, C = ((6, 40), 40) if channels_last else ((2, 5, 3, 4), 5)
    x, a, w, b = _inputs(shape, C)
    graphs = _Graphs()
    f = torch.compile(lambda *t: DyTFused.apply(*t, channels_last), backend=graphs, fullgraph=True)
    y = f(x, a, w, b)
    dy = torch.randn_like(y)
    grads = _grads(y, (x, a, w, b), dy)
    code = "\n".join(graphs.code)
    assert "dyt_bwd" in code and "dyt_fwd" not in code and "tanh" in code, code
    x64, a64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, a, w, b))
    y64 = reference.dyt(x64, a64, w64, b64, channels_last)
    g64 = _grads(y64, (x64, a64, w64, b64), dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, g64):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual+gate"])
def test_fused_modulate_path(residual):
    torch._dynamo.reset()
    B, L, D = 2, 5, 24
    x, a, w, b = _inputs((B, L, D), D)
    shift, scale, gate = (torch.randn(B, D, requires_grad=True) for _ in range(3))
    res = torch.randn(B, L, D, requires_grad=True) if residual else None
    g = gate if residual else None
    graphs = _Graphs()
    f = torch.compile(lambda *t: DyTModulateFused.apply(*t), backend=graphs, fullgraph=True)
    out = f(x, a, shift, scale, w, b, res, g)
    outs = list(out) if residual else [out]
    inputs = [t for t in (x, a, shift, scale, w, b, res, g) if t is not None]
    douts = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, douts)
    code = "\n".join(graphs.code)
    assert "dyt_modulate_bwd" in code and "dyt_modulate_fwd" not in code, code
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    it = iter(in64)
    args64 = [next(it) if t is not None else None for t in (x, a, shift, scale, w, b, res, g)]
    out64 = reference.dyt_modulate(*args64)
    outs64 = list(out64) if residual else [out64]
    g64 = torch.autograd.grad(outs64, in64, [d.double() for d in douts])
    for o, r in zip(outs, outs64):
        torch.testing.assert_close(o.double(), r, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, g64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _forward_bodies(fn, *args):
    """The forward bodies dynamo traces for the autograd Functions that fn applies."""
    graphs = _Graphs()
    gms = []
    torch._dynamo.reset()
    torch.compile(fn, backend=lambda gm, ex: (gms.append(gm), graphs(gm, ex))[1], fullgraph=True)(*args)
    return [sub for gm in gms for name, sub in gm.named_modules() if name.startswith("fwd_body")]


def _shared_tensors(body) -> list[str]:
    """Nodes of a traced forward whose tensor is the very tensor of an earlier node (a no-op cast)."""
    seen, shared = {}, []
    for node in body.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                shared.append(f"{node.name} is {seen[id(value)]}")
            seen.setdefault(id(value), node.name)
    return shared


_ALIAS_CASES = {
    "dyt fp32": ("dyt", torch.float32, True, True),
    "dyt bf16": ("dyt", torch.bfloat16, True, True),
    "dyt fp32 no affine": ("dyt", torch.float32, False, False),
    "modulate plain": ("mod", torch.float32, None, None),
    "modulate residual": ("mod", torch.float32, torch.float32, None),
    "modulate residual+gate": ("mod", torch.float32, torch.float32, True),
    "modulate bf16 x, fp32 residual+gate": ("mod", torch.bfloat16, torch.float32, True),
}


@pytest.mark.parametrize("case", list(_ALIAS_CASES))
def test_fused_forwards_hold_no_tensor_twice(case):
    """The fused paths' forwards (reference.py's formulas, traced by dynamo) hold no node that is the
    same tensor as another: a no-op `.to` of a tensor the Function returns makes torch 2.11's dynamo
    give that output silently zero gradients (pytorch/pytorch#180642; the numeric tests above fail
    there without reference.cast). This holds the workaround on every torch, including ones without
    the bug."""
    kind, dtype, p1, p2 = _ALIAS_CASES[case]
    if kind == "dyt":
        x, a, w, b = _inputs((6, 40), 40, dtype)
        args = (x, a, w if p1 else None, b if p2 else None)
        bodies = _forward_bodies(lambda *t: DyTFused.apply(*t, True), *args)
    else:
        B, L, D = 2, 5, 24
        x, a, w, b = _inputs((B, L, D), D, dtype)
        shift, scale, gate = (torch.randn(B, D, requires_grad=True) for _ in range(3))
        res = None if p1 is None else torch.randn(B, L, D, dtype=p1, requires_grad=True)
        args = (x, a, shift, scale, w, b, res, gate if p2 else None)
        bodies = _forward_bodies(lambda *t: DyTModulateFused.apply(*t), *args)
    assert bodies, "no autograd Function forward was traced"
    for body in bodies:
        assert _shared_tensors(body) == [], body.graph


def test_opaque_path_keeps_both_kernels_under_compile():
    """use_backend("triton") under compile: the custom ops in both directions."""
    torch._dynamo.reset()
    x, a, w, b = _inputs((6, 40), 40)
    graphs = _Graphs()
    with use_backend("triton"):
        y = torch.compile(lambda *t: dyt(*t), backend=graphs, fullgraph=True)(x, a, w, b)
        _grads(y, (x, a, w, b), torch.randn_like(y))
    assert "dyt_fwd" in "\n".join(graphs.code)


def test_double_backward_follows_the_reference_formulas():
    """create_graph=True through the eager Triton path: the backward switches to reference.py's
    differentiable formulas, so a gradient penalty gets float64's value."""
    x, a, _, _ = _inputs((3, 16), 16)
    with use_backend("triton"):
        (gx,) = torch.autograd.grad(dyt(x, a).pow(2).sum(), x, create_graph=True)
        (ga,) = torch.autograd.grad(gx.pow(2).sum(), a)
    x64, a64 = x.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(torch.tanh(a64 * x64).pow(2).sum(), x64, create_graph=True)
    (ga64,) = torch.autograd.grad(gx64.pow(2).sum(), a64)
    torch.testing.assert_close(ga.double(), ga64, rtol=1e-5, atol=1e-6)


def test_modulate_double_backward():
    B, L, D = 2, 3, 8
    x = torch.randn(B, L, D, requires_grad=True)
    s = torch.randn(B, D, requires_grad=True)
    with use_backend("triton"):
        (gx,) = torch.autograd.grad(dyt_modulate(x, 0.5, s, s).pow(2).sum(), x, create_graph=True)
        (gs,) = torch.autograd.grad(gx.pow(2).sum(), s)
    with use_backend("torch"):
        (gx_t,) = torch.autograd.grad(dyt_modulate(x, 0.5, s, s).pow(2).sum(), x, create_graph=True)
        (gs_t,) = torch.autograd.grad(gx_t.pow(2).sum(), s)
    torch.testing.assert_close(gs, gs_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last,shape", [(True, (3, 5, 40)), (False, (2, 6, 3, 5)), (True, (0, 7))])
def test_no_grad_forward_skips_the_function_and_matches(device, channels_last, shape):
    """Under no_grad / inference_mode the eager path launches the forward without an autograd.Function
    (sampling pays no graph bookkeeping): same values as the recording path, bitwise, and nothing
    recorded."""
    C = shape[-1] if channels_last else shape[1]
    x = torch.randn(shape, device=device)
    a, w, b = torch.tensor([0.7], device=device), torch.randn(C, device=device), torch.randn(C, device=device)
    with use_backend("triton"):
        leaves = [t.clone().requires_grad_() for t in (x, a, w, b)]
        recorded = dyt(*leaves, channels_last=channels_last)
        assert recorded.grad_fn is not None
        for _ in range(2):   # the second call takes the validated-signature path
            with torch.no_grad():
                plain = dyt(*leaves, channels_last=channels_last)
            with torch.inference_mode():
                inferred = dyt(x, a, w, b, channels_last=channels_last)
            assert plain.grad_fn is None and not plain.requires_grad and inferred.is_inference()
            assert torch.equal(plain, recorded.detach()) and torch.equal(inferred, recorded.detach())


def test_backend_choice_under_compile_is_read_at_trace_time():
    """fullgraph compile reads use_backend's choice without a graph break on every torch. Where dynamo
    traces ContextVar.get it guards on the value (a new choice retraces); where it cannot (torch before
    mid-2026: the GPU image's 2.11), the choice is a trace-time constant until torch._dynamo.reset()."""
    from dyt_kernels import backend

    torch._dynamo.reset()
    f = torch.compile(lambda t: t + (1.0 if backend.traced_backend() == "torch" else 0.0), fullgraph=True,
                      backend="eager")
    x = torch.zeros(1)
    with use_backend("torch"):
        assert f(x).item() == 1.0
    assert f(x).item() == (0.0 if backend._DYNAMO_TRACES_CONTEXTVARS else 1.0)
    torch._dynamo.reset()
    assert f(x).item() == 0.0


@pytest.mark.parametrize("route", ["eager", "fused", "opaque"])
def test_fp32_residual_gradient_stays_fp32_under_a_bf16_x(route, monkeypatch):
    """bf16 x on an fp32 residual stream, no gate: the kernels write dresidual in fp32 beside dx in
    bf16, and every route returns that one. The compiled routes used to take it from dx (the
    custom ops leave dresidual out only where it is dx), rounding it to bf16: 1.3e-2 off."""
    from dyt_kernels import functional
    torch._dynamo.reset()
    B, L, D = 2, 5, 32
    x = torch.randn(B, L, D).to(torch.bfloat16).requires_grad_()
    res = torch.randn(B, L, D, requires_grad=True)
    shift, scale = torch.randn(B, D), torch.randn(B, D)
    a, w, b = torch.tensor([0.7]), torch.randn(D), torch.randn(D)

    def f(x, res):
        return dyt_modulate(x, a, shift, scale, w, b, residual=res)

    if route != "eager":
        monkeypatch.setattr(functional, "use_triton", lambda x, name=None: True)
        f = torch.compile(f, backend=_Graphs(), fullgraph=True)
    with use_backend("auto" if route == "fused" else "triton"):
        h, r = f(x, res)
        dh, dr = torch.randn_like(h), torch.randn_like(r)
        dres, = torch.autograd.grad((h, r), res, (dh, dr))
    x64, res64 = x.detach().double(), res.detach().double().requires_grad_()
    h64, r64 = reference.dyt_modulate(x64, a.double(), shift.double(), scale.double(), w.double(), b.double(),
                                      res64)
    want, = torch.autograd.grad((h64, r64), res64, (dh.double(), dr.double()))
    assert dres.dtype == torch.float32
    # fp32 math on O(1) values: a few fp32 ulps; a bf16 rounding is 2^-9 relative
    torch.testing.assert_close(dres.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guards", ["torch", "python"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("python_apply", [False, True], ids=["this-torch", "python-apply"])
def test_lean_apply_matches_float64_and_unwraps_dead_wrappers(python_apply, affine, guards, device, monkeypatch):
    """The eager Functions' apply: torch's own where it is C++, else (forced here: torch 2.11's is
    Python) the C apply called directly after unwrapping dead functorch wrappers, as torch's Python
    apply does. Both against float64: values and gradients, with and without affine, a residual and
    a gate; and x a dead wrapper (a tensor that escaped a finished torch.func.grad), which works as
    the tensor it wraps."""
    from float64_checks import dyt_formula, modulate_formula

    from dyt_kernels import _signatures
    from dyt_kernels import autograd as AG
    from dyt_kernels import functional as Fn
    monkeypatch.setattr(Fn, "dyt_apply", AG.lean_dyt_apply(AG.DyTFunction, python_apply))
    monkeypatch.setattr(Fn, "modulate_apply", AG.lean_modulate_apply(AG.DyTModulateFunction, python_apply))
    leaked = []

    def f(t):
        leaked.append(t * 1)   # escapes the transform: a dead wrapper once grad returns
        return (t * t).sum()
    torch.func.grad(f)(torch.randn(2, 5, 8, device=device))
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    plain = torch._C._functorch.unwrap_if_dead(dead)
    D = 8
    a = torch.tensor([0.7], device=device, requires_grad=True)
    w, b = (torch.randn(D, device=device, requires_grad=True) for _ in range(2)) if affine else (None, None)
    res, shift, scale, gate = (torch.randn(*s, device=device, requires_grad=True)
                               for s in ((2, 5, D), (2, D), (2, D), (2, D)))
    params = [p for p in (a, w, b) if p is not None]
    dy = torch.randn(2, 5, D, device=device)
    d64 = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    monkeypatch.setattr(_signatures, "GUARDS", {"torch": _signatures._c_guards(), "python": _signatures.PyGuards}[guards])
    Fn._VALIDATED.clear()
    Fn._VALIDATED_MOD.clear()
    # plain twice (the second call finds the first's slot and skips the unwrapping), then the dead
    # wrapper twice: never remembered, it never finds a slot (its gradient is its unwrapped tensor's)
    for i, x in enumerate((plain.clone().requires_grad_(), plain.clone().requires_grad_(), dead, dead)):
        if i == 2:
            remembered = (len(Fn._VALIDATED.slots()), len(Fn._VALIDATED_MOD.slots()))
            assert remembered == (1, 1)
        with use_backend("triton"):
            y = dyt(x, a, w, b)
            h, r = dyt_modulate(x, a, shift, scale, w, b, residual=res, gate=gate)
            leaves = ([] if x is dead else [x]) + params + [res, shift, scale, gate]
            grads = torch.autograd.grad((y, h, r), leaves, (dy, dy, dy))
        x64 = d64(plain)
        a64, w64, b64, res64, shift64, scale64, gate64 = map(d64, (a, w, b, res, shift, scale, gate))
        y64 = dyt_formula(x64, a64, w64, b64)
        h64, r64 = modulate_formula(x64, a64, shift64, scale64, w64, b64, res64, gate64)
        leaves64 = ([] if x is dead else [x64]) + [p for p in (a64, w64, b64) if p is not None] \
            + [res64, shift64, scale64, gate64]
        want = torch.autograd.grad((y64, h64, r64), leaves64, (dy.double(),) * 3)
        # fp32 kernels against float64: elementwise values to ~1e-6; gradients sum over <= 10 rows
        torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h.double(), h64, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.double(), r64, atol=1e-5, rtol=1e-5)
        for g, g64 in zip(grads, want):
            torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4)
    assert (len(Fn._VALIDATED.slots()), len(Fn._VALIDATED_MOD.slots())) == remembered
    Fn._VALIDATED.clear()   # (entries made under this test's guards)
    Fn._VALIDATED_MOD.clear()
