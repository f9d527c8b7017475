"""Review of the day's changes (7a73325..000492c): the custom-op route under TorchDispatchModes, the
TorchScript twins (__prepare_scriptable__), the converter's widened candidate test, load_pretrained_dyt's
transformers renaming, diffusers' fused-class naming and plain-call rule, param_groups and
dyt_parameter_names.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dyt_kernels import DyT, ModulatedDyT, convert_layernorm_to_dyt, dyt, dyt_modulate, dyt_parameter_names, use_backend
from float64_checks import dyt_formula, modulate_formula

B, L, D = 2, 3, 8


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _weighted_sum(outs):
    """A loss whose gradient differs per element (a plain .sum() hides a transposed gradient)."""
    outs = outs if isinstance(outs, tuple) else (outs,)
    return sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).reshape(o.shape)).sum() for o in outs)


def _run(call, inputs, mode):
    """outputs and gradients of call(*inputs) on the Triton backend, under a pass-through mode or not."""
    ins = _leaves(*inputs)
    with use_backend("triton"):
        if mode:
            with _PassThrough():
                outs = call(*ins)
                grads = torch.autograd.grad(_weighted_sum(outs), [t for t in ins if t is not None])
        else:
            outs = call(*ins)
            grads = torch.autograd.grad(_weighted_sum(outs), [t for t in ins if t is not None])
    return (outs if isinstance(outs, tuple) else (outs,)), grads


# --------------------------------------------------------------------------------------------------
# 1. The custom-op route under a TorchDispatchMode (functional._dispatch_modes, ops/library.py)
# --------------------------------------------------------------------------------------------------

def _dyt_cases():
    r = torch.randn
    nhwc = r(2, 4, 3, 3).to(memory_format=torch.channels_last)
    return {
        "bf16 x, fp32 params, alpha per channel": (lambda x, a, w, b: dyt(x, a, w, b),
                                                   (r(B, L, D).bfloat16(), r(D), r(D), r(D))),
        "fp16 params": (lambda x, a, w, b: dyt(x, a, w, b), (r(B, L, D), r(1).half(), r(D).half(), r(D).half())),
        "transposed x, no affine": (lambda x, a: dyt(x.transpose(0, 1), a), (r(L, B, D), r(1))),
        "NHWC-stored channels-first": (lambda x, a, w, b: dyt(x, a, w, b, channels_last=False),
                                       (nhwc, r(4), r(4), r(4))),
        "5-D channels-first": (lambda x, a, w: dyt(x, a, w, channels_last=False), (r(1, 4, 2, 2, 2), r(1), r(4))),
        "empty": (lambda x, a, w, b: dyt(x, a, w, b), (r(0, D), r(1), r(D), r(D))),
    }


def _mod_cases():
    r = torch.randn
    expanded = r(B, 1, D).expand(B, L, D)
    return {
        "per-token shift, bf16 x on an fp32 residual (dres != dx)": (
            lambda x, sh, sc, res, g: dyt_modulate(x, torch.tensor([0.7], device=x.device), sh, sc,
                                                   residual=res, gate=g),
            (r(B, L, D).bfloat16(), r(B, L, D), r(B, D), r(B, L, D), r(B, 1, D))),
        "residual without gate (dres is dx)": (
            lambda x, sh, sc, res, w, b: dyt_modulate(x, torch.tensor([0.7], device=x.device), sh, sc, w, b,
                                                      residual=res),
            (r(B, L, D), r(B, 1, D), r(B, L, D), r(B, L, D), r(D), r(D))),
        "expanded modulations": (
            lambda x, sh, sc: dyt_modulate(x, torch.tensor([0.7], device=x.device), sh, sc),
            (r(B, L, D), expanded, expanded.clone().expand(B, L, D))),
        "per-token empty L": (
            lambda x, sh, sc, res: dyt_modulate(x, torch.tensor([0.7], device=x.device), sh, sc, residual=res),
            (r(B, 0, D), r(B, 0, D), r(B, 0, D), r(B, 0, D))),
        "bf16 residual stream, alpha per channel": (
            lambda x, a, sh, sc, res, g: dyt_modulate(x, a, sh, sc, residual=res, gate=g),
            (r(B, L, D), r(D), r(B, D), r(B, D), r(B, L, D).bfloat16(), r(B, D))),
    }


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("case", list(_dyt_cases()) + list(_mod_cases()))
def test_mode_route_equals_the_plain_route_to_the_bit(case):
    """Outputs (values, dtypes, strides) and every gradient through the custom ops under a mode equal the
    eager Functions' (held to float64 by test_layouts / test_modulate): both launch the same kernels."""
    call, inputs = {**_dyt_cases(), **_mod_cases()}[case]
    outs, grads = _run(call, inputs, mode=False)
    outs_m, grads_m = _run(call, inputs, mode=True)
    for a, b in zip((*outs, *grads), (*outs_m, *grads_m)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


@pytest.mark.usefixtures("on_device")
def test_no_grad_inference_mode_nested_modes_and_a_mode_between_forward_and_backward():
    x, a, w, b = torch.randn(B, L, D), torch.tensor([0.6]), torch.randn(D), torch.randn(D)
    with use_backend("triton"):
        want = dyt(x, a, w, b)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx(), _PassThrough():
                got = dyt(x, a, w, b)
            assert torch.equal(got, want) and not got.requires_grad
        xs = _leaves(x, a, w, b)
        g0 = torch.autograd.grad(_weighted_sum(dyt(*xs)), xs)
        y = dyt(*xs)
        with _PassThrough():        # forward plain, backward under a mode
            g1 = torch.autograd.grad(_weighted_sum(y), xs)
        with _PassThrough():        # forward under a mode, backward plain
            y = dyt(*xs)
        g2 = torch.autograd.grad(_weighted_sum(y), xs)
        with _PassThrough(), _PassThrough():
            g3 = torch.autograd.grad(_weighted_sum(dyt(*xs)), xs)
    for g in (g1, g2, g3):
        assert all(torch.equal(p, q) for p, q in zip(g0, g))


def _penalty_dyt(x, a, w, b, op):
    """d/d(params) of |d(sum y^2)/dx|^2: a gradient penalty (WGAN-GP, R1), create_graph=True."""
    y = op(x, a, w, b)
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), (a, w, b))


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("mode", [FlopCounterMode, _PassThrough])
def test_gradient_penalty_under_a_dispatch_mode(mode):
    torch.manual_seed(0)
    x, a, w, b = _leaves(torch.randn(B, L, D), torch.tensor([0.6]), torch.randn(D), torch.randn(D))
    want = _penalty_dyt(*_leaves(x.double(), a.double(), w.double(), b.double()), dyt_formula)
    with use_backend("triton"):
        plain = _penalty_dyt(x, a, w, b, dyt)
        with (mode(display=False) if mode is FlopCounterMode else mode()):
            got = _penalty_dyt(x, a, w, b, dyt)
    # fp32 second derivatives of O(1) terms summed over B*L*D = 48 elements: |err| <~ 48 * 1e-6 * max|g|
    for p, g, g64 in zip(plain, got, want):
        tol = 1e-4 * max(1.0, g64.abs().max().item())
        torch.testing.assert_close(p.double(), g64, rtol=0, atol=tol)
        torch.testing.assert_close(g.double(), g64, rtol=0, atol=tol)


@pytest.mark.usefixtures("on_device")
def test_modulate_gradient_penalty_under_a_dispatch_mode():
    torch.manual_seed(0)
    ins = (torch.randn(B, L, D), torch.tensor([0.6]), torch.randn(B, D), torch.randn(B, L, D), torch.randn(B, L, D),
           torch.randn(B, D))

    def penalty(op, x, a, sh, sc, res, g):
        h, r = op(x, a, sh, sc, residual=res, gate=g)
        gx, = torch.autograd.grad(h.square().sum() + r.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (a, sh, sc, res, g))

    def formula(x, a, sh, sc, residual, gate):
        return modulate_formula(x, a, sh, sc, residual=residual, gate=gate)

    want = penalty(formula, *_leaves(*(t.double() for t in ins)))
    with use_backend("triton"), _PassThrough():
        got = penalty(dyt_modulate, *_leaves(*ins))
    # as above: fp32 second derivatives of O(1) terms over 48 elements
    for g, g64 in zip(got, want):
        torch.testing.assert_close(g.double(), g64, rtol=0, atol=1e-4 * max(1.0, g64.abs().max().item()))


# --------------------------------------------------------------------------------------------------
# 2. TorchScript twins (modules.__prepare_scriptable__)
# --------------------------------------------------------------------------------------------------

def _scripted(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit.script's deprecation warning
        return torch.jit.script(module)


def _grads_of(module, args):
    ins = _leaves(*args)
    for p in module.parameters():
        p.grad = None
    outs = module(*ins)
    _weighted_sum(outs).backward()
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [o.detach() for o in outs] + [t.grad for t in ins if t is not None] + [p.grad.clone()
                                                                                  for p in module.parameters()]


def _randomized(module):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.3, 1.5)
    return module


def _twin_cases():
    r = torch.randn
    return {
        "multi-dim normalized_shape, alpha per channel": (DyT((4, 3), alpha_per_channel=True), (r(2, 5, 4, 3),)),
        "channels-first 5-D, bf16 params": (DyT(4, channels_last=False, alpha_per_channel=True,
                                                dtype=torch.bfloat16), (r(2, 4, 2, 3, 2),)),
        "channels-first NHWC": (DyT(4, channels_last=False), (r(2, 4, 3, 3).to(memory_format=torch.channels_last),)),
        "float64 x, fp32 params": (DyT(8), (r(B, L, D, dtype=torch.float64),)),
        "modulated per-token, fp32 residual, gate": (ModulatedDyT(D, elementwise_affine=True),
                                                     (r(B, L, D), r(B, L, D), r(B, 1, D), r(B, L, D), r(B, D))),
        "modulated bf16 x, float64 residual": (ModulatedDyT(D), (r(B, L, D).bfloat16(), r(B, D), r(B, D),
                                                                 r(B, L, D, dtype=torch.float64), r(B, L, D))),
    }


@pytest.mark.parametrize("case", list(_twin_cases()))
def test_scripted_twin_gradients_equal_the_torch_backend(case):
    """Gradients through the scripted module (parameters included) against eager's torch backend: the same
    fp32 (float64) formulas, autograd of the ops vs the explicit VJP, so only fp32 reassociation differs."""
    module, args = _twin_cases()[case]
    module = _randomized(module)
    with use_backend("torch"):
        want = _grads_of(module, args)
    got = _grads_of(_scripted(module), args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        # one fp32 rounding of a sum of <= 60 O(1) terms apart: 60 * 2^-24 * max|w| ~ 4e-6 * max|w|;
        # bf16 results: one bf16 ulp (2^-8 relative)
        rel = 2.0 ** -8 if w.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=rel * max(1.0, w.double().abs().max().item()))


def test_scripted_twin_shares_the_parameters_and_trains_the_original():
    norm = DyT(8)
    scripted = _scripted(norm)
    assert {id(p) for p in scripted.parameters()} == {id(p) for p in norm.parameters()}
    opt = torch.optim.SGD(scripted.parameters(), lr=0.5)
    _weighted_sum(scripted(torch.randn(4, 8))).backward()
    before = norm.weight.detach().clone()
    opt.step()
    assert norm.weight.grad is not None and not torch.equal(norm.weight.detach(), before)


def test_scripted_twin_gradients_on_a_bf16_residual_stream():
    torch.manual_seed(0)
    module = _randomized(ModulatedDyT(D, elementwise_affine=True))
    args = (torch.randn(B, 4, D), torch.randn(B, D), torch.randn(B, D), torch.randn(B, 4, D).bfloat16(),
            torch.randn(B, D))
    with use_backend("torch"):
        want = _grads_of(module, args)
    got = _grads_of(_scripted(module), args)
    for g, w in zip(got, want):
        # as above: fp32 results one fp32 rounding of short sums apart, bf16 ones one bf16 ulp
        rel = 2.0 ** -8 if w.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=rel * max(1.0, w.double().abs().max().item()))


def test_scripted_modulated_twin_refuses_a_gate_without_residual():
    module = ModulatedDyT(D)
    args = (torch.randn(B, L, D), torch.randn(B, D), torch.randn(B, D), None, torch.randn(B, D))
    with pytest.raises(ValueError):
        module(*args)
    with pytest.raises(Exception, match="residual"):
        _scripted(module)(*args)


@pytest.mark.parametrize("bad", ["residual (B, 1, D)", "shift (1, 1, D)", "gate (1, 1, D)"])
def test_scripted_modulated_twin_refuses_shapes_eager_refuses(bad):
    x, sh, sc, res, g = torch.randn(B, L, D), torch.randn(B, D), torch.randn(B, D), torch.randn(B, L, D), None
    if bad == "residual (B, 1, D)":
        res = torch.randn(B, 1, D)
    elif bad == "shift (1, 1, D)":
        sh = torch.randn(1, 1, D)
    else:
        g = torch.randn(1, 1, D)
    module = ModulatedDyT(D)
    with pytest.raises(ValueError):
        module(x, sh, sc, res, g)
    with pytest.raises(Exception):
        _scripted(module)(x, sh, sc, res, g)


def test_scripted_twins_refuse_an_integer_x():
    x = torch.ones(B, L, D, dtype=torch.int64)
    for module, args in ((DyT(D), (x,)), (ModulatedDyT(D), (x, torch.zeros(B, D), torch.zeros(B, D)))):
        with pytest.raises(TypeError):
            module(*args)
        with pytest.raises(Exception):
            _scripted(module)(*args)


# --------------------------------------------------------------------------------------------------
# 3. convert.py's widened candidate test, checkpoint.py's transformers renaming
# --------------------------------------------------------------------------------------------------

def test_a_head_named_after_its_model_is_not_warned_about():
    tf = pytest.importorskip("transformers")
    config = tf.RobertaPreLayerNormConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=24)
    model = tf.RobertaPreLayerNormForMaskedLM(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert_layernorm_to_dyt(model)
    assert isinstance(model.lm_head.layer_norm, DyT)   # the head's own LayerNorm is converted
    assert not [w for w in caught if "left" in str(w.message)], [str(w.message) for w in caught]


def test_a_star_norm_container_with_a_weight_is_still_probed_and_converted():
    """The widened test's purpose: a *Norm with children and its own weight (timm's RmsNormAct shape) is
    converted when it computes a LayerNorm, its children (here Identity) included."""
    class ScaledLayerNormAct(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.bias = nn.Parameter(torch.zeros(d))
            self.act = nn.Identity()
            self.normalized_shape = (d,)

        def forward(self, x):
            return self.act(nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1e-5))

    model = convert_layernorm_to_dyt(nn.Sequential(nn.Linear(8, 8), ScaledLayerNormAct(8)))
    assert isinstance(model[1], DyT)


@pytest.mark.parametrize("saved, loaded", [("ViTModel", "ViTForImageClassification"),
                                           ("ViTForImageClassification", "ViTModel")])
def test_load_pretrained_dyt_between_base_and_head_vit(saved, loaded, tmp_path):
    """_transformers_renamed, then _match_prefix: every alpha lands, base model saved and head model loaded
    and the reverse (ViT's checkpoints are written under encoder.layer.N, its modules are layers.N)."""
    tf = pytest.importorskip("transformers")
    from dyt_kernels import load_pretrained_dyt
    config = tf.ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=8, patch_size=4, num_labels=3)
    model = convert_layernorm_to_dyt(getattr(tf, saved)(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.1, 2.0)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = load_pretrained_dyt(getattr(tf, loaded), str(tmp_path))

    def alphas(m):
        return {n.removeprefix("vit."): p.detach() for n, p in m.named_parameters() if n.endswith("alpha")}
    want, have = alphas(model), alphas(got)
    assert want.keys() == have.keys() and len(want) == 5
    assert all(torch.equal(want[k], have[k]) for k in want)


# --------------------------------------------------------------------------------------------------
# 4. diffusers integration: _called_plainly, _name_fused_classes
# --------------------------------------------------------------------------------------------------

def test_called_plainly_bound_method_rule():
    pytest.importorskip("diffusers")
    from dyt_kernels.integrations.diffusers import _called_plainly

    class Norm(nn.LayerNorm):
        def other(self, x):
            return x * 2

    norm, twin = Norm(4), Norm(4)
    assert _called_plainly(norm)
    norm.forward = norm.forward                     # what removing accelerate's hook leaves: plain again
    assert _called_plainly(norm)
    norm.forward = norm.other                       # another method of the same class
    assert not _called_plainly(norm)
    norm.forward = twin.forward                     # the class's forward bound to another instance
    assert not _called_plainly(norm)
    norm.forward = functools.partial(Norm.forward, norm)   # a wrapper (accelerate's own form)
    assert not _called_plainly(norm)
    norm.forward = nn.LayerNorm.forward.__get__(norm)      # the base class's forward, which Norm inherits
    assert _called_plainly(norm)


def test_name_fused_classes_tuples_class_lists_and_repeats():
    pytest.importorskip("diffusers")
    from dyt_kernels.integrations.diffusers import _name_fused_classes

    class Model(nn.Module):
        _no_split_modules = ["Block", "Other"]
        _repeated_blocks = ("Block",)

    model = Model()
    _name_fused_classes(model, {"Block": "FusedBlock"})
    _name_fused_classes(model, {"Block": "FusedBlock"})   # twice: no duplicate
    assert model._no_split_modules == ["Block", "Other", "FusedBlock"]
    assert list(model._repeated_blocks) == ["Block", "FusedBlock"]
    assert Model._no_split_modules == ["Block", "Other"] and Model._repeated_blocks == ("Block",)


# --------------------------------------------------------------------------------------------------
# 5. dyt_parameter_names, training.loop.param_groups
# --------------------------------------------------------------------------------------------------

def test_dyt_parameter_names_with_a_module_listed_twice_and_a_tied_parameter():
    norm = DyT(4)
    linear = nn.Linear(4, 4)
    model = nn.ModuleList([norm, linear, norm])
    assert dyt_parameter_names(model) == ["0.alpha", "0.weight", "0.bias"]
    other = nn.Module()
    other.scale = norm.weight                       # tied: named under its first owner only
    model = nn.ModuleList([other, norm])
    names = dyt_parameter_names(model)
    assert sorted(names) == ["0.scale", "1.alpha", "1.bias"]
    assert {n for n, _ in model.named_parameters()} == set(names)


def test_param_groups_with_only_norm_parameters_and_multi_dim_dyt():
    from training.loop import param_groups

    model = nn.Sequential(DyT((4, 3), alpha_per_channel=True), nn.Linear(3, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model[1].weight)}   # DyT's 2-D weight is not decayed
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in (*model[0].parameters(), model[1].bias)}
    only_norms = nn.Sequential(DyT(4))
    opt = torch.optim.AdamW(param_groups(only_norms, 0.1), lr=1e-2)   # an empty decay group is accepted
    only_norms(torch.randn(2, 4)).square().sum().backward()
    opt.step()
    assert [len(g["params"]) for g in opt.param_groups] == [0, 3]
