"""Dynamic shapes: torch.compile over changing sizes and torch.export with Dims, on every route.

Two defects lived here. functional.py hashed the argument shapes into its signature cache while
dynamo traced it, which pinned every dynamic dim to the size being traced: a compiled model fed
changing sequence lengths recompiled for each one until dynamo's recompile limit (fullgraph=True then
raised), and torch.export with a Dim refused the model. And the kernels' launch plans, traced inside
the custom ops with symbolic sizes (CUDA only), failed to hash ("unhashable type: non-nested SymInt"):
the default compiled route on a GPU crashed at the second sequence length. Symbolic sizes now go to
the `*_dynamic` ops (ops/library.py), which plan and launch when the graph runs.

On CPU the compiled routes are forced the way a CUDA tensor takes them (their custom ops compute
with reference.py there), and the CUDA branch of the custom ops is traced on fake CUDA tensors; the
`*_dynamic` ops' real implementations run the kernels (the interpreter on CPU) and are held to their
fake implementations (torch.library.opcheck: shapes, strides, aliasing) and to float64.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dyt_kernels.functional as functional
from dyt_kernels import DyT, ModulatedDyT, dyt, dyt_modulate, get_backend, use_backend
from float64_checks import dyt_formula, modulate_formula

OPS = torch.ops.dyt_kernels
ROUTES = ["torch", "fused", "opaque"]
# fp32 pointwise math against float64: a few ulps of O(1) values (and the models' Linear sums over 64 terms)
TOL = dict(atol=1e-5, rtol=1e-5)


def _force(route, monkeypatch):
    """The backend under which `route` is taken under compile, with CPU tensors standing in for CUDA:
    use_triton answers as for a CUDA tensor, the torch backend included (an eager call under
    use_backend("torch"), the tests' reference, stays off the kernels: on a GPU machine, where no
    interpreter runs them, the kernels would be handed these CPU tensors)."""
    if route != "torch":
        monkeypatch.setattr(functional, "use_triton",
                            lambda x, name=None: (get_backend() if name is None else name) != "torch")
    return {"torch": "torch", "fused": "auto", "opaque": "triton"}[route]


class _Counting:
    """A torch.compile backend that counts the graphs it is given and runs them as they are."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("op", ["dyt", "dyt_channels_first", "dyt_modulate"])
def test_compile_follows_changing_sizes_without_recompiling(route, op, monkeypatch):
    """Ten sequence lengths through torch.compile(fullgraph=True): one static graph, then one dynamic
    graph for all the rest (dynamo's automatic dynamic); each result and gradient against float64."""
    backend = _force(route, monkeypatch)
    torch._dynamo.reset()
    D = 16
    if op == "dyt":
        def f(x, res, a, w, b):
            return dyt(x, a, w, b) * 2

        def oracle(x, res, a, w, b):
            return dyt_formula(x, a, w, b) * 2
    elif op == "dyt_channels_first":
        def f(x, res, a, w, b):
            return dyt(x.transpose(1, 2), a, w, b, channels_last=False) * 2

        def oracle(x, res, a, w, b):
            return dyt_formula(x.transpose(1, 2), a, w, b, channels_last=False) * 2
    else:
        def f(x, res, a, w, b, shift, scale, gate):
            h, r = dyt_modulate(x, a, shift, scale, w, b, residual=res, gate=gate)
            return h * r

        def oracle(x, res, a, w, b, shift, scale, gate):
            h, r = modulate_formula(x, a, shift, scale, w, b, res, gate)
            return h * r
    params = [torch.tensor([0.6]), torch.randn(D), torch.randn(D)]
    if op == "dyt_modulate":
        params += [torch.randn(3, D) for _ in range(3)]
    params = [p.requires_grad_() for p in params]
    counting = _Counting()
    compiled = torch.compile(f, backend=counting, fullgraph=True)
    with use_backend(backend):
        for L in range(3, 13):
            x, res = torch.randn(3, L, D, requires_grad=True), torch.randn(3, L, D, requires_grad=True)
            out = compiled(x, res, *params)
            dout = torch.randn_like(out)
            ins = [x, res, *params]
            grads = torch.autograd.grad(out, ins, dout, allow_unused=True)
            ins64 = [t.detach().double().requires_grad_() for t in ins]
            want = oracle(*ins64)
            want_grads = torch.autograd.grad(want, ins64, dout.double(), allow_unused=True)
            torch.testing.assert_close(out.double(), want, **TOL)
            for g, g64 in zip(grads, want_grads):
                assert (g is None) == (g64 is None)
                if g is not None:   # fp32 sums over <= 36 rows
                    torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4)
    assert counting.graphs <= 2, f"{counting.graphs} graphs for 10 sequence lengths"


class _Block(torch.nn.Module):
    def __init__(self, D=32):
        super().__init__()
        self.proj = torch.nn.Linear(D, 3 * D)
        self.norm = DyT(D)
        self.mod = ModulatedDyT(D, elementwise_affine=True)

    def forward(self, x, c, res):
        shift, scale, gate = self.proj(c).chunk(3, dim=-1)
        h, r = self.mod(self.norm(x), shift, scale, residual=res, gate=gate)
        return h + r


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_with_dims(route, strict, monkeypatch):
    """torch.export with a batch and a sequence Dim; the program runs at other sizes, survives
    torch.export.save / load, and matches the eager module."""
    backend = _force(route, monkeypatch)
    torch.manual_seed(0)
    block = _Block()
    x, c, res = torch.randn(2, 5, 32), torch.randn(2, 32), torch.randn(2, 5, 32)
    B, L = torch.export.Dim("B"), torch.export.Dim("L")
    with use_backend(backend):
        ep = torch.export.export(block, (x, c, res), dynamic_shapes=({0: B, 1: L}, {0: B}, {0: B, 1: L}),
                                 strict=strict)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert ("dyt_kernels.dyt_fwd.default" in ops) == (route == "opaque"), ops
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for shape in [(3, 7), (1, 11), (4, 2)]:
        args = torch.randn(*shape, 32), torch.randn(shape[0], 32), torch.randn(*shape, 32)
        with use_backend("torch"):
            want = block(*args)
        torch.testing.assert_close(ep.module()(*args), want, **TOL)
        torch.testing.assert_close(loaded.module()(*args), want, **TOL)


def _fake_cuda_export(f, shapes, dims):
    """torch.export of f on fake CUDA tensors of `shapes` with `dims`: the custom ops' CUDA branch
    traced with symbolic sizes, without a GPU (nothing launches)."""
    class Call(torch.nn.Module):
        def forward(self, *args):
            return f(*args)

    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        args = tuple(torch.randn(*s) for s in shapes)
        return torch.export.export(Call(), args, dynamic_shapes=(dims,), strict=False)


@pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch")
def test_kernel_ops_trace_with_symbolic_sizes():
    """Each kernel op's CUDA branch traced with a symbolic batch and sequence length: no hashing of
    symbols, no dim pinned (export refuses a specialized Dim). Before the *_dynamic ops every one of
    these raised "unhashable type: non-nested SymInt", which on a GPU was torch.compile's second
    sequence length."""
    B, L = torch.export.Dim("B"), torch.export.Dim("L")
    BL = {0: B, 1: L}
    cases = {
        "dyt_fwd": (lambda x, a, w, b: OPS.dyt_fwd(x, a, w, b, True),
                    [(4, 7, 64), (1,), (64,), (64,)], (BL, None, None, None)),
        "dyt_fwd channels first": (lambda x, a, w, b: OPS.dyt_fwd(x, a, w, b, False),
                                   [(4, 64, 7), (1,), (64,), (64,)], ({0: B, 2: L}, None, None, None)),
        "dyt_bwd": (lambda dy, x, a, w, b: OPS.dyt_bwd(dy, x, a, w, b, True),
                    [(4, 7, 64), (4, 7, 64), (64,), (64,), (64,)], (BL, BL, None, None, None)),
        "dyt_modulate_fwd": (lambda x, a, sh, sc, w, b, r, g: OPS.dyt_modulate_fwd(x, a, sh, sc, w, b, r, g),
                             [(4, 7, 64), (1,), (4, 64), (4, 64), (64,), (64,), (4, 7, 64), (4, 64)],
                             (BL, None, {0: B}, {0: B}, None, None, BL, {0: B})),
        "dyt_modulate_bwd": (lambda dh, dr, x, r, a, sh, sc, w, b, g: OPS.dyt_modulate_bwd(
                                 dh, dr, x, r, a, sh, sc, w, b, g, True),
                             [(4, 7, 64)] * 4 + [(1,), (4, 7, 64), (4, 64), (64,), (64,), (4, 64)],
                             (BL, BL, BL, BL, None, BL, {0: B}, None, None, {0: B})),
    }
    for name, (f, shapes, dims) in cases.items():
        ep = _fake_cuda_export(f, shapes, dims)
        out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
        first = out[0].meta["val"]
        assert any(isinstance(s, torch.SymInt) for s in first.shape), (name, first.shape)


@pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch")
def test_compile_traces_kernels_for_static_sizes_and_dynamic_ops_for_symbolic_ones():
    """The graphs torch.compile's AOTAutograd makes of each op's CUDA branch (tests/fake_cuda_trace.py,
    in its own process: Triton's driver is stubbed there): static sizes give inductor the Triton
    kernels themselves, one launch forward and two backward; a symbolic batch and sequence length
    give the `*_dynamic` op and no kernel."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_cuda_trace.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    traced = json.loads(run.stdout.strip().splitlines()[-1])
    for name, got in traced["static"].items():
        launches = 2 if name.endswith("bwd") else 1
        assert got == {"kernels": launches, "dynamic_ops": []}, (name, got)
    for name, got in traced["dynamic"].items():
        op = name.replace("_channels_first", "")
        assert got == {"kernels": 0, "dynamic_ops": [f"dyt_kernels.{op}_dynamic.default"]}, (name, got)
    assert len(traced["static"]) == len(traced["dynamic"]) == 5


def _inputs_dyt(layout):
    C = 24
    if layout == "rows":
        x, cl = torch.randn(3, 5, C), True
    elif layout == "strided rows":
        x, cl = torch.randn(3, 5, 2 * C)[..., :C], True
    elif layout == "nchw":
        x, cl = torch.randn(2, C, 3, 3), False
    else:   # NHWC storage
        x, cl = torch.randn(2, C, 3, 3).to(memory_format=torch.channels_last), False
    return x, torch.rand(1) + 0.5, torch.randn(C), torch.randn(C), cl


@pytest.mark.parametrize("layout", ["rows", "strided rows", "nchw", "nhwc"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_dyt_dynamic_ops_match_their_fakes_and_float64(layout, affine, device):
    x, a, w, b, cl = (t.to(device) if isinstance(t, torch.Tensor) else t for t in _inputs_dyt(layout))
    if not affine:
        w = b = None
    torch.library.opcheck(OPS.dyt_fwd_dynamic, (x, a, w, b, cl))
    y = OPS.dyt_fwd_dynamic(x, a, w, b, cl)
    want = dyt_formula(x.double(), a.double(), None if w is None else w.double(), None if b is None else b.double(), cl)
    torch.testing.assert_close(y.double(), want, **TOL)
    dy = torch.randn_like(y)
    torch.library.opcheck(OPS.dyt_bwd_dynamic, (dy, x, a, w, b, cl))
    dx, da, dw, db = OPS.dyt_bwd_dynamic(dy, x, a, w, b, cl)
    ins = [t.double().requires_grad_() for t in (x, a) + (() if w is None else (w, b))]
    out = dyt_formula(*ins[:2], *(ins[2:] or (None, None)), cl)
    want_grads = torch.autograd.grad(out, ins, dy.double())
    got = (dx, da) + (() if w is None else (dw, db))
    for g, g64 in zip(got, want_grads):
        torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4)   # fp32 sums over <= 45 rows
    if w is None:
        assert dw.numel() == 0 and db.numel() == 0


@pytest.mark.parametrize("case", ["plain", "residual", "residual+gate", "per-token", "chunked"])
def test_modulate_dynamic_ops_match_their_fakes_and_float64(case, device):
    B, L, D = 2, 5, 24
    t = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    x, a, w, b = t(B, L, D), torch.rand(1, device=device) + 0.5, t(D), t(D)
    if case == "chunked":   # adaLN's chunks of one projection: strided views
        shift, scale, gate = t(B, 3 * D).chunk(3, dim=-1)
    elif case == "per-token":
        shift, scale, gate = t(B, L, D), t(B, L, D), t(B, L, D)
    else:
        shift, scale, gate = t(B, D), t(B, D), t(B, D)
    res = None if case == "plain" else t(B, L, D)
    gate = gate if case in ("residual+gate", "per-token", "chunked") else None
    args = (x, a, shift, scale, w, b, res, gate)
    torch.library.opcheck(OPS.dyt_modulate_fwd_dynamic, args)
    h, r = OPS.dyt_modulate_fwd_dynamic(*args)
    h64, r64 = modulate_formula(*(None if v is None else v.double() for v in args))
    torch.testing.assert_close(h.double(), h64, **TOL)
    if res is not None:
        torch.testing.assert_close(r.double(), r64, **TOL)
    else:
        assert r.numel() == 0
    dh, dr = torch.randn_like(h), (None if res is None else torch.randn_like(h))
    norm_in = x if res is None else r
    bwd_args = (dh, dr, x, norm_in, a, shift, scale, w, b, gate, res is not None)
    torch.library.opcheck(OPS.dyt_modulate_bwd_dynamic, bwd_args)
    dx, dres, dgate, dshift, dscale, dw, db, da = OPS.dyt_modulate_bwd_dynamic(*bwd_args)
    ins = {k: v.double().requires_grad_() for k, v in dict(x=x, alpha=a, shift=shift, scale=scale, weight=w,
                                                           bias=b, residual=res, gate=gate).items() if v is not None}
    h64, r64 = modulate_formula(ins["x"], ins["alpha"], ins["shift"], ins["scale"], ins["weight"], ins["bias"],
                                ins.get("residual"), ins.get("gate"))
    loss = (h64 * dh.double()).sum() + (0 if dr is None else (r64 * dr.double()).sum())
    want = dict(zip(ins, torch.autograd.grad(loss, list(ins.values()))))
    got = dict(x=dx, alpha=da, scale=dscale, weight=dw, bias=db)
    if dshift.numel():
        got["shift"] = dshift
    if gate is not None:
        got["gate"], got["residual"] = dgate, dres
    elif res is not None:
        assert dres.numel() == 0   # it is dx: the op returns it once (outputs may not alias)
    for k, g in got.items():
        torch.testing.assert_close(g.double(), want[k], atol=1e-4, rtol=1e-4, msg=k)   # sums over <= 10 rows


class _Norms(_Block):
    """_Block without its Linear (a compiled matmul need not be bitwise the eager one): modulations in."""

    def forward(self, x, mods, res):
        shift, scale, gate = mods.chunk(3, dim=-1)
        h, r = self.mod(self.norm(x), shift, scale, residual=res, gate=gate)
        return h + r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel routes launch kernels only on CUDA")
@pytest.mark.parametrize("backend", ["auto", "triton"], ids=["fused", "opaque"])
def test_compiled_routes_on_cuda_over_changing_sizes(backend):
    """Inductor, real kernels: a modulated block compiled once, fed four sequence lengths; a few
    graphs, not one per length; values and gradients as the eager kernels give them (the opaque
    route launches the very same kernels: bitwise; the fused one computes the forward's tanh in
    inductor: a bf16 ulp)."""
    # Four lengths keep inductor's compiles (the GPU script's tests stage has ~2 minutes) to 2-3 graphs
    # per route; a graph per length would be 4.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    block = _Norms(64).cuda()
    compiled = torch.compile(block, fullgraph=True)
    with use_backend(backend):
        for L in (5, 9, 17, 33):
            args = [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for s in ((3, L, 64), (3, 3 * 64), (3, L, 64))]
            out = compiled(*args)
            g = torch.autograd.grad(out.float().square().sum(), [*args, block.norm.alpha, block.mod.alpha])
            ref = block(*args)
            g_ref = torch.autograd.grad(ref.float().square().sum(), [*args, block.norm.alpha, block.mod.alpha])
            if backend == "triton":
                assert torch.equal(out, ref)
                for a, b in zip(g, g_ref):
                    assert torch.equal(a, b)
            else:
                scale = ref.float().abs().max().item()
                torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2 ** -7 * scale)
                for a, b in zip(g, g_ref):
                    torch.testing.assert_close(a.float(), b.float(), rtol=0,
                                               atol=2 ** -5 * b.float().abs().max().item())
    # One static graph, one dynamic one, and room for one split of inductor's own (on CPU it guards
    # 192 * L <= 4096 for its reductions); a graph per length, as before the *_dynamic ops, fails.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
