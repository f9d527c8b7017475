"""Adversarial review of mixed-precision training and the optimizer loop around DyT / ModulatedDyT.

GradScaler (overflow detection, unscale_, clip_grad_norm_), autocast (bf16 / fp16, nested, disabled
inside, cache on and off, a ConvNeXt-style channels-first DyT after a conv), parameters in other
dtypes than x, model.half() with fp32 master weights, gradient accumulation, fused / foreach AdamW,
EMA (AveragedModel), parameters_to_vector / vector_to_parameters, frozen parameters and no_grad
evaluation inside a training loop. Both backends ("torch"; "triton" runs the kernels, through the
interpreter on CPU).

Two oracles. Values: float64 autograd of the formula (float64_checks), with the three-way rule
(helpers.assert_close_3way) whose "naive" run is the same model with the norms written as the
formula in plain PyTorch, under the same autocast: it rounds where the library's model rounds (the
Linears' low-precision products, the norm's output in x's dtype), so the library may be at most
twice as far from float64 as it. Overflow: the same formula model under the same GradScaler; each
parameter's gradient must be non-finite exactly when the formula model's is, so the scaler skips
exactly the steps the formula would skip.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dyt_kernels import DyT, ModulatedDyT, convert_layernorm_to_dyt, use_backend
from float64_checks import dyt_formula, modulate_formula
from helpers import FP32_EPS, assert_close_3way, eps, max_abs

pytestmark = pytest.mark.usefixtures("on_device")

BACKENDS = ["torch", "triton"]
B, L, D = 2, 4, 16


# --------------------------------------------------------------------------------------------------
# The model: Linear -> DyT -> ModulatedDyT (gated residual, adaLN chunks) -> Linear, and its formula twin.
# --------------------------------------------------------------------------------------------------

def _formula_dyt(x, alpha, weight, bias, channels_last=True):
    """The library's contract in plain PyTorch: computed in fp32 (float64 for float64 x), returned in x's
    dtype (README: outputs in x's dtype)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return dyt_formula(x.to(ct), alpha, weight, bias, channels_last, dtype=ct).to(x.dtype)


def _formula_modulate(x, alpha, shift, scale, weight, bias, residual, gate):
    """dyt_modulate's contract: r = residual + gate * x rounded to residual's dtype, the norm in fp32,
    h in x's dtype."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = (residual.to(ct) + gate.to(ct).unsqueeze(1) * x.to(ct)).to(residual.dtype)
    h, _ = modulate_formula(r.to(ct), alpha, shift.to(ct), scale.to(ct), weight, bias, dtype=ct)
    return h.to(x.dtype), r


class Block(nn.Module):
    """x (B, L, D) and a condition c (B, D); `formula=True` computes the norms as the formula, over the
    very same parameters (so a deepcopy's parameters line up one for one)."""

    def __init__(self, formula: bool = False):
        super().__init__()
        self.formula = formula
        self.inp = nn.Linear(D, D)
        self.norm = DyT(D)
        self.ada = nn.Linear(D, 3 * D)
        self.mod = ModulatedDyT(D, elementwise_affine=True)
        self.out = nn.Linear(D, D)

    def forward(self, x, c):
        z = self.inp(x)
        n, m = self.norm, self.mod
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        if self.formula:
            z = _formula_dyt(z, n.alpha, n.weight, n.bias)
            h, r = _formula_modulate(z, m.alpha, shift, scale, m.weight, m.bias, x, gate)
        else:
            z = n(z)
            h, r = m(z, shift, scale, residual=x, gate=gate)
        return self.out(h) + r


def _block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    blk = Block()
    with torch.no_grad():   # parameters away from their start, so every gradient term is exercised
        for p in (blk.norm.weight, blk.norm.bias, blk.mod.weight, blk.mod.bias):
            p.normal_()
        blk.norm.alpha.fill_(0.8)
        blk.mod.alpha.fill_(0.6)
    return blk


def _twin(model: Block) -> Block:
    twin = copy.deepcopy(model)
    twin.formula = True
    return twin


def _inputs(seed: int = 1, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, L, D, generator=g)).to(torch.get_default_device()), \
        torch.randn(B, D, generator=g).to(torch.get_default_device())


def _grads64(model: Block, x, c, loss_fn):
    """float64 autograd of the formula model: every parameter's gradient."""
    m64 = _twin(model).double()
    loss_fn(m64(x.double(), c.double())).backward()
    return [p.grad for p in m64.parameters()]


def _mean_square(out):
    return out.float().pow(2).mean()


def _assert_grads_3way(model, naive, grads64, dtype, what):
    """Every parameter gradient of `model` three-way against float64, `naive` (the formula twin run the
    same way) setting the scale. atol: two roundings of the largest value in the low-precision dtype,
    for a naive run whose roundings happen to cancel on the worst element."""
    for (name, p), q, g64 in zip(model.named_parameters(), naive.parameters(), grads64):
        assert p.grad is not None and p.grad.dtype == p.dtype, f"{what}: {name}.grad {p.grad}"
        assert_close_3way(f"{what}: {name}.grad", p.grad, g64, q.grad, 2 * eps(dtype) * max_abs(g64))


# --------------------------------------------------------------------------------------------------
# GradScaler: a step is skipped exactly when the formula's gradients overflow; unscale_ and clipping.
# --------------------------------------------------------------------------------------------------

def _scaled_step(model, x, c, backend, device, dtype, log2_scale, *, half):
    """One GradScaler step. half=False: fp32 parameters under autocast(dtype). half=True: model.half()
    with fp32 master weights (the master optimizer's parameters take the fp16 gradients, upcast)."""
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** log2_scale, growth_interval=1)
    if half:
        master = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
        model = model.half()
    opt = torch.optim.SGD(master if half else model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    with use_backend(backend):
        with torch.autocast(device, dtype=dtype, enabled=not half):
            out = model(x.half() if half else x, c.half() if half else c)
        scaler.scale(_mean_square(out)).backward()
    if half:
        for m, p in zip(master, model.parameters()):
            m.grad = p.grad.float()
    nonfinite = [not torch.isfinite(p.grad).all().item() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    stepped = [not torch.equal(b, p.detach()) for b, p in zip(before, opt.param_groups[0]["params"])]
    return nonfinite, stepped, scaler.get_scale()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's numpy casts that overflow: the point
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,half,log2_scales", [
    (torch.float16, False, range(12, 30)),     # fp16 autocast: the gradients overflow fp16 from ~2^18 up
    (torch.bfloat16, False, range(116, 128)),  # bf16 autocast: only near fp32's range
    (torch.float16, True, range(12, 30)),      # model.half() with fp32 master weights
], ids=["fp16-autocast", "bf16-autocast", "half-master"])
def test_grad_scaler_skips_exactly_the_steps_the_formula_skips(backend, device, dtype, half, log2_scales):
    """Across scales that take the scaled gradients from finite to overflowing, each parameter's gradient
    is non-finite exactly where the formula model's is, and the scaler then skips (or takes) the same
    step and backs off to the same scale."""
    model = _block()
    x, c = _inputs()
    seen_overflow = seen_finite = False
    for k in log2_scales:
        got = _scaled_step(copy.deepcopy(model), x, c, backend, device, dtype, k, half=half)
        want = _scaled_step(_twin(model), x, c, "torch", device, dtype, k, half=half)
        names = [n for n, _ in model.named_parameters()]
        assert got[0] == want[0], (f"scale 2^{k}: non-finite gradients "
                                   f"{[n for n, f in zip(names, got[0]) if f]}, the formula's "
                                   f"{[n for n, f in zip(names, want[0]) if f]}")
        assert got[1:] == want[1:], f"scale 2^{k}: stepped/new scale {got[1:]}, the formula's {want[1:]}"
        seen_overflow |= any(want[0])
        seen_finite |= not any(want[0])
        if any(want[0]):
            assert not any(got[1]), f"scale 2^{k}: a step was taken with non-finite gradients"
    assert seen_overflow and seen_finite, "the scan must cross the overflow threshold"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unscaled_gradients_match_float64(backend, device, dtype):
    """At a scale that overflows nothing (2^10), unscale_ gives the formula's gradients: three-way against
    float64 with the formula twin under the same autocast and scaler as the naive run."""
    model, x, c = _block(), *_inputs()
    runs = []
    for m, be in ((model, backend), (_twin(model), "torch")):
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with use_backend(be), torch.autocast(device, dtype=dtype):
            out = m(x, c)
        with use_backend(be):
            scaler.scale(_mean_square(out)).backward()
        scaler.unscale_(opt)
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        runs.append(m)
    _assert_grads_3way(runs[0], runs[1], _grads64(model, x, c, _mean_square), dtype, f"{dtype} unscaled")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("foreach", [False, True])
def test_unscale_then_clip_grad_norm(backend, device, foreach):
    """scaler.unscale_ then clip_grad_norm_ (foreach and not) on the norms' gradients: the total norm is
    float64's, and every gradient is clipped by float64's factor."""
    model, x, c = _block(), *_inputs()
    params = list(model.norm.parameters()) + list(model.mod.parameters())
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with use_backend(backend):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(x, c)
        scaler.scale(_mean_square(out)).backward()
    scaler.unscale_(opt)
    g64 = _grads64(model, x, c, _mean_square)
    g64 = [g for (n, _), g in zip(model.named_parameters(), g64) if n.startswith(("norm.", "mod."))]
    norm64 = torch.sqrt(sum(g.pow(2).sum() for g in g64))
    max_norm = 0.25 * norm64.item()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)
    # bf16 autocast: the gradients carry the bf16 roundings of the Linears around the norms; ~8 of them
    # at 2^-8 each (test_autograd_review's derivation) bound the relative error of each, so of the norm.
    torch.testing.assert_close(total.double(), norm64, rtol=8 * 2.0 ** -8, atol=0)
    factor = max_norm / (total.item() + 1e-6)   # torch's clip coefficient
    for p, g in zip(params, g64):
        torch.testing.assert_close(p.grad.double(), g * factor, rtol=0,
                                   atol=8 * 2.0 ** -8 * max_abs(g) * factor + 1e-12)


# --------------------------------------------------------------------------------------------------
# Autocast: dtypes and values.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("region", ["plain", "nested", "disabled-inside", "no-cache", "backward-inside"])
def test_autocast_regions(backend, device, dtype, region):
    """The block under autocast in several arrangements: the norms return x's dtype (bf16/fp16 from the
    Linear; r in the fp32 residual's), every gradient in its fp32 parameter's dtype, values three-way
    against float64 with the formula twin run identically."""
    model, x, c = _block(), *_inputs()
    results = []
    for m, be in ((model, backend), (_twin(model), "torch")):
        with use_backend(be):
            if region == "plain":
                with torch.autocast(device, dtype=dtype):
                    out = m(x, c)
                _mean_square(out).backward()
            elif region == "nested":   # an inner region of the other low-precision dtype wins inside it
                other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
                with torch.autocast(device, dtype=other), torch.autocast(device, dtype=dtype):
                    out = m(x, c)
                _mean_square(out).backward()
            elif region == "disabled-inside":   # the norms in an enabled=False island: fp32 x there
                with torch.autocast(device, dtype=dtype):
                    z = m.inp(x)
                    with torch.autocast(device, enabled=False):
                        zn = z.float()
                        z = _formula_dyt(zn, m.norm.alpha, m.norm.weight, m.norm.bias) if m.formula else m.norm(zn)
                        assert z.dtype == torch.float32
                    shift, scale, gate = m.ada(c).chunk(3, dim=-1)
                    if m.formula:
                        h, r = _formula_modulate(z, m.mod.alpha, shift, scale, m.mod.weight, m.mod.bias, x, gate)
                    else:
                        h, r = m.mod(z, shift, scale, residual=x, gate=gate)
                    out = m.out(h) + r
                _mean_square(out).backward()
            elif region == "no-cache":   # cache_enabled=False, twice (the weight casts are redone)
                with torch.autocast(device, dtype=dtype, cache_enabled=False):
                    out = m(x, c) + m(x, c)
                _mean_square(out).backward()
            else:   # loss.backward() inside the autocast region (not recommended by torch, but common)
                with torch.autocast(device, dtype=dtype):
                    out = m(x, c)
                    _mean_square(out).backward()
        results.append(m)
    doubled = region == "no-cache"
    loss64 = (lambda o: _mean_square(o + o)) if doubled else _mean_square
    _assert_grads_3way(results[0], results[1], _grads64(model, x, c, loss64), dtype, f"{region} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_dtypes(backend, device, dtype):
    """Under autocast the DyT after a Linear returns the Linear's low-precision dtype, ModulatedDyT's h
    x's and r the fp32 residual's; the EMA-style no_grad forward gives the same dtypes."""
    model, x, c = _block(), *_inputs()
    with use_backend(backend), torch.autocast(device, dtype=dtype):
        for ctx in (torch.enable_grad, torch.no_grad):
            with ctx():
                z = model.norm(model.inp(x))
                shift, scale, gate = model.ada(c).chunk(3, dim=-1)
                h, r = model.mod(z, shift, scale, residual=x, gate=gate)
            assert (z.dtype, h.dtype, r.dtype) == (dtype, dtype, torch.float32), ctx


class _ConvNeXtish(nn.Module):
    """A ConvNeXt-style stem: Conv2d, then a channels-first DyT (timm's LayerNorm2d converted), then a
    pointwise Conv2d."""

    def __init__(self, formula=False):
        super().__init__()
        self.formula = formula
        self.stem = nn.Conv2d(3, D, 2, stride=2)
        self.norm = DyT(D, channels_last=False)
        self.pw = nn.Conv2d(D, D, 1)

    def forward(self, x):
        z = self.stem(x)
        n = self.norm
        z = _formula_dyt(z, n.alpha, n.weight, n.bias, channels_last=False) if self.formula else n(z)
        return self.pw(z)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channels_first_dyt_after_a_conv_under_autocast(backend, device, memory_format):
    torch.manual_seed(0)
    model = _ConvNeXtish()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    model = model.to(memory_format=memory_format)
    x = torch.randn(2, 3, 6, 6).to(memory_format=memory_format)
    runs = []
    for m, be in ((model, backend), (copy.deepcopy(model), "torch")):
        m.formula = be == "torch" and m is not model
        with use_backend(be), torch.autocast(device, dtype=torch.bfloat16):
            z = m.norm(m.stem(x)) if not m.formula else None
            out = m(x)
        if z is not None:
            assert z.dtype == torch.bfloat16
        _mean_square(out).backward()
        runs.append(m)
    m64 = copy.deepcopy(model).double()
    m64.formula = True
    _mean_square(m64(x.double())).backward()
    for (name, p), q, p64 in zip(runs[0].named_parameters(), runs[1].parameters(), m64.parameters()):
        assert p.grad.dtype == torch.float32, name
        # two bf16 roundings of the largest value (see _assert_grads_3way)
        assert_close_3way(f"convnext {name}.grad", p.grad, p64.grad, q.grad, 2 * eps(torch.bfloat16) * max_abs(p64.grad))


# --------------------------------------------------------------------------------------------------
# Parameters in other dtypes than x; accumulation into existing gradients.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,p_dtype", [
    (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16), (torch.float64, torch.float32),
    (torch.bfloat16, torch.float16),
])
def test_gradient_accumulation_in_the_parameters_dtype(backend, x_dtype, p_dtype):
    """Three micro-batches accumulate into .grad kept between them (zero_grad(set_to_none=False) first),
    the triton backend alternating with torch on the middle one: each gradient stays in its
    parameter's dtype and equals the sum the formula's autograd accumulates in that dtype."""
    torch.manual_seed(0)
    norm = DyT(D, dtype=p_dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    twin = copy.deepcopy(norm)
    xs = [torch.randn(3, D, dtype=x_dtype) * 2 for _ in range(3)]
    dys = [torch.randn(3, D, dtype=x_dtype) for _ in range(3)]
    for m in (norm, twin):
        m.zero_grad(set_to_none=False)   # .grad exists (zeros) before the first micro-batch
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
    for i, (x, dy) in enumerate(zip(xs, dys)):
        with use_backend(backend if i != 1 else "torch"):
            norm(x).backward(dy)
        _formula_dyt(x, twin.alpha, twin.weight, twin.bias).backward(dy)
    # float64: the exact sum of the three micro-batches' gradients
    q = [p.detach().double().requires_grad_() for p in norm.parameters()]
    for x, dy in zip(xs, dys):
        dyt_formula(x.double(), *q).backward(dy.double())
    for (name, p), t, p64 in zip(norm.named_parameters(), twin.parameters(), q):
        assert p.grad.dtype == p_dtype, name
        # the naive twin rounds each micro-batch's gradient into p_dtype and accumulates there too; atol:
        # one rounding of the largest value into p_dtype (a naive run that happens to round the right way)
        assert_close_3way(f"accumulated {name}.grad", p.grad, p64.grad, t.grad, eps(p_dtype) * max_abs(p64.grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fused", "foreach", "for-loop"])
def test_adamw_on_low_precision_parameters(backend, dtype, kind):
    """model.to(dtype) trained by AdamW (fused, foreach, for-loop) for three steps: the DyT gradients
    are what each implementation accepts (dense, the parameter's dtype), and the parameters end where
    the formula twin's do under the same optimizer: the optimizer is deterministic given gradients, so
    the two differ only by the gradients' fp32-vs-same-dtype roundings, bounded per step by lr (Adam's
    update is at most ~lr per element in magnitude) times 3 steps, plus one rounding into dtype each step."""
    model, x, c = _block(), *_inputs()
    model = model.to(dtype)
    twin = _twin(model)
    lr = 1e-3
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[kind]
    for m, be in ((model, backend), (twin, "torch")):
        # eps 1e-4 in fp16: the default 1e-8 is 0 there, and torch's non-fused AdamW on fp16 parameters
        # then divides 0 by 0 where exp_avg_sq underflows (NaN in the formula twin too: torch's, not ours)
        adam_eps = 1e-4 if dtype == torch.float16 else 1e-8
        opt = torch.optim.AdamW(m.parameters(), lr=lr, eps=adam_eps, weight_decay=0.01, **flags)
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            with use_backend(be):
                _mean_square(m(x.to(dtype), c.to(dtype))).backward()
            assert all(p.grad.dtype == dtype for p in m.parameters())
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.isfinite(p).all(), name
        bound = 3 * (2 * lr) + 3 * eps(dtype) * max_abs(q)
        torch.testing.assert_close(p.double(), q.double(), rtol=0, atol=bound, )


# --------------------------------------------------------------------------------------------------
# Optimizer-side interplay: EMA, parameters as a vector, frozen parameters, no_grad evaluation.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_of_a_dyt_model(backend, device):
    """AveragedModel with get_ema_multi_avg_fn over two SGD steps: the EMA copy's parameters are the
    float64 EMA of the trained ones, and its no_grad forward (as sampling runs it, under autocast and
    not) is float64's formula at those parameters."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    model, x, c = _block(), *_inputs()
    decay = 0.9
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ema64 = None
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        with use_backend(backend):
            _mean_square(model(x, c)).backward()
        opt.step()
        ema.update_parameters(model)
        now = [p.detach().double() for p in model.parameters()]
        # AveragedModel copies the parameters at its first update, then averages
        ema64 = now if ema64 is None else [decay * e + (1 - decay) * p for e, p in zip(ema64, now)]
    for (name, e), e64 in zip(ema.module.named_parameters(), ema64):
        # each update: a lerp in fp32, one rounding of values of size max|e64|, twice
        torch.testing.assert_close(e.double(), e64, rtol=0, atol=4 * FP32_EPS * max_abs(e64))
    m64 = _twin(ema.module).double()
    want = m64(x.double(), c.double())
    with use_backend(backend), torch.no_grad():
        got = ema.module(x, c)
        with torch.autocast(device, dtype=torch.bfloat16):
            got_bf16 = ema.module(x, c)
        naive = _twin(ema.module)(x, c)
        with torch.autocast(device, dtype=torch.bfloat16):
            naive_bf16 = _twin(ema.module)(x, c)
    assert_close_3way("ema forward", got, want, naive, 4 * FP32_EPS * max_abs(want))
    assert_close_3way("ema forward bf16", got_bf16, want, naive_bf16, 2 * eps(torch.bfloat16) * max_abs(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_as_views_of_one_vector(backend):
    """vector_to_parameters makes alpha, weight and bias views into one flat vector (storage offsets,
    shared storage), as flat-parameter optimizers and model-soup code do, after the signature cache
    has seen the module's own tensors: outputs and gradients are float64's at the vector's values."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters
    torch.manual_seed(0)
    norm = DyT(D)
    x = torch.randn(3, D)
    with use_backend(backend):
        norm(x).sum().backward()   # fills the signature cache with the module's own tensors
    vec = parameters_to_vector(norm.parameters()).detach() + torch.randn(2 * D + 1)
    vector_to_parameters(vec, norm.parameters())
    norm.zero_grad()
    assert norm.weight.data_ptr() != vec.data_ptr() or norm.weight.storage_offset() > 0
    dy = torch.randn(3, D)
    with use_backend(backend):
        y = norm(x)
        y.backward(dy)
    q = [p.detach().double().requires_grad_() for p in norm.parameters()]
    y64 = dyt_formula(x.double(), *q)
    y64.backward(dy.double())
    naive = [p.detach().clone().requires_grad_() for p in norm.parameters()]
    yn = dyt_formula(x, *naive)
    yn.backward(dy)
    # fp32 on both sides: one fp32 rounding of the largest value, plus the tanh forms' error (2 eps32)
    assert_close_3way("y", y, y64, yn, 3 * FP32_EPS * max_abs(y64))
    for (name, p), p64, pn in zip(norm.named_parameters(), q, naive):
        # sums of 3 rows: a few fp32 roundings of values of size max|g64|
        assert_close_3way(f"{name}.grad", p.grad, p64.grad, pn.grad, 8 * FP32_EPS * max_abs(p64.grad))
    assert parameters_to_vector(p.grad for p in norm.parameters()).shape == (2 * D + 1,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_freezing_parameters_one_at_a_time_between_steps(backend):
    """requires_grad_(False) on alpha, then weight, then bias of a DyT and a ModulatedDyT, between steps
    of one loop (the same shapes, so the signature cache is hit): a frozen parameter's .grad stays
    None, the others get float64's gradients, and SGD moves only those."""
    model, x, c = _block(), *_inputs()
    for frozen in ("alpha", "weight", "bias", None):
        for mod in (model.norm, model.mod):
            for n, p in mod.named_parameters():
                p.requires_grad_(n != frozen)
        model.zero_grad(set_to_none=True)
        twin = _twin(model)
        with use_backend(backend):
            _mean_square(model(x, c)).backward()
        _mean_square(twin(x, c)).backward()
        g64 = _grads64(model, x, c, _mean_square)
        for (name, p), q, g in zip(model.named_parameters(), twin.parameters(), g64):
            if not p.requires_grad:
                assert p.grad is None, f"frozen {name} got a gradient"
                continue
            assert_close_3way(f"frozen={frozen}: {name}.grad", p.grad, g, q.grad, 8 * FP32_EPS * max_abs(g))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        for n, p in model.named_parameters():
            assert torch.equal(before[n], p.detach()) == (not p.requires_grad), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_evaluation_inside_a_training_loop(backend, device):
    """train step, no_grad (and inference_mode, autocast) evaluation of the same shapes, train step: the
    evaluation reads the parameters as they are after the step and the next training step's gradients
    are float64's at those parameters (nothing cached from the evaluation or the first step reused)."""
    model, x, c = _block(), *_inputs()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(3):
        opt.zero_grad()
        twin = _twin(model)
        with use_backend(backend):
            _mean_square(model(x, c)).backward()
        _mean_square(twin(x, c)).backward()
        g64 = _grads64(model, x, c, _mean_square)
        for (name, p), q, g in zip(model.named_parameters(), twin.parameters(), g64):
            assert_close_3way(f"step {step}: {name}.grad", p.grad, g, q.grad, 8 * FP32_EPS * max_abs(g))
        opt.step()
        want = _twin(model).double()(x.double(), c.double())
        naive = _twin(model)(x, c).detach()
        with use_backend(backend):
            with torch.no_grad():
                got = model(x, c)
            with torch.inference_mode():
                got_inf = model(x, c)
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
                got_bf16 = model(x, c)
        atol = 4 * FP32_EPS * max_abs(want)   # one fp32 rounding and the tanh form's 2 eps32, with margin
        assert_close_3way(f"step {step} no_grad", got, want, naive, atol)
        assert_close_3way(f"step {step} inference_mode", got_inf, want, naive, atol)
        assert torch.isfinite(got_bf16).all()


def test_converted_layernorm_model_under_autocast_and_scaler(device):
    """convert_layernorm_to_dyt of a small nn.TransformerEncoder, trained one GradScaler step under bf16
    autocast on each backend: the two backends' unscaled DyT gradients agree to the fp32 reduction noise
    (the same bf16 inputs reach both), and are finite."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = convert_layernorm_to_dyt(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    x = torch.randn(B, L, D)
    grads = []
    for backend in BACKENDS:
        m = copy.deepcopy(model)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with use_backend(backend):
            with torch.autocast(device, dtype=torch.bfloat16):
                out = m(x)
            scaler.scale(_mean_square(out)).backward()
        scaler.unscale_(opt)
        grads.append({n: p.grad for n, p in m.named_parameters() if "norm" in n})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        a, b = grads[0][n], grads[1][n]
        assert torch.isfinite(a).all() and a.dtype == torch.float32, n
        # same bf16 inputs, fp32 sums of <= B*L = 8 rows in another order: a few eps32 of the largest
        # value, plus the bf16 output's one rounding where the tanh forms differ by an ulp (2^-8)
        torch.testing.assert_close(a, b, rtol=0, atol=2.0 ** -8 * max_abs(b) + 1e-12, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_under_autocast(backend, device, reentrant):
    """torch.utils.checkpoint of the block under fp16 autocast (the recompute runs under the saved
    autocast state): the gradients equal the uncheckpointed run's to the bit, the same ops recomputed
    on the same values."""
    from torch.utils.checkpoint import checkpoint
    model, x, c = _block(), *_inputs()
    plain = copy.deepcopy(model)
    x_in = x.clone().requires_grad_(reentrant)   # reentrant checkpointing needs an input that requires grad
    with use_backend(backend):
        with torch.autocast(device, dtype=torch.float16):
            out = checkpoint(model, x_in, c, use_reentrant=reentrant)
            ref = plain(x, c)
        _mean_square(out).backward()
        _mean_square(ref).backward()
    assert torch.equal(out, ref)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_block_under_autocast_and_scaler(backend, device):
    """torch.compile (aot_eager: AOTAutograd's graphs, no codegen, quick on CPU) of the block under bf16
    autocast with a GradScaler: the compiled routes (plain ops for "torch", our custom ops for "triton")
    give fp32 parameter gradients three-way against float64, the formula twin compiled alike as the
    naive run."""
    torch._dynamo.reset()
    model, x, c = _block(), *_inputs()
    runs = []
    for m, be in ((model, backend), (_twin(model), "torch")):
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with use_backend(be):
            with torch.autocast(device, dtype=torch.bfloat16):
                out = compiled(x, c)
            scaler.scale(_mean_square(out)).backward()
        scaler.unscale_(opt)
        runs.append(m)
    _assert_grads_3way(runs[0], runs[1], _grads64(model, x, c, _mean_square), torch.bfloat16, "compiled")


def test_timm_weight_decay_groups_leave_dyt_parameters_undecayed():
    """Weight decay on alpha: timm's param_groups_weight_decay (what timm's train script and the DyT
    paper's code build AdamW from) puts every 1-D parameter in the no-decay group, so a converted
    model's alpha, weight and bias are not decayed, as the LayerNorm's weight and bias were not."""
    timm_optim = pytest.importorskip("timm.optim")
    import library_models
    model = convert_layernorm_to_dyt(library_models.vit())
    groups = timm_optim.param_groups_weight_decay(model, weight_decay=0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    dyt_params = [(f"{mn}.{n}", p) for mn, m in model.named_modules() if isinstance(m, DyT)
                  for n, p in m.named_parameters()]
    assert dyt_params
    assert not [n for n, p in dyt_params if id(p) in decayed]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_gradient_penalty_recipe(backend, device, dtype):
    """torch's AMP recipe for a gradient penalty: autograd.grad of the scaled loss with create_graph=True,
    unscaled by hand, its norm added to the loss under autocast, then scaler.scale(loss).backward()
    (a double backward through the norms, which runs the reference formulas). Three-way against
    float64 autograd of the same recipe, the formula twin run the same way as the naive run."""
    def run(m, be, double=False):
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8, enabled=not double)
        params = list(m.parameters())
        with use_backend(be):
            with torch.autocast(device, dtype=dtype, enabled=not double):
                loss = _mean_square(m(x.double(), c.double()) if double else m(x, c))
            scaled = torch.autograd.grad(scaler.scale(loss), params, create_graph=True)
            inv = 1.0 if double else 1.0 / scaler.get_scale()
            with torch.autocast(device, dtype=dtype, enabled=not double):
                loss = loss + sum((g * inv).pow(2).sum() for g in scaled).sqrt()
            scaler.scale(loss).backward()
        return m

    model, x, c = _block(), *_inputs()
    got, naive = run(copy.deepcopy(model), backend), run(_twin(model), "torch")
    want = run(_twin(model).double(), "torch", double=True)
    _assert_grads_3way(got, naive, [p.grad for p in want.parameters()], dtype, f"penalty {dtype}")
