"""torch.compile of whole converted models: timm, diffusers, transformers (library_models.CASES) and the
project's own PixArt-alpha, on each compiled route (torch / fused / opaque).

The routes are forced on CPU the way a CUDA tensor takes them (test_dynamic_shapes._force; on CPU the
custom ops compute with reference.py, and under backends other than inductor torch.library.triton_op
decomposes into that implementation). The oracle is test_convert's: a hand-built DyT copy of the
original (library_models.hand_built_dyt) run in float64, with the compiled fp32 model held to the
three-way rule (helpers.assert_close_3way: at most 2x the error of the same hand-built copy run eagerly
in fp32, plus 64 fp32 eps of the largest value). The eager converted model on the same route is held
to the same rule, so compiled and eager are as close to float64 as plain PyTorch is. fullgraph=True
makes any graph break an error; a counting backend checks one graph per compile.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from dyt_kernels import DyT, convert_layernorm_to_dyt, use_backend
from dyt_kernels.backend import INTERPRETER
from helpers import FP32_EPS, assert_close_3way, max_abs, max_abs_err
from library_models import loss_and_grads, model_atol, CASES, cast_inputs, hand_built_dyt, main_output, randomize_norms_
from test_dynamic_shapes import _force
from tiny_models import randomize, tiny, timesteps

ROUTES = ["torch", "fused", "opaque"]
MODELS = [(name, False) for name in CASES] + [(name, True) for name, case in CASES.items() if case.fused]


def _eager_backend(backend: str) -> str:
    """The backend an eager run of the same route takes: the kernels on CPU need the interpreter (on a GPU
    machine conftest leaves it off and the Triton backend refuses CPU tensors; there the torch backend)."""
    return backend if INTERPRETER else "torch"


class _Counting:
    """A torch.compile backend that counts the graphs it is given and hands them on to `then`
    (aot_eager: AOTAutograd's forward and backward traces, as inductor is given them)."""

    def __init__(self, then: str | None = "aot_eager"):
        self.graphs = 0
        self.then = None if then is None else torch._dynamo.lookup_backend(then)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward if self.then is None else self.then(gm, example_inputs)


def _build(name: str, seed: int = 0):
    case = CASES[name]
    torch.manual_seed(seed)
    classes = case.channel_dims()
    model = randomize_norms_(case.build(), classes).eval()
    torch.manual_seed(seed + 1)
    inputs = case.inputs()
    if name == "timm_convnext":   # 32x32 images: a quarter of the programs of the interpreter's eager run
        inputs = {"x": torch.randn(2, 3, 32, 32)}
    return case, classes, model, inputs


def _convert(case, model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # these models hold no norm the converter leaves alone
        return convert_layernorm_to_dyt(model, include_rmsnorm=case.include_rmsnorm, **kwargs)


def _randomize_alphas_(model: nn.Module) -> None:
    """Alphas away from 0.5, so a graph that kept alpha as a traced constant would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.3, 1.5)


def _copy_alphas_(dst: nn.Module, src: nn.Module) -> None:
    params = dict(src.named_parameters())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if name.endswith("alpha"):
                p.copy_(params[name])


def _check_3way(label, got, ref, naive):
    out, grads = got
    ref_out, ref_grads = ref
    naive_out, naive_grads = naive
    assert_close_3way(f"{label} output", out, ref_out, naive_out, model_atol(ref_out))
    # A compiled graph is one autograd node: parameters only an unused output reads (BERT's pooler) get
    # zeros where eager leaves None, as with the LayerNorm model. Zeros, and nothing else missing.
    extra = set(grads) - set(ref_grads)
    assert set(ref_grads) <= set(grads), set(ref_grads) - set(grads)
    assert all(not grads[n].any() for n in extra), extra
    # A gradient's atol scales with the model's largest gradient, not its own (test_models' rule): alpha's
    # gradient is a sum over B*L*D terms that mostly cancel (1e-6 beside terms of 1e-2 here), and the
    # rounding of every term reaches it, so its own size says nothing of the rounding it carries.
    grad_scale = max(max_abs(g) for g in ref_grads.values())
    for n, ref_g in ref_grads.items():
        g, naive_err = grads[n], max_abs_err(naive_grads[n], ref_g)
        # As test_convert: a gradient zero in exact math (a key bias softmax ignores) is pure fp32 noise
        # whose size depends on the order of the sums; there 8x the naive run's noise, else 2x.
        factor = 8.0 if max_abs(ref_g) <= 100 * naive_err else 2.0
        assert_close_3way(f"{label} d {n}", g, ref_g, naive_grads[n], 64 * FP32_EPS * grad_scale, factor=factor)


def _oracles(case, classes, original, converted, inputs):
    """(float64, eager fp32) output and gradients of hand-built DyT copies of the unconverted model, with
    the converted model's alphas. (Two builds: hand_built's forwards close over their module, which a
    deepcopy would not rebind.)"""
    hand, hand64 = hand_built_dyt(original, classes), hand_built_dyt(original, classes).double()
    _copy_alphas_(hand, converted)
    _copy_alphas_(hand64, converted)
    return (loss_and_grads(hand64, cast_inputs(inputs, torch.float64), hand64),
            loss_and_grads(hand, inputs, hand))


_LAYERNORM_FULLGRAPH: set = set()


def _layernorm_model_compiles_fullgraph(name, model, inputs) -> None:
    """The premise, checked once per model: the unconverted model compiles fullgraph into one graph."""
    if name in _LAYERNORM_FULLGRAPH:
        return
    torch._dynamo.reset()
    count = _Counting(then=None)
    out = main_output(torch.compile(copy.deepcopy(model), backend=count, fullgraph=True)(**inputs))
    assert count.graphs == 1 and torch.isfinite(out).all()
    _LAYERNORM_FULLGRAPH.add(name)


# --------------------------------------------------------------------------------------------------
# 1. fullgraph forward + backward of every converted library model, every route, against float64.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name,fuse", MODELS, ids=[f"{n}{'-fused' if f else ''}" for n, f in MODELS])
def test_converted_model_compiles_fullgraph_and_matches_float64(name, fuse, route, monkeypatch):
    """The LayerNorm model compiles with fullgraph=True into one graph; so must the converted one (any
    graph break raises), on each route, fuse_modulation included. Its output and every parameter's
    gradient, compiled (aot_eager) and eager on the same route, against the hand-built float64 oracle."""
    case, classes, model, inputs = _build(name)   # eval mode: BERT's dropout would draw differently compiled
    _layernorm_model_compiles_fullgraph(name, model, inputs)

    original = copy.deepcopy(model)
    converted = _convert(case, model, fuse_modulation=fuse)
    assert not any(type(m) in classes for m in converted.modules()), "a norm survived"
    _randomize_alphas_(converted)
    ref, naive = _oracles(case, classes, original, converted, inputs)

    backend = _force(route, monkeypatch)
    torch._dynamo.reset()
    count = _Counting()
    compiled_model = copy.deepcopy(converted)
    compiled = torch.compile(compiled_model, backend=count, fullgraph=True)
    with use_backend(backend):
        got = loss_and_grads(compiled, inputs, compiled_model)
    assert count.graphs == 1
    _check_3way(f"{name} compiled ({route})", got, ref, naive)
    with use_backend(_eager_backend(backend)):
        eager = loss_and_grads(converted, inputs, converted)
    _check_3way(f"{name} eager ({route})", eager, ref, naive)


# --------------------------------------------------------------------------------------------------
# 2. Recompiles: never more than the LayerNorm model's.
# --------------------------------------------------------------------------------------------------

def _resized(name, inputs, batch, length):
    """The case's inputs at another batch size (and, for the text models, another sequence length)."""
    if name == "llama":
        return {"input_ids": torch.randint(0, 50, (batch, length))}
    return {k: torch.cat([v] * batch)[:batch] if isinstance(v, torch.Tensor) and v.shape[:1] == (2,) else v
            for k, v in inputs.items()}


def _recompiles(name, model, inputs, backend):
    """Graphs compiled at each call of a run a training and evaluation loop makes: the first call, the same
    sizes again, new batch sizes (and lengths), eval, no_grad, alphas changed in place, an AdamW step,
    inference_mode."""
    torch._dynamo.reset()
    count = _Counting(then=None)
    compiled = torch.compile(model, backend=count, fullgraph=True)
    log = []

    def call(label, batch=2, length=7):
        before = count.graphs
        out = main_output(compiled(**_resized(name, inputs, batch, length)))
        if out.requires_grad:
            out.square().mean().backward()
        log.append((label, count.graphs - before))

    with use_backend(backend):
        call("first")
        call("same sizes")
        call("batch 3, length 9", 3, 9)
        call("batch 4, length 11", 4, 11)
        model.eval()
        call("eval")
        call("eval again")
        model.train()
        with torch.no_grad():
            call("no_grad")
            for n, p in model.named_parameters():
                if n.endswith("alpha"):
                    p.mul_(1.25)   # the value changes, the tensor stays
        call("alphas changed in place")
        torch.optim.AdamW(model.parameters(), lr=1e-3).step()
        call("after an AdamW step")
        with torch.inference_mode():
            call("inference_mode")
    return log


_LAYERNORM_LOGS: dict = {}


# Every route on the ViT; the diffusers model with fused modulation and the text model (new sequence
# lengths) on the routes a GPU takes (fused by default, opaque under use_backend("triton")): each graph
# costs seconds of dynamo tracing on two cores.
@pytest.mark.parametrize("name,fuse,route", [("timm_vit", False, r) for r in ROUTES] + [
    ("pixart", True, "fused"), ("pixart", True, "opaque"), ("llama", False, "fused")])
def test_converted_model_recompiles_no_more_than_layernorm(name, fuse, route, monkeypatch):
    case, classes, model, inputs = _build(name)
    model.train()
    if name not in _LAYERNORM_LOGS:
        _LAYERNORM_LOGS[name] = _recompiles(name, copy.deepcopy(model), inputs, "torch")
    layernorm_log = _LAYERNORM_LOGS[name]
    assert layernorm_log[0] == ("first", 1) and layernorm_log[1] == ("same sizes", 0)
    converted = _convert(case, model, fuse_modulation=fuse)
    backend = _force(route, monkeypatch)
    assert _recompiles(name, converted, inputs, backend) == layernorm_log


# --------------------------------------------------------------------------------------------------
# 3. A compiled training step: forward, backward, AdamW, three times.
# --------------------------------------------------------------------------------------------------

LR, ADAM_EPS, STEPS = 1e-2, 1e-4, 3


def _vit_run():
    case, classes, model, _ = _build("timm_vit")
    model = _convert(case, model).train()
    _randomize_alphas_(model)
    batches = [case.inputs() for _ in range(STEPS)]
    return model, batches, lambda m, batch: main_output(m(**batch)).square().mean()


def _project_pixart_run():
    torch.manual_seed(0)
    model = randomize(tiny("pixart", "dyt", depth=1)).train()
    ids, mask = model.text_encoder.tokenizer(["9", "nine"])
    batches = [dict(x=torch.randn(2, 1, 16, 16), t=timesteps("pixart", 2), ids=ids, mask=mask) for _ in range(STEPS)]

    def loss(m, batch):
        cond = m.text_encoder.encode(batch["ids"], batch["mask"])
        return m(batch["x"], batch["t"], cond).square().mean()
    return model, batches, loss


def _train(model, batches, loss_fn, compiled: bool, backend: str):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.1)

    def step(batch):
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if compiled:   # backward inside: dynamo splits the step there (as for any model), no fullgraph
        step = torch.compile(step, backend="aot_eager")
    with use_backend(backend):
        return [step(batch) for batch in batches]


@pytest.mark.parametrize("run,route", [(_vit_run, r) for r in ROUTES] + [(_project_pixart_run, "fused")],
                         ids=[f"timm_vit-{r}" for r in ROUTES] + ["project_pixart-fused"])
def test_compiled_adamw_training_step_matches_eager(run, route, monkeypatch):
    """Three AdamW steps compiled whole against the same steps eager (torch backend: the parity baseline).

    Bound: a step moves a parameter by lr * m / (sqrt(v) + eps); a gradient error dg changes that by at
    most lr * |dg| / eps (ADAM_EPS = 1e-4 keeps that finite), and the
    update's own rounding adds a few fp32 eps of lr. The gradients of the two runs differ by at most
    2 x 64 fp32 eps of the largest gradient (each within test 1's bound of float64), so after STEPS steps
    |p_compiled - p_eager| <= STEPS * lr * (128 * eps32 * G / ADAM_EPS + 16 * eps32) + 2 * eps32 * |p|.
    A gradient the compiled graph dropped or got wrong moves a parameter by ~lr a step, 10x past that."""
    model, batches, loss_fn = run()
    probe = copy.deepcopy(model)   # G: the largest first-step gradient
    loss_fn(probe, batches[0]).backward()
    grad_scale = max(max_abs(p.grad) for p in probe.parameters() if p.grad is not None)
    eager = copy.deepcopy(model)
    eager_losses = _train(eager, batches, loss_fn, False, "torch")
    backend = _force(route, monkeypatch)
    torch._dynamo.reset()
    compiled = copy.deepcopy(model)
    compiled_losses = _train(compiled, batches, loss_fn, True, backend)
    per_step = LR * (128 * FP32_EPS * grad_scale / ADAM_EPS + 16 * FP32_EPS)
    assert STEPS * per_step < 0.5 * LR, "the bound must be able to see a wrong step"
    for (n, p), q, p0 in zip(compiled.named_parameters(), eager.parameters(), model.parameters()):
        tol = STEPS * per_step + 2 * FP32_EPS * max_abs(p0)
        assert max_abs_err(p, q) <= tol, (n, max_abs_err(p, q), tol)
    alphas = [(n, p, p0) for (n, p), p0 in zip(compiled.named_parameters(), model.parameters()) if n.endswith("alpha")]
    assert alphas and all(not torch.equal(p, p0) for _, p, p0 in alphas), "an alpha never trained"
    for got, want in zip(compiled_losses, eager_losses):   # the loss is a mean of squares: relative rounding
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------------------------------
# 4. Compiling before converting; model.compile(); inductor.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
@pytest.mark.parametrize("name", ["timm_vit", "pixart"])
def test_converting_a_compiled_model_recompiles_to_dyt(name, how):
    """torch.compile(model) (or model.compile()) first, then convert_layernorm_to_dyt (fuse_modulation for
    PixArt): the next call compiles once more and computes DyT, the eager converted model's result to the
    bit (the same plain ops, torch route), not the stale LayerNorm graph; every alpha gets its gradient."""
    case, classes, model, inputs = _build(name)
    torch._dynamo.reset()
    count = _Counting(then=None)
    if how == "model.compile":
        model.compile(backend=count, fullgraph=True)
        compiled = model
    else:
        compiled = torch.compile(model, backend=count, fullgraph=True)
    layernorm_out = main_output(compiled(**inputs)).detach()
    assert _convert(case, compiled, fuse_modulation=bool(case.fused)) is compiled
    _randomize_alphas_(model)
    out = main_output(compiled(**inputs))
    assert count.graphs == 2
    out.square().mean().backward()
    alphas = {n: p.grad for n, p in model.named_parameters() if n.endswith("alpha")}
    assert len(alphas) == sum(case.converted.values()) and all(g is not None and g.any() for g in alphas.values())
    eager = copy.deepcopy(model)
    eager._compiled_call_impl = None   # model.compile()'s: the copy runs eagerly
    with torch._dynamo.config.patch(disable=True):
        want = main_output(eager(**inputs))
    assert torch.equal(out.detach(), want.detach())
    assert not torch.allclose(out.detach(), layernorm_out)


def _dyt_of(x, norm):
    return torch.tanh(norm.alpha * x) * norm.weight + norm.bias


@pytest.mark.parametrize("where", ["a compiled norm inside the model", "the model is a compiled norm"])
def test_converting_a_compiled_norm_computes_dyt(where):
    torch.manual_seed(0)
    torch._dynamo.reset()
    x = torch.randn(3, 8)
    if where == "the model is a compiled norm":
        model = torch.compile(nn.LayerNorm(8), backend="aot_eager")
        model(x)
        model = convert_layernorm_to_dyt(model)
        norm, before = model._orig_mod, x
    else:
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        model[1] = torch.compile(model[1], backend="aot_eager")   # compiling one layer, regional compilation
        model(x)
        convert_layernorm_to_dyt(model)
        norm, before = model[1]._orig_mod, model[0](x)
    assert isinstance(norm, DyT)
    with torch.no_grad():
        norm.alpha.fill_(0.7)
    out = model(x)
    torch.testing.assert_close(out, _dyt_of(before, norm))   # the same fp32 formula: a few eps apart
    out.sum().backward()
    assert norm.alpha.grad is not None


# Inductor (slow to compile on two cores): the ViT on every route, PixArt with fused modulation on the GPU's
# default route, Llama on the opaque one. On CPU the triton_op custom ops reach inductor as their CPU
# implementation (reference.py); inductor's Triton code for them needs a GPU.
@pytest.mark.parametrize("name,fuse,route", [("timm_vit", False, r) for r in ROUTES] + [
    ("pixart", True, "fused"), ("llama", False, "opaque")])
def test_converted_model_under_inductor_matches_float64(name, fuse, route, monkeypatch):
    case, classes, model, inputs = _build(name)
    original = copy.deepcopy(model)
    converted = _convert(case, model, fuse_modulation=fuse)
    _randomize_alphas_(converted)
    ref, naive = _oracles(case, classes, original, converted, inputs)
    backend = _force(route, monkeypatch)
    torch._dynamo.reset()
    count = _Counting(then="inductor")
    with use_backend(backend):
        got = loss_and_grads(torch.compile(converted, backend=count, fullgraph=True), inputs, converted)
    assert count.graphs == 1
    _check_3way(f"{name} inductor ({route})", got, ref, naive)
