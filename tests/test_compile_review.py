"""torch.compile and torch.export review: inputs where a compiled or exported call parted from eager.

Each test here failed on the code before its fix (docs/bad_inputs.md names it). The compiled routes
are forced on CPU the way a CUDA tensor takes them (test_dynamic_shapes._force: on CPU the custom ops
compute with reference.py), and compiled with aot_eager: AOTAutograd traces the forward and the
backward as inductor is given them, without inductor's CPU compile time.
"""
from __future__ import annotations

import pytest
import torch

from dyt_kernels import DyT, ModulatedDyT, dyt, dyt_modulate, use_backend
from float64_checks import modulate_formula
from test_dynamic_shapes import _force

ROUTES = ["torch", "fused", "opaque"]
OPS = torch.ops.dyt_kernels


def _leaves(*ts):
    return [None if t is None else t.detach().requires_grad_() for t in ts]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", ["per-token", "per-token, residual and gate", "per-token, empty"])
def test_compiled_per_token_shift_gradient(route, case, monkeypatch):
    """A per-token shift (B, L, D) has dh itself as its gradient, which the backward custom op leaves
    out (an output may not alias an input). use_backend("triton") under compile (the opaque route)
    returned the op's empty placeholder as shift's gradient: backward raised "returned an invalid
    gradient at index 2 - got [0] but expected shape compatible with [B, L, D]". The fused route
    took the placeholder for dh only beside a non-empty shift, so a per-token shift of 0 elements
    (D = 0) raised the same. Both now give float64's gradients."""
    backend = _force(route, monkeypatch)
    torch._dynamo.reset()
    B, L, D = (2, 5, 0) if case.endswith("empty") else (2, 5, 8)
    with_residual = "residual" in case
    x, shift, scale, res, gate = (torch.randn(B, L, D) for _ in range(5))
    ins = _leaves(x, torch.tensor([0.6]), shift, torch.randn(B, D), torch.randn(D), torch.randn(D),
                  res if with_residual else None, gate if with_residual else None)

    def f(x, alpha, shift, scale, weight, bias, residual, gate):
        out = dyt_modulate(x, alpha, shift, scale, weight, bias, residual=residual, gate=gate)
        return out if residual is None else out[0] * out[1]

    with use_backend(backend):
        out = torch.compile(f, backend="aot_eager", fullgraph=True)(*ins)
    dout = torch.randn_like(out)
    live = [t for t in ins if t is not None]
    grads = torch.autograd.grad(out, live, dout)
    ins64 = _leaves(*(None if t is None else t.double() for t in ins))
    h64, r64 = modulate_formula(*ins64)
    want = h64 if not with_residual else h64 * r64
    live64 = [t for t in ins64 if t is not None]
    want_grads = torch.autograd.grad(want, live64, dout.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    for g, g64, t in zip(grads, want_grads, live):
        assert g.shape == t.shape
        torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-5)   # fp32 sums over <= 10 rows


@pytest.mark.parametrize("route", ROUTES)
def test_compiled_python_alpha_past_float32_range(route, monkeypatch):
    """A Python alpha past float32's range with a float32 x (`dyt(x, 1e39)`): eager rounds it to
    +-inf (or to +-max just above max) as `1e39 * x` does (row 91), but traced, the float32 tensor
    eager made of it was a constant that refused it: torch.compile raised "value cannot be converted
    to type float without overflow". Now the compiled call gives eager's result to the bit, NaN where
    eager's is (x = 0)."""
    backend = _force(route, monkeypatch)
    torch._dynamo.reset()
    fp32_max = torch.finfo(torch.float32).max
    x = torch.tensor([[0.0, 1.5, -2.0, 1e-30, -1e-38, 3.0]])
    shift, scale = torch.randn(1, 6), torch.randn(1, 6)
    f = torch.compile(lambda x, a: (dyt(x, a), dyt_modulate(x[None], a, shift, scale)), backend="aot_eager",
                      fullgraph=True)
    for alpha in [1e39, -1e300, fp32_max * (1 + 1e-9), -(2.0 ** 128 - 2.0 ** 104)]:
        with use_backend(backend):
            got = f(x, alpha)
        with use_backend("torch"):
            want = dyt(x, alpha), dyt_modulate(x[None], alpha, shift, scale)
        for g, w in zip(got, want):
            assert torch.equal(g.isnan(), w.isnan()), (alpha, g, w)
            assert torch.equal(g.nan_to_num(), w.nan_to_num()), (alpha, g, w)


@pytest.mark.parametrize("route", ROUTES)
def test_compiled_numpy_scalar_alpha(route, monkeypatch):
    """A numpy scalar alpha (`dyt(x, np.float32(0.6))`, an alpha read from a numpy config), which eager
    takes as the number: dynamo hands it in as a 0-d ndarray, and torch.compile raised "alpha must be
    a real number or a torch.Tensor, got ndarray". Now eager's result to the bit, float64 x included
    (np.float64(0.1) kept in float64), a float32 x with an np.float64 past float32's range rounding
    to inf; gradients of x as eager's; one graph for new values of the same numpy dtype."""
    np = pytest.importorskip("numpy")
    backend = _force(route, monkeypatch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    f = torch.compile(lambda x, a: dyt(x, a) * 2, backend="aot_eager", fullgraph=True)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 8, dtype=dtype, requires_grad=True)
        for alpha in (np.float32(0.6), np.float32(-1.3), np.float64(0.1), np.float64(1e39), np.int64(3)):
            with use_backend(backend):
                got = f(x, alpha)
            with use_backend("torch"):
                want = dyt(x, alpha) * 2
            assert torch.equal(got, want), (dtype, alpha)
            dx, dx_want = (torch.autograd.grad(y.sum(), x)[0] for y in (got, want))
            # autograd's tanh backward (compiled torch route) against the explicit formula (eager)
            torch.testing.assert_close(dx, dx_want, equal_nan=True)
    # a graph per (x dtype, numpy dtype), and one more where a value first changes: not one per value
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 8


class _PerToken(torch.nn.Module):
    def forward(self, x, alpha, shift, scale, residual, gate):
        h, r = dyt_modulate(x, alpha, shift, scale, residual=residual, gate=gate)
        return h * r


def test_export_per_token_modulation_with_a_sequence_dim():
    """torch.export (non-strict, torch's default) of dyt_modulate with per-token shift, scale and gate
    ((B, L, D)) and Dims on B and L raised "Constraints violated (L)! Not all values of L satisfy the
    generated guard L != 8" (D = 8): a model with per-token modulation could not be exported with a
    dynamic sequence length. Strict export and torch.compile trace the tuple comparison by length
    and add no guard. Wanted: the program runs at other sizes, L = D included, to float64."""
    B, L = torch.export.Dim("B"), torch.export.Dim("L")
    BL = {0: B, 1: L}

    def args(b, l, D=8):   # noqa: E741
        return (torch.randn(b, l, D), torch.tensor([0.6]), torch.randn(b, l, D), torch.randn(b, l, D),
                torch.randn(b, l, D), torch.randn(b, l, D))

    ep = torch.export.export(_PerToken(), args(2, 3), dynamic_shapes=(BL, None, BL, BL, BL, BL), strict=False)
    for b, l in [(3, 5), (2, 8), (4, 2)]:   # noqa: E741
        a = args(b, l)
        h64, r64 = modulate_formula(*(t.double() for t in a[:4]), None, None, *(t.double() for t in a[4:]))
        torch.testing.assert_close(ep.module()(*a).double(), h64 * r64, atol=1e-5, rtol=1e-5)


def _odd(shape, kind, dtype, device, requires_grad=True):
    """A tensor of `shape` in an odd layout: contiguous, transposed (every dim reversed in memory),
    expanded from size 1 in dim 0, or a step-2 slice of the last dim."""
    if kind == "transposed" and len(shape) > 1:
        t = torch.randn(shape[::-1], device=device).permute(*reversed(range(len(shape))))
    elif kind == "expanded" and len(shape) > 1:
        t = torch.randn(1, *shape[1:], device=device).expand(shape)
    elif kind == "sliced":
        t = torch.randn(*shape[:-1], 2 * shape[-1], device=device)[..., ::2]
    else:
        t = torch.randn(shape, device=device)
    return t.to(dtype).detach().requires_grad_(requires_grad)


@pytest.mark.parametrize("index", range(8))
def test_modulate_ops_pass_opcheck_on_odd_inputs(index, device):
    """torch.library.opcheck of the four dyt_modulate custom ops (the triton_ops the compiled routes
    call, never opchecked before, and their `*_dynamic` twins) on seeded odd inputs: transposed,
    expanded, sliced and empty tensors, (B, D) / (B, 1, D) / (B, L, D) modulations, a residual in
    another dtype, a per-channel alpha, inputs that require grad (opcheck then runs the registered
    backward under AOTAutograd, which raised for a per-token shift before row 108's fix; the
    `*_dynamic` ops, which have no autograd of their own, get the same values detached)."""
    import random
    rng = random.Random(f"compile-review/{index}")
    B, L, D = rng.choice([(2, 3, 8), (1, 1, 5), (3, 4, 16), (2, 5, 0), (0, 3, 4)])
    layouts = ["contiguous", "transposed", "expanded", "sliced"]
    dtype = rng.choice([torch.float32, torch.bfloat16])
    x = _odd((B, L, D), rng.choice(layouts), dtype, device)
    mods = []
    for _ in range(3):
        shape = rng.choice([(B, D), (B, 1, D), (B, L, D)])
        mods.append(_odd(shape, rng.choice(layouts), dtype, device))
    shift, scale, gate = mods
    res = _odd((B, L, D), rng.choice(layouts), rng.choice([dtype, torch.float32]), device) if index % 4 else None
    gate = gate if res is not None and index % 2 else None
    alpha = _odd((1,) if rng.random() < 0.5 else (D,), "contiguous", torch.float32, device).abs() + 0.3
    alpha = alpha.detach().requires_grad_()
    w, b = (_odd((D,), "contiguous", torch.float32, device) for _ in range(2)) if index % 3 else (None, None)
    args = (x, alpha, shift, scale, w, b, res, gate)
    torch.library.opcheck(OPS.dyt_modulate_fwd, args)
    # (the *_dynamic ops run inside dyt_modulate_fwd's body, whose autograd covers them: none of their own)
    detached = tuple(None if t is None else t.detach() for t in args)
    torch.library.opcheck(OPS.dyt_modulate_fwd_dynamic, detached)
    with torch.no_grad():
        h, r = OPS.dyt_modulate_fwd(*args)
    has_res = res is not None
    dh, dr = torch.randn_like(h), (torch.randn_like(r) if has_res else None)
    xd, alphad, shiftd, scaled, wd, bd, _, gated = detached
    bwd_args = (dh, dr, xd, r if has_res else xd, alphad, shiftd, scaled, wd, bd, gated, has_res)
    for op in (OPS.dyt_modulate_bwd, OPS.dyt_modulate_bwd_dynamic):
        torch.library.opcheck(op, bwd_args)


_DYT_ODD = {   # id: (shape, layout, channels_last, dtype, per-channel alpha, affine)
    "transposed": ((3, 4, 8), "transposed", True, torch.float32, True, True),
    "expanded": ((3, 4, 8), "expanded", True, torch.float16, False, True),
    "sliced-2d": ((2, 5), "sliced", True, torch.float32, False, False),
    "empty": ((0, 3, 8), "contiguous", True, torch.float32, True, True),
    "nhwc": ((2, 6, 3, 3), "nhwc", False, torch.float32, True, True),
    "nchw-sliced": ((2, 6, 3, 4), "sliced", False, torch.float16, False, True),
    "2d-transposed": ((3, 6), "transposed", False, torch.float32, True, False),
    "nchw-empty": ((2, 6, 0), "contiguous", False, torch.float32, False, True),
}


@pytest.mark.parametrize("case", list(_DYT_ODD))
def test_dyt_ops_pass_opcheck_on_odd_inputs(case, device):
    """The same for dyt's custom ops: dyt_fwd (with inputs that require grad: its registered backward
    under AOTAutograd) and dyt_bwd on transposed, expanded, sliced and empty x, channels-last or
    channels-first (NCHW, NHWC storage, a transposed 2-D x), a one-element or per-channel alpha, with
    and without weight and bias; test_dyt's opcheck tries contiguous inputs only."""
    shape, layout, channels_last, dtype, per_channel, affine = _DYT_ODD[case]
    C = shape[-1] if channels_last else shape[1]
    if layout == "nhwc":
        x = torch.randn(shape, device=device).to(dtype=dtype, memory_format=torch.channels_last).requires_grad_()
    else:
        x = _odd(shape, layout, dtype, device)
    alpha = (torch.rand(C if per_channel else 1, device=device) + 0.3).requires_grad_()
    w, b = (_odd((C,), "contiguous", torch.float32, device) for _ in range(2)) if affine else (None, None)
    torch.library.opcheck(OPS.dyt_fwd, (x, alpha, w, b, channels_last))
    detached = [None if t is None else t.detach() for t in (x, alpha, w, b)]
    torch.library.opcheck(OPS.dyt_bwd, (torch.randn(shape, device=device).to(dtype), *detached, channels_last))


class _Mixed(torch.nn.Module):
    """Every way the norms are called: a DyT over two normalized dims, a channels-first DyT with a
    per-channel alpha and no bias on NCHW activations, dyt with a Python-number alpha, and a
    ModulatedDyT with a per-sample shift, a per-token scale and a gated residual."""

    def __init__(self, C=8):
        super().__init__()
        self.two = DyT((2, C // 2))
        self.cf = DyT(C, channels_last=False, alpha_per_channel=True, bias=False)
        self.mod = ModulatedDyT(C, elementwise_affine=True)

    def forward(self, img, tokens, shift, scale, gate, alpha: float):
        a = self.cf(img).flatten(2).transpose(1, 2)                       # (B, HW, C)
        t = self.two(tokens.unflatten(-1, (2, -1))).flatten(2)           # (B, L, C)
        h, r = self.mod(dyt(t, alpha), shift, scale, residual=t, gate=gate)
        return a.sum(1, keepdim=True) + h * r


@pytest.mark.parametrize("route", ROUTES)
def test_new_sizes_and_alphas_recompile_at_most_once(route, monkeypatch):
    """dynamic=None, as a plain LayerNorm model gets: the first call compiles a static graph, the
    second (other batch, sequence length, image size, alpha value) one dynamic graph; after that, no
    size or alpha value recompiles (error_on_recompile), so neither the project's checks nor its
    custom ops guard on a value that changes per call. Outputs and gradients as the eager torch
    backend's throughout."""
    backend = _force(route, monkeypatch)
    torch._dynamo.reset()
    model = _Mixed()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    def call(B, L, H, alpha):
        C = 8
        args = (torch.randn(B, C, H, H + 1), torch.randn(B, L, C), torch.randn(B, C), torch.randn(B, L, C),
                torch.randn(B, 1, C))
        args = [t.requires_grad_() for t in args]
        with use_backend(backend):
            out = compiled(*args, alpha)
        with use_backend("torch"):
            want = model(*args, alpha)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        leaves = [*args, *model.parameters()]
        for g, gw in zip(torch.autograd.grad(out.square().sum(), leaves),
                         torch.autograd.grad(want.square().sum(), leaves)):
            torch.testing.assert_close(g, gw, atol=1e-4, rtol=1e-4)

    call(2, 3, 2, 0.5)
    call(3, 5, 3, 0.7)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for B, L, H, alpha in [(4, 7, 2, 0.9), (2, 9, 5, -1.25), (5, 2, 4, 0.5), (3, 11, 3, 2.0)]:
            call(B, L, H, alpha)


LAYOUT_CASES = 8   # per op and route; ~0.4 s a case on the CPU (aot_eager compiles)


def _negated(case) -> bool:
    views = [getattr(case, f, None) for f in ("x_view", "dy_view", "dh_view", "residual_view", "dr_view")]
    views += [v for _, _, v in getattr(case, "mods", ())]
    return any(v is not None and v.negated for v in views)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("op", ["dyt", "modulate"])
def test_layout_cases_through_compile(op, route, monkeypatch, device):
    """test_layouts.py's seeded random cases (ranks, sizes with 0 and 1, transposed, sliced, offset
    and expanded views, channels-first, fp32/bf16/fp16 with fp32 or same-dtype parameters, Python,
    0-d, (1, 1) and per-channel alphas, optional weight and bias, (B, D) / (B, 1, D) / (B, L, D)
    modulations with or without residual and gate) through torch.compile(fullgraph=True), each case
    under dynamic=None, True or False in turn, the three compiled functions reused across the cases
    (a guard that missed a layout, dtype or argument change would reuse a wrong graph); every output
    and gradient three-way against float64 (float64_checks). Cases with a lazily negated view are left
    out: torch.compile reads such inputs unnegated for its own ops too (row 76). A gradient may share
    storage with dy (the torch route's plain autograd passes dy on as a 1-D x's dbias), so only the
    outputs' freshness is checked. With row 108's defect, the opaque route's modulate cases
    failed here."""
    import float64_checks
    backend = _force(route, monkeypatch)
    torch._dynamo.reset()
    fresh = float64_checks._check_fresh
    monkeypatch.setattr(float64_checks, "_check_fresh", lambda outs, grads, inputs: fresh(outs, {}, inputs))
    fn = dyt if op == "dyt" else dyt_modulate
    compiled = [torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=d) for d in (None, True, False)]
    with torch._dynamo.config.patch(recompile_limit=64):
        checked = _run_layout_cases(op, route, backend, compiled, monkeypatch, device)
    assert checked == LAYOUT_CASES


def _run_layout_cases(op, route, backend, compiled, monkeypatch, device) -> int:
    import float64_checks
    import test_layouts as tl
    checked = 0
    for i in range(LAYOUT_CASES * 2):
        draw = tl.draw_dyt_case if op == "dyt" else tl.draw_modulate_case
        case = draw(1000 + i, "triton")
        if _negated(case):
            continue
        monkeypatch.setattr(float64_checks, "dyt" if op == "dyt" else "dyt_modulate", compiled[checked % 3])
        dynamic = (None, True, False)[checked % 3]
        with float64_checks.repro(f"[route {route}, dynamic={dynamic}] " + tl.describe(case)):
            if op == "dyt":
                inputs, dy = tl.build_dyt(case, device)
                float64_checks.check_dyt(inputs, dy, backend=backend, channels_last=case.channels_last)
            else:
                inputs, dh, dr = tl.build_modulate(case, device)
                float64_checks.check_modulate(inputs, dh, dr, backend=backend)
        checked += 1
        if checked == LAYOUT_CASES:
            break
    return checked
