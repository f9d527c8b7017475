"""dyt_modulate / ModulatedDyT / layernorm_modulate: Triton kernels against a float64 oracle.

The oracle is reference.dyt_modulate run in float64 with autograd for its gradients, so the
kernels' hand-written backward is checked against differentiation of the forward formula.
"""
import math

import pytest
import torch

import dyt_kernels
from dyt_kernels import ModulatedDyT, dyt_modulate, layernorm_modulate, reference, use_backend
from helpers import (FP32_EPS, TANH_F32_ABS_ERR, assert_close_3way, eps, far_apart_rows, max_abs, poisoned_empty,
                     rms)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _mod(kind, B, L, D, dtype, device, scale=1.0):
    shape = {"sample": (B, D), "sample3": (B, 1, D), "token": (B, L, D)}[kind]
    return (scale * torch.randn(shape, device=device, dtype=dtype)).requires_grad_()


def _inputs(B, L, D, dtype, device, kind="sample", residual=True, gate=True, affine=False, per_channel=False):
    x = torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=True)
    pd = {"device": device, "dtype": torch.float64 if dtype == torch.float64 else torch.float32}
    args = dict(
        x=x,
        alpha=(0.3 + torch.rand(D if per_channel else 1, **pd)).requires_grad_(),
        shift=_mod(kind, B, L, D, dtype, device),
        scale=_mod(kind, B, L, D, dtype, device, scale=0.5),
        weight=(1 + 0.5 * torch.randn(D, **pd)).requires_grad_() if affine else None,
        bias=(0.5 * torch.randn(D, **pd)).requires_grad_() if affine else None,
        residual=torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=True) if residual else None,
        gate=_mod(kind, B, L, D, dtype, device) if residual and gate else None,
    )
    return args


def _naive(args, dtype):
    """Plain PyTorch in the dtype under test (parameters cast to it), with autograd."""
    B, L, D = args["x"].shape
    m3 = lambda t: t.reshape(B, 1, D) if t.dim() == 2 else t  # noqa: E731
    x = args["x"]
    r = x
    if args["residual"] is not None:
        r = args["residual"] + (x if args["gate"] is None else m3(args["gate"]) * x)
    n = torch.tanh(args["alpha"].to(dtype) * r)
    if args["weight"] is not None:
        n = n * args["weight"].to(dtype) + args["bias"].to(dtype)
    h = n * (1 + m3(args["scale"])) + m3(args["shift"])
    return (h, r) if args["residual"] is not None else (h,)


def _ref64(args):
    a64 = {k: None if v is None else v.detach().double().requires_grad_() for k, v in args.items()}
    out = reference.dyt_modulate(**a64)
    return (out if isinstance(out, tuple) else (out,)), a64


def _run(args, backend):
    with dyt_kernels.use_backend(backend):
        out = dyt_modulate(**args)
    return out if isinstance(out, tuple) else (out,)


def _grads(outs, inputs, douts):
    keys = [k for k, v in inputs.items() if v is not None]
    gs = torch.autograd.grad(outs, [inputs[k] for k in keys], douts)
    return dict(zip(keys, gs))


def _check(args, dtype, device):
    B, L, D = args["x"].shape
    douts = [torch.randn(B, L, D, device=device, dtype=dtype) for _ in range(2 if args["residual"] is not None else 1)]
    with poisoned_empty():
        outs = _run(args, "triton")
        grads = _grads(outs, args, douts)
    ref_outs, a64 = _ref64(args)
    ref_grads = _grads(ref_outs, a64, [d.double() for d in douts])
    naive_outs = _naive(args, dtype)
    naive_grads = _grads(naive_outs, args, douts)

    # Elementwise results: one rounding into the output dtype plus the fp32 tanh error scaled by
    # |w|(1 + |scale|), which the naive run in fp32 does not pay (torch.tanh is ~1 ulp).
    amp = (1 + max_abs(args["scale"])) * (1 if args["weight"] is None else max_abs(args["weight"]))
    for name, o, r, nv in zip(("h", "r"), outs, ref_outs, naive_outs):
        assert_close_3way(name, o, r, nv, eps(o.dtype) * max_abs(r) + 4 * amp * TANH_F32_ABS_ERR)
    for k, g in grads.items():
        ref = ref_grads[k]
        # Reduced gradients sum fp32 terms over the reduced length n (L tokens for per-sample
        # modulation, B*L rows for weight/bias/alpha): their rounding errors add like a random walk,
        # ~sqrt(n) eps32 * rms(term); terms are bounded by the oracle's magnitude / sqrt(n) on
        # average, so 16 sqrt(n) eps32 * (|ref| + rms-scale) covers it. Elementwise gradients
        # (x, residual, per-token shift/scale/gate) are one rounding into their dtype plus fp32 noise.
        reduced = g.numel() < B * L * D
        n = (L if g.dim() >= 2 else B * L) if reduced else 1
        term_scale = max_abs(ref) if not reduced else max(max_abs(ref) / math.sqrt(n), rms(ref))
        atol = eps(g.dtype) * max_abs(ref) + 16 * math.sqrt(n) * FP32_EPS * term_scale * amp
        assert_close_3way(f"d{k}", g, ref, naive_grads[k], atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual,gate", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("kind", ["sample", "sample3", "token"])
def test_modulate_matches_reference(dtype, residual, gate, kind, device):
    args = _inputs(2, 9, 48, dtype, device, kind=kind, residual=residual, gate=gate)
    _check(args, dtype, device)


@pytest.mark.parametrize("B,L,D", [(1, 1, 1), (3, 7, 257), (2, 16, 384), (2, 5, 1152), (1, 3, 4097), (1, 2, 16384)])
def test_modulate_odd_shapes(B, L, D, device):
    _check(_inputs(B, L, D, torch.float32, device, affine=True), torch.float32, device)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_modulate_affine_and_alpha(per_channel, dtype, device):
    args = _inputs(2, 33, 96, dtype, device, kind="sample", affine=True, per_channel=per_channel)
    _check(args, dtype, device)


def test_modulate_mixed_modulation_shapes(device):
    """shift per token, scale per sample, gate (B, 1, D): each reduces to its own shape."""
    args = _inputs(2, 6, 40, torch.float32, device)
    args["shift"] = _mod("token", 2, 6, 40, torch.float32, device)
    args["gate"] = _mod("sample3", 2, 6, 40, torch.float32, device)
    _check(args, torch.float32, device)


@pytest.mark.parametrize("far", ["x", "residual and dh", "scale"])
def test_modulate_operands_whose_offsets_pass_2_31(far, device):
    """One operand's rows 2^30 + 64 elements apart (three samples of one token, eight channels): its
    offsets pass 2^31 though B * L * D is 24, so the kernels must index in 64 bits. The others are
    ordinary tensors; forward and backward against float64."""
    B, L, D = 3, 1, 8
    dt = torch.float16

    def make(name, shape):
        t = far_apart_rows(shape, dt, device) if name in far else torch.randn(shape, device=device).to(dt)
        return t.requires_grad_()
    x, res = make("x", (B, L, D)), make("residual", (B, L, D))
    scale = make("scale", (B, L, D))   # (B, 1, D): one vector per sample, its sample stride the gap
    shift, gate = (torch.randn(B, D, device=device).to(dt).requires_grad_() for _ in range(2))
    alpha = torch.tensor([0.7], device=device, requires_grad=True)
    w, b = (torch.randn(D, device=device, requires_grad=True) for _ in range(2))
    dh = far_apart_rows((B, L, D), dt, device) if "dh" in far else torch.randn(B, L, D, device=device).to(dt)
    dr = torch.randn(B, L, D, device=device).to(dt)
    inputs = (x, alpha, shift, scale, w, b, res, gate)
    with use_backend("triton"):
        h, r = dyt_modulate(x, alpha, shift, scale, w, b, residual=res, gate=gate)
        grads = torch.autograd.grad((h, r), inputs, (dh, dr))
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    h64, r64 = reference.dyt_modulate(*in64)
    g64 = torch.autograd.grad((h64, r64), in64, (dh.double(), dr.double()))
    for got, want in zip((h, r, *grads), (h64, r64, *g64)):
        # fp16 outputs, and r rounded to fp16 before the norm as the float64 oracle does too: an output
        # rounding (2^-11 relative) on values up to ~4 in size, fp32 work far below; 4e-3 is a few
        # such ulps. A wrapped offset misses by O(1).
        torch.testing.assert_close(got.double(), want, rtol=4e-3, atol=4e-3)


def test_modulate_many_rows(device):
    """More than 65,535 rows (B*L) with a small D: one flattened grid axis."""
    args = _inputs(2, 35000, 4, torch.float32, device, residual=True, gate=True)
    _check(args, torch.float32, device)


def test_modulate_deterministic(device):
    """The backward splits L across programs (fp32 partials): repeated calls are bitwise equal."""
    args = _inputs(1, 512, 64, torch.float32, device, affine=True)
    dh, dr = torch.randn(1, 512, 64, device=device), torch.randn(1, 512, 64, device=device)
    runs = []
    for _ in range(2):
        with dyt_kernels.use_backend("triton"):
            h, r = dyt_modulate(**args)
        runs.append(_grads((h, r), args, (dh, dr)))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_modulate_noncontiguous(device):
    """x as a transposed view, shift/scale/gate as chunks of one (B, 3D) tensor (row stride 3D)."""
    B, L, D = 2, 12, 32
    x = torch.randn(B, D, L, device=device).transpose(1, 2).requires_grad_()
    mods = torch.randn(B, 3 * D, device=device, requires_grad=True)
    shift, scale, gate = mods.chunk(3, dim=1)
    res = torch.randn(B, L, D, device=device)[:, :, :].requires_grad_()
    a = torch.tensor([0.7], device=device, requires_grad=True)
    outs = {}
    for backend in ("triton", "torch"):
        with dyt_kernels.use_backend(backend):
            h, r = dyt_modulate(x, a, shift, scale, residual=res, gate=gate)
        gs = torch.autograd.grad((h * h).sum() + r.sum(), (x, mods, res, a))
        outs[backend] = (h, r) + gs
    for got, want in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_residual_fusion_equals_unfused(device):
    """(h, r) = dyt_modulate(x, ..., residual, gate) is the unfused r = residual + gate*x; h = dyt_modulate(r)."""
    args = _inputs(2, 8, 64, torch.float32, device, affine=True)
    with dyt_kernels.use_backend("triton"):
        h, r = dyt_modulate(**args)
        r_unfused = args["residual"] + args["gate"][:, None] * args["x"]
        h_unfused = dyt_modulate(r_unfused, args["alpha"], args["shift"], args["scale"], args["weight"], args["bias"])
    torch.testing.assert_close(r, r_unfused)
    torch.testing.assert_close(h, h_unfused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_modulate_empty(residual, device):
    args = _inputs(2, 0, 16, torch.float32, device, residual=residual, gate=residual, affine=True)
    out = _run(args, "triton")
    assert all(o.shape == (2, 0, 16) for o in out)
    grads = _grads(out, args, [torch.ones_like(o) for o in out])
    assert torch.count_nonzero(grads["shift"]) == 0 and torch.count_nonzero(grads["alpha"]) == 0
    assert grads["shift"].shape == (2, 16)


def test_modulate_partial_requires_grad(device):
    """Only x and shift need gradients: the rest are plain tensors."""
    B, L, D = 2, 5, 24
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    shift = torch.randn(B, D, device=device, requires_grad=True)
    with dyt_kernels.use_backend("triton"):
        h = dyt_modulate(x, torch.tensor([0.5], device=device), shift, torch.randn(B, D, device=device))
    gx, gs = torch.autograd.grad(h.sum(), (x, shift))
    torch.testing.assert_close(gs, torch.full((B, D), float(L), device=device))
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("residual,gate,kind,affine,per_channel", [
    (False, False, "sample", False, False), (True, True, "sample", True, True),
    (True, False, "token", True, False), (True, True, "token", False, True), (True, True, "sample3", False, False)])
def test_gradcheck_reference(residual, gate, kind, affine, per_channel):
    """The plain-PyTorch path's explicit backward formulas against numerical differentiation."""
    args = _inputs(2, 3, 5, torch.float64, "cpu", kind=kind, residual=residual, gate=gate, affine=affine,
                   per_channel=per_channel)
    keys = [k for k, v in args.items() if v is not None]

    def f(*tensors):
        kw = dict(args, **dict(zip(keys, tensors)))
        with dyt_kernels.use_backend("torch"):
            out = dyt_modulate(**kw)
        return out

    assert torch.autograd.gradcheck(f, tuple(args[k] for k in keys))


def test_torch_compile_fullgraph():
    """A block using ModulatedDyT compiles with no graph break (torch backend on CPU)."""
    torch._dynamo.reset()
    D = 32
    norm = ModulatedDyT(D)
    lin = torch.nn.Linear(D, 3 * D)

    def block(x, c, res):
        shift, scale, gate = lin(c).chunk(3, dim=-1)
        return norm(x, shift, scale, residual=res, gate=gate)

    x, c, res = torch.randn(2, 7, D, requires_grad=True), torch.randn(2, D), torch.randn(2, 7, D)
    with dyt_kernels.use_backend("torch"):
        h_e, r_e = block(x, c, res)
        g_e = torch.autograd.grad(h_e.sum() + r_e.sum(), (x, norm.alpha))
        compiled = torch.compile(block, fullgraph=True)
        h_c, r_c = compiled(x, c, res)
        g_c = torch.autograd.grad(h_c.sum() + r_c.sum(), (x, norm.alpha))
    torch.testing.assert_close(h_c, h_e)
    torch.testing.assert_close(r_c, r_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_layernorm_modulate_matches_formula(device):
    B, L, D = 2, 6, 32
    x, res = torch.randn(B, L, D, device=device), torch.randn(B, L, D, device=device)
    shift, scale, gate = torch.randn(3, B, D, device=device).unbind(0)
    h, r = layernorm_modulate(x, shift, scale, residual=res, gate=gate)
    r_want = res + gate[:, None] * x
    mu, var = r_want.mean(-1, keepdim=True), r_want.var(-1, unbiased=False, keepdim=True)
    h_want = (r_want - mu) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(r, r_want)
    torch.testing.assert_close(h, h_want, rtol=1e-5, atol=1e-5)


def test_modulated_dyt_module(device):
    m = ModulatedDyT(16, elementwise_affine=True, alpha_init_value=0.25).to(device)
    assert [n for n, _ in m.named_parameters()] == ["alpha", "weight", "bias"]
    assert "alpha_init_value=0.25" in repr(m)
    x, shift, scale = torch.randn(2, 3, 16, device=device), torch.randn(2, 16, device=device), torch.randn(2, 16, device=device)
    want = (m.weight * torch.tanh(0.25 * x) + m.bias) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(m(x, shift, scale), want)


@pytest.mark.parametrize("call,match", [
    (lambda x, s: dyt_modulate(x, 0.5, torch.zeros(4, 383), s), r"shift must be \(B, D\).*D=384, got \(4, 383\)"),
    (lambda x, s: dyt_modulate(x, 0.5, s, torch.zeros(4, 2, 384)), r"scale must be .*got \(4, 2, 384\)"),
    (lambda x, s: dyt_modulate(x, 0.5, s, s, gate=s), r"gate .* needs residual"),
    (lambda x, s: dyt_modulate(x, 0.5, s, s, residual=torch.zeros(4, 5, 383)), r"residual must match x"),
    (lambda x, s: dyt_modulate(x[0], 0.5, s, s), r"x must be \(B, L, D\)"),
    (lambda x, s: dyt_modulate(x, torch.ones(2), s, s), r"alpha must have 1 element .*\(384,\)"),
    (lambda x, s: dyt_modulate(x, 0.5, s, s, weight=torch.ones(383)), r"weight must have shape \(384,\)"),
    (lambda x, s: dyt_modulate(x.long(), 0.5, s, s), r"x must be float32"),
    (lambda x, s: dyt_modulate(x, 0.5, s.to("meta"), s), r"shift is on meta"),
])
def test_modulate_errors(call, match):
    x, s = torch.zeros(4, 5, 384), torch.zeros(4, 384)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled paths launch kernels only on CUDA")
@pytest.mark.parametrize("backend", ["triton", "auto"], ids=["opaque", "fused"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_triton_cuda(dynamic, backend):
    """On CUDA, use_backend("triton") keeps our kernels in the compiled graph both ways (bitwise equal
    to eager); the default lets inductor compile the pointwise forward and keeps our backward kernel
    (equal to eager up to the forward's tanh form: tanh.approx in our kernel, an accurate tanh in
    inductor's, 2^-11 relative, below a bf16 ulp)."""
    torch._dynamo.reset()
    D = 256
    norm = ModulatedDyT(D).cuda()

    def block(x, mods, res):
        shift, scale, gate = mods.chunk(3, dim=-1)
        return norm(x, shift, scale, residual=res, gate=gate)

    x = torch.randn(4, 33, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mods = torch.randn(4, 3 * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = torch.randn(4, 33, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with use_backend(backend):
        h_e, r_e = block(x, mods, res)
        g_e = torch.autograd.grad((h_e.float() ** 2).sum() + r_e.float().sum(), (x, mods, res, norm.alpha))
        compiled = torch.compile(block, fullgraph=True, dynamic=dynamic)
        h_c, r_c = compiled(x, mods, res)
        g_c = torch.autograd.grad((h_c.float() ** 2).sum() + r_c.float().sum(), (x, mods, res, norm.alpha))
    if backend == "triton":  # the very same kernels: bitwise equal
        assert torch.equal(h_c, h_e) and torch.equal(r_c, r_e)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        return
    assert torch.equal(r_c, r_e)  # r = residual + gate * x: one fp32 FMA, rounded once to bf16
    # h: one bf16 ulp (2^-8 relative) of the largest |h| covers the tanh forms' 2^-11 difference.
    torch.testing.assert_close(h_c.float(), h_e.float(), rtol=0, atol=2 ** -8 * h_e.float().abs().max().item())
    for a, b in zip(g_c, g_e):  # dh = 2h carries that ulp into every gradient, summed over <= 33 tokens
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2 ** -6 * scale)

@pytest.mark.parametrize("case", ["plain", "residual", "residual+gate", "per-token", "wide-residual", "no-affine",
                                  "chunked"])
@pytest.mark.parametrize("use_r", [True, False])
def test_validated_signature_paths_repeat_the_first_call_bitwise(device, case, use_r):
    """A second call with a validated signature read in place (contiguous tensors; modulations with
    unit channel stride, like adaLN's chunks of one projection) skips the checks and takes the cached
    forward and backward calls (ops/modulate.py's slot paths): bitwise the first call's results. A
    non-contiguous upstream gradient falls back to the general backward, with the same values."""
    from dyt_kernels import functional as F
    B, L, D = 2, 5, 48
    xdt = torch.bfloat16 if case == "wide-residual" else torch.float32
    x = torch.randn(B, L, D, device=device).to(xdt).requires_grad_()
    mshape = (B, L, D) if case == "per-token" else (B, D)
    shift, scale, gate = (torch.randn(mshape, device=device, requires_grad=True) for _ in range(3))
    a = torch.tensor([0.6], device=device, requires_grad=True)
    w, b = (None, None) if case == "no-affine" else (torch.randn(D, device=device, requires_grad=True)
                                                    for _ in range(2))
    res = None if case in ("plain", "no-affine") else torch.randn(B, L, D, device=device, requires_grad=True)
    gate = gate if case in ("residual+gate", "per-token", "wide-residual", "chunked") else None
    leaves = [t for t in (x, a, shift, scale, w, b, res, gate) if t is not None]
    if case == "chunked":   # strided views of one (B, 3D) projection, as adaLN makes them
        mods = torch.randn(B, 3 * D, device=device, requires_grad=True)
        shift, scale, gate = mods.chunk(3, dim=-1)
        assert not shift.is_contiguous()
        leaves = [x, a, mods, w, b, res]
    dh = torch.randn(B, L, D, device=device).to(xdt)
    dr = torch.randn(B, L, D, device=device) if res is not None and use_r else None

    def call(dh):
        out = dyt_modulate(x, a, shift, scale, w, b, residual=res, gate=gate)
        outs, douts = ((out[0], out[1]), (dh, dr)) if dr is not None else ((out[0] if res is not None else out,), (dh,))
        return (*outs, *torch.autograd.grad(outs, leaves, douts))

    with use_backend("triton"):
        F._VALIDATED_MOD.clear()
        first = call(dh)
        (slot,) = F._VALIDATED_MOD.slots()
        # (autograd hands the backward zeros for an unused r: the backward call is cached under has_dr)
        assert slot[0] is not None and list(slot[1]) == [res is not None], "the slot was not filled"
        again = call(dh)
        strided = call(torch.randn(B, L, 2 * D, device=device).to(xdt)[..., ::2].copy_(dh))
    for got in (again, strided):
        for f, g in zip(first, got):
            assert torch.equal(f, g)


def test_no_grad_forward_matches_the_recording_path(device):
    """Under no_grad / inference_mode dyt_modulate launches without an autograd.Function (sampling):
    bitwise the recording path's h and r, nothing recorded."""
    B, L, D = 2, 6, 40
    x, res = (torch.randn(B, L, D, device=device, requires_grad=True) for _ in range(2))
    shift, scale, gate = (torch.randn(B, D, device=device, requires_grad=True) for _ in range(3))
    a = torch.tensor([0.6], device=device, requires_grad=True)
    with use_backend("triton"):
        h, r = dyt_modulate(x, a, shift, scale, residual=res, gate=gate)
        assert h.grad_fn is not None
        for _ in range(2):   # the second call takes the validated-signature path
            with torch.no_grad():
                h2, r2 = dyt_modulate(x, a, shift, scale, residual=res, gate=gate)
            with torch.inference_mode():
                h3 = dyt_modulate(x.detach(), a.detach(), shift.detach(), scale.detach())
            assert h2.grad_fn is None and r2.grad_fn is None and h3.is_inference()
            assert torch.equal(h2, h.detach()) and torch.equal(r2, r.detach())
            assert torch.equal(h3, dyt_modulate(x, a, shift, scale).detach())
