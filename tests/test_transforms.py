"""torch.func transforms (vmap, grad, jvp, jacrev, jacfwd, hessian) and forward-mode AD through dyt,
dyt_modulate and the models, eager and under torch.compile(fullgraph=True), against float64.

Under a transform the ops take reference.py's plain ops (functional._plain_ops): fp32 inputs are
computed in fp32 by torch's own pointwise ops, so results sit within fp32 rounding of the float64
oracle (tests/float64_checks.py's formulas, which share no code with the library). Bound used
throughout: atol = rtol = 2e-5. Every value here is O(1) (inputs ~N(0, 1), tanh in [-1, 1]) and the
largest sum has 8 * 6 = 48 terms, each within a few fp32 ulps (2^-23 ~ 1.2e-7): 48 * 4 ulps ~ 2.3e-5
as a worst case aligned sum, ~3e-6 as a random walk; 2e-5 holds the random walk with ~7x room and fails
on any wrong formula (those are O(1) off).
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import dyt_kernels.functional as functional
from dyt_kernels import DyT, dyt, dyt_modulate, use_backend
from float64_checks import dyt_formula, modulate_formula
from tiny_models import randomize, tiny, timesteps

TOL = dict(atol=2e-5, rtol=2e-5)
BACKENDS = ["torch", "triton"]   # triton: the Triton backend (interpreter on CPU), which transforms must leave


def _close(got, want, **tol):
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32, g.dtype
        torch.testing.assert_close(g.double(), w, **(tol or TOL))


def _up(ts):
    return tuple(t.double() for t in ts)


def _dyt_inputs(device, channels_last, per_channel_alpha):
    # dim 0: the vmapped batch. Channels first, the channel dim is dim 1 of one sample (dim 2 of x) and
    # dim 1 of x (transforms over the whole batch), so both are C.
    shape, C = ((4, 3, 6), 6) if channels_last else ((4, 6, 6, 2), 6)
    x = torch.randn(shape, device=device)
    alpha = (0.5 + torch.rand(C if per_channel_alpha else 1, device=device))
    return x, alpha, torch.randn(C, device=device), torch.randn(C, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [True, False], ids=["last", "first"])
@pytest.mark.parametrize("per_channel_alpha", [False, True], ids=["scalar_alpha", "channel_alpha"])
def test_dyt_under_every_transform(backend, device, channels_last, per_channel_alpha):
    x, a, w, b = _dyt_inputs(device, channels_last, per_channel_alpha)

    def ours(x, a, w, b):
        return dyt(x, a, w, b, channels_last=channels_last)

    def oracle(x, a, w, b):
        return dyt_formula(x, a, w, b, channels_last)

    def loss(f):
        return lambda x, a, w, b: (f(x, a, w, b) * torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype,
                                                                   device=x.device)).sum()

    args, args64 = (x, a, w, b), _up((x, a, w, b))
    tangents = tuple(torch.randn_like(t) for t in args)
    with use_backend(backend):
        # vmap over the batch, at dim 0 and at the last dim (the rule moves it); over an ensemble of weights
        _close(vmap(ours, in_dims=(0, None, None, None))(*args), vmap(oracle, in_dims=(0, None, None, None))(*args64))
        xt = x.movedim(0, -1).contiguous()
        _close(vmap(ours, in_dims=(-1, None, None, None))(xt, a, w, b),
               vmap(oracle, in_dims=(-1, None, None, None))(xt.double(), *args64[1:]))
        W = torch.randn(3, w.shape[0], device=device)
        _close(vmap(ours, in_dims=(None, None, 0, None))(x, a, W, b),
               vmap(oracle, in_dims=(None, None, 0, None))(x.double(), args64[1], W.double(), args64[3]))
        with torch.no_grad():   # the sampling path, which skips autograd
            _close(vmap(ours)(x, a.expand(4, -1), w.expand(4, -1), b.expand(4, -1)),
                   vmap(oracle)(args64[0], *(t.expand(4, -1) for t in args64[1:])))
        # reverse mode: gradients of every argument, per-sample gradients, Jacobians, a Hessian
        _close(grad(loss(ours), argnums=(0, 1, 2, 3))(*args), grad(loss(oracle), argnums=(0, 1, 2, 3))(*args64))
        per_sample = vmap(grad(loss(ours), argnums=(1, 2, 3)), in_dims=(0, None, None, None))
        _close(per_sample(*args), vmap(grad(loss(oracle), argnums=(1, 2, 3)), in_dims=(0, None, None, None))(*args64))
        _close(jacrev(ours, argnums=(0, 1))(x[0], a, w, b), jacrev(oracle, argnums=(0, 1))(*(t.double() for t in (x[0], a, w, b))))
        _close(jacfwd(ours, argnums=(0, 1))(x[0], a, w, b), jacrev(oracle, argnums=(0, 1))(*(t.double() for t in (x[0], a, w, b))))
        _close(hessian(loss(ours), argnums=1)(x[0], a, w, b), hessian(loss(oracle), argnums=1)(*(t.double() for t in (x[0], a, w, b))))
        # forward mode: torch.func.jvp and forward-AD dual tensors
        _close(jvp(ours, args, tangents), jvp(oracle, args64, _up(tangents)))
        _close(_dual_tangents(ours, args, tangents), _dual_tangents(oracle, args64, _up(tangents)))
        with torch.no_grad():   # forward AD needs no graph; the sampling path used to drop the tangent
            _close(_dual_tangents(ours, args, tangents), _dual_tangents(oracle, args64, _up(tangents)))


def _dual_tangents(f, args, tangents):
    """f's outputs and their tangents under torch.autograd.forward_ad (dual tensors, no torch.func)."""
    with fwAD.dual_level():
        out = f(*(fwAD.make_dual(p, t) for p, t in zip(args, tangents)))
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(fwAD.unpack_dual(o).primal.clone(), fwAD.unpack_dual(o).tangent) for o in outs]
    assert all(t is not None for _, t in pairs), "an output lost its tangent"
    return pairs


_MOD_CASES = {
    "plain": dict(residual=False, gate=False, per_token=False),
    "residual+gate": dict(residual=True, gate=True, per_token=False),
    "residual": dict(residual=True, gate=False, per_token=False),
    "per_token": dict(residual=True, gate=True, per_token=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_MOD_CASES))
def test_dyt_modulate_under_every_transform(backend, device, case):
    c = _MOD_CASES[case]
    B, L, D = 2, 3, 8
    mod_shape = (B, L, D) if c["per_token"] else (B, D)
    t = {"x": torch.randn(B, L, D, device=device), "alpha": 0.5 + torch.rand(1, device=device),
         "shift": torch.randn(mod_shape, device=device), "scale": torch.randn(mod_shape, device=device),
         "weight": torch.randn(D, device=device), "bias": torch.randn(D, device=device)}
    if c["residual"]:
        t["residual"] = torch.randn(B, L, D, device=device)
    if c["gate"]:
        t["gate"] = torch.randn(mod_shape, device=device)
    names = list(t)

    def call(op):
        def f(*vals):
            kw = dict(zip(names, vals))
            out = op(kw.pop("x"), kw.pop("alpha"), kw.pop("shift"), kw.pop("scale"), kw.pop("weight"),
                     kw.pop("bias"), residual=kw.get("residual"), gate=kw.get("gate"))
            return out if c["residual"] else (out,)
        return f

    def formula(x, alpha, shift, scale, weight, bias, residual=None, gate=None):
        h, r = modulate_formula(x, alpha, shift, scale, weight, bias, residual, gate)
        return h if residual is None else (h, r)

    ours, oracle = call(dyt_modulate), call(formula)
    args, args64 = tuple(t.values()), _up(t.values())
    tangents = tuple(torch.randn_like(v) for v in args)
    argnums = tuple(range(len(args)))

    def loss(f):
        return lambda *v: sum((o * o.sin()).sum() for o in f(*v))

    with use_backend(backend):
        _close(jvp(ours, args, tangents), jvp(oracle, args64, _up(tangents)))
        _close(_dual_tangents(ours, args, tangents), _dual_tangents(oracle, args64, _up(tangents)))
        with torch.no_grad():
            _close(_dual_tangents(ours, args, tangents), _dual_tangents(oracle, args64, _up(tangents)))
        _close(grad(loss(ours), argnums=argnums)(*args), grad(loss(oracle), argnums=argnums)(*args64))
        # vmap over samples (each call sees one sample as a batch of one); alpha, weight, bias shared
        dims = tuple(None if n in ("alpha", "weight", "bias") else 0 for n in names)
        one = lambda f: (lambda *v: f(*(u if d is None else u.unsqueeze(0) for u, d in zip(v, dims))))  # noqa: E731
        _close(vmap(one(ours), in_dims=dims)(*args), vmap(one(oracle), in_dims=dims)(*args64))
        _close(vmap(grad(loss(one(ours)), argnums=argnums), in_dims=dims)(*args),
               vmap(grad(loss(one(oracle)), argnums=argnums), in_dims=dims)(*args64))
        with torch.no_grad():
            _close(vmap(one(ours), in_dims=dims)(*args), vmap(one(oracle), in_dims=dims)(*args64))


@pytest.mark.parametrize("route", ["fused", "opaque"])
def test_transforms_under_compile_leave_the_kernel_routes(route, monkeypatch):
    """torch.compile(fullgraph=True) of a transformed function: dynamo traces the transform, and the
    ops must take the plain route there too. The opaque route's custom op has no jvp rule, and before
    the ops read the transform state torch.func.jvp through it gave a zero tangent, silently.

    On CPU tensors the routes are forced the way a CUDA tensor would take them (use_triton), with the
    custom ops computing through reference.py (ops/library.py); bench/gpu_check.sh runs this on a GPU."""
    monkeypatch.setattr(functional, "use_triton", lambda x, name=None: True)
    backend = "triton" if route == "opaque" else "auto"
    x, a, w, b = _dyt_inputs("cpu", True, False)
    x64, a64, w64, b64 = _up((x, a, w, b))
    v = torch.randn_like(x)

    def loss(f):
        return lambda x: (f(x) ** 2).sum()

    ours = lambda x: dyt(x, a, w, b)   # noqa: E731
    oracle = lambda x: dyt_formula(x, a64, w64, b64)   # noqa: E731
    cases = [
        (lambda x: jvp(ours, (x,), (v,)), jvp(oracle, (x64,), (v.double(),))),
        (lambda x: vmap(grad(loss(ours)))(x), vmap(grad(loss(oracle)))(x64)),
        (lambda x: grad(loss(ours))(x), grad(loss(oracle))(x64)),
        (lambda x: vmap(ours)(x), oracle(x64)),
    ]
    with use_backend(backend):
        for fn, want in cases:
            torch._dynamo.reset()
            _close(torch.compile(fn, fullgraph=True)(x), want)
        # and the compiled function without a transform still takes the route it was asked for
        torch._dynamo.reset()
        graphs = []
        torch.compile(ours, backend=lambda gm, ex: graphs.append(gm.code) or gm.forward, fullgraph=True)(x)
        assert ("dyt_fwd" in graphs[0]) == (route == "opaque"), graphs[0]


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_model_jvp_and_per_sample_grads(name, device):
    """What a consistency / MeanFlow-style objective asks of a DiT: the JVP of the whole model, and
    per-sample gradients through vmap. The fp32 model on the Triton backend against the same model in
    float64, whose own JVP is held to central finite differences."""
    torch.manual_seed(0)
    model = randomize(tiny(name, "dyt", device=device))
    model64 = tiny(name, "dyt", device=device).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x, t = torch.randn(2, 1, 16, 16, device=device), timesteps(name, 2, device=device)
    v = torch.randn_like(x)
    with torch.no_grad():
        cond, cond64 = model.encode_prompts(["3", "7"]), model64.encode_prompts(["3", "7"])
    f, f64 = (lambda z: model(z, t, cond)), (lambda z: model64(z, t, cond64))
    # torch's fused attention kernels have no forward-AD formula; its math backend has (plain ops)
    with use_backend("triton"), sdpa_kernel(SDPBackend.MATH):
        out, tangent = jvp(f, (x,), (v,))
    with sdpa_kernel(SDPBackend.MATH):
        out64, tangent64 = jvp(f64, (x.double(),), (v.double(),))
    assert tangent64.abs().max() > 1e-2   # a zero tangent would pass any closeness check
    # Central differences with h = 1e-4 (randomize's std-0.1 weights keep the model gently curved:
    # its error was 7e-12 here, shrinking as h^2 between h = 1e-3 and 1e-4); 1e-9 leaves 100x room.
    h = 1e-4
    with torch.no_grad():
        fd = (f64(x.double() + h * v.double()) - f64(x.double() - h * v.double())) / (2 * h)
    torch.testing.assert_close(tangent64, fd, atol=1e-9, rtol=0)
    # ... and the adjoint identity u.(J v) = (J^T u).v with J^T u from plain reverse mode (no transform)
    x64 = x.double().requires_grad_()
    u = torch.randn_like(out64)
    jtu, = torch.autograd.grad((f64(x64) * u).sum(), x64)
    torch.testing.assert_close((u * tangent64).sum(), (jtu * v.double()).sum(), atol=1e-12, rtol=1e-10)
    # fp32 against float64: outputs and tangents are O(0.1); fp32 rounding through a few hundred ops
    # (matmul and attention sums over <= 64 terms) stays near 1e-6 of that
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tangent.double(), tangent64, atol=1e-5, rtol=1e-4)

    params = {k: p.detach() for k, p in model.named_parameters()}
    params64 = {k: p.detach() for k, p in model64.named_parameters()}

    def per_sample_grads(m, p, z, tt, c):
        def sample_loss(p, z, tt, tokens, mask, pooled):
            one = type(c)(tokens[None], mask[None], pooled[None])
            return (torch.func.functional_call(m, p, (z[None], tt[None], one)) ** 2).mean()
        return vmap(grad(sample_loss), in_dims=(None, 0, 0, 0, 0, 0))(p, z, tt, c.tokens, c.mask, c.pooled)

    with use_backend("triton"):
        per_sample = per_sample_grads(model, params, x, t, cond)
    per_sample64 = per_sample_grads(model64, params64, x.double(), t, cond64)
    # the prompts were encoded beforehand, so the text encoder's parameters have zero gradients here
    alphas = [k for k in per_sample if k.endswith("alpha") and not k.startswith("text_encoder.")]
    assert alphas and all(per_sample64[k].abs().max() > 0 for k in alphas)
    for k in per_sample:
        torch.testing.assert_close(per_sample[k].double(), per_sample64[k], atol=1e-4, rtol=1e-3, msg=k)


def test_ensemble_of_dyt_modules_through_functional_call(device):
    """vmap over stacked DyT parameters (torch.func.stack_module_state), against each module run alone."""
    mods = [DyT(6).to(device) for _ in range(3)]
    with torch.no_grad():
        for i, m in enumerate(mods):
            m.alpha.fill_(0.3 * (i + 1))
            m.weight.normal_()
            m.bias.normal_()
    params, buffers = torch.func.stack_module_state(mods)
    x = torch.randn(5, 6, device=device)
    with use_backend("triton"):
        got = vmap(lambda p, bu: torch.func.functional_call(mods[0], (p, bu), (x,)))(params, buffers)
    want = torch.stack([dyt_formula(x.double(), m.alpha.double(), m.weight.double(), m.bias.double())
                        for m in mods])
    _close(got.detach(), want)
