"""convert_layernorm_to_dyt and what comes with it: models nobody here wrote (timm, diffusers,
transformers, torch), fused adaLN for diffusers, checkpoints, inference folding.

The oracle for a converted model is a copy of the original whose norms compute DyT by a formula
written here, over the dim this file says each norm class normalizes (library_models.CASES), run in
float64. The converted model in fp32 must be as close to it as the same hand-built copy run in fp32
(three-way check, helpers.assert_close_3way).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from dyt_kernels import (DyT, DyTCheckpointWarning, conversion_report, convert_layernorm_to_dyt, fold_dyt_affine,
                         load_dyt_state_dict, load_pretrained_dyt, use_backend)
from dyt_kernels.backend import INTERPRETER
from helpers import FP32_EPS, assert_close_3way, max_abs, max_abs_err
from library_models import (CASES, loss_and_grads, model_atol, cast_inputs, dyt_formula, hand_built_dyt, main_output, randomize_,
                            randomize_norms_)

# --------------------------------------------------------------------------------------------------
# The basics: what is kept, on torch's own modules.
# --------------------------------------------------------------------------------------------------

LAYERNORM = {nn.LayerNorm: -1}

def tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64)


def tiny_encoder():
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(32), enable_nested_tensor=False)


def _compare_models(converted, hand, inp, backend, tol):
    with use_backend(backend):
        out = converted(inp)
        out.square().mean().backward()
    want = hand(inp)
    want.square().mean().backward()
    torch.testing.assert_close(out, want, **tol)
    hand_params = dict(hand.named_parameters())
    got_params = dict(converted.named_parameters())
    assert set(got_params) == set(hand_params)
    for name, p in got_params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, hand_params[name].grad, **tol, msg=name)


# The converted model runs the same fp32 math as the hand-built one except the tanh form (<= 2 fp32
# eps apart per element on the Triton path) and op order; through two attention blocks that stays
# around 1e-6 relative. rtol 1e-4 / atol 1e-5 is far below a wrong alpha/weight/bias (O(1e-1)).
MODEL_TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_convert_vision_transformer(backend, device):
    model = randomize_(tiny_vit(), scale=0.2).to(device)
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert n_ln == 5
    hand = hand_built_dyt(model, LAYERNORM)
    assert convert_layernorm_to_dyt(model) is model
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert sum(isinstance(m, DyT) for m in model.modules()) == n_ln
    _compare_models(model, hand, torch.randn(2, 3, 32, 32, device=device), backend, MODEL_TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_convert_transformer_encoder(backend, device):
    model = randomize_(tiny_encoder(), scale=0.2).to(device)
    hand = hand_built_dyt(model, LAYERNORM)
    convert_layernorm_to_dyt(model)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert sum(isinstance(m, DyT) for m in model.modules()) == 5
    _compare_models(model, hand, torch.randn(2, 7, 32, device=device), backend, MODEL_TOL)


def test_convert_encoder_inference_fast_path_is_not_taken(device):
    """nn.TransformerEncoderLayer in eval + no_grad has a fused path that hard-codes LayerNorm math
    with norm1.eps; DyT's NaN eps must make it fall back to the modules, so the DyT result comes out."""
    model = randomize_(tiny_encoder(), scale=0.2).to(device).eval()
    hand = hand_built_dyt(model, LAYERNORM).eval()
    convert_layernorm_to_dyt(model)
    src = torch.randn(2, 7, 32, device=device)
    want = hand(src).detach()  # grad enabled + parameters requiring grad: the slow, module path
    with torch.no_grad():
        got = model(src)
    torch.testing.assert_close(got, want, **MODEL_TOL)
    # The check has teeth: with equal (non-NaN) eps the fast path is taken and computes LayerNorm.
    for layer in model.layers:
        layer.norm1.eps = layer.norm2.eps = 1e-5
    with torch.no_grad():
        fast = model(src)
    assert max_abs_err(fast, want) > 1e-2, "this torch took no fast path; the NaN-eps guard went untested"


@pytest.mark.parametrize("copy_affine", [True, False])
def test_convert_copy_affine(copy_affine, device):
    model = nn.Sequential(nn.Linear(8, 8), randomize_(nn.LayerNorm(8)), nn.ReLU()).to(device)
    old = model[1]
    convert_layernorm_to_dyt(model, copy_affine=copy_affine, alpha_init_value=0.25)
    new = model[1]
    assert isinstance(new, DyT) and new.alpha.item() == 0.25
    if copy_affine:
        assert torch.equal(new.weight, old.weight) and torch.equal(new.bias, old.bias)
    else:
        assert torch.equal(new.weight, torch.ones(8, device=device))
        assert torch.equal(new.bias, torch.zeros(8, device=device))
    assert new.weight is not old.weight  # fresh parameters, not aliases of the old module's


def test_convert_preserves_requires_grad(device):
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8)).to(device)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    convert_layernorm_to_dyt(model)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert model[2].weight.requires_grad and not model[2].bias.requires_grad
    assert model[0].alpha.requires_grad and model[2].alpha.requires_grad


def test_convert_preserves_device_and_dtype(device):
    model = randomize_(tiny_vit()).to(device=device, dtype=torch.bfloat16)
    convert_layernorm_to_dyt(model)
    norms = [m for m in model.modules() if isinstance(m, DyT)]
    assert len(norms) == 5
    for m in norms:
        for p in m.parameters():
            assert p.dtype == torch.bfloat16 and p.device.type == torch.device(device).type
    out = model(torch.randn(2, 3, 32, 32, device=device, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_convert_affine_free_norm_follows_the_model(device):
    """A LayerNorm with no parameters takes its device/dtype from the surrounding model."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False)).to(device, torch.float16)
    convert_layernorm_to_dyt(model)
    assert model[1].weight is None and model[1].bias is None
    assert model[1].alpha.dtype == torch.float16 and model[1].alpha.device.type == torch.device(device).type
    no_bias = convert_layernorm_to_dyt(nn.LayerNorm(8, bias=False, device=device))
    assert no_bias.weight is not None and no_bias.bias is None


def test_convert_preserves_train_eval_mode(device):
    model = nn.Sequential(nn.LayerNorm(4), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))).to(device)
    model[1].eval()
    convert_layernorm_to_dyt(model)
    assert model[0].training and not model[1][1].training
    model.eval()
    assert not convert_layernorm_to_dyt(model)[0].training


@pytest.mark.parametrize("include_rmsnorm", [False, True])
def test_convert_rmsnorm(include_rmsnorm, device):
    model = nn.Sequential(nn.Linear(8, 8), randomize_(nn.RMSNorm(8)), nn.LayerNorm(8),
                          nn.RMSNorm(8, elementwise_affine=False)).to(device)
    hand = hand_built_dyt(model, {nn.LayerNorm: -1, nn.RMSNorm: -1} if include_rmsnorm else LAYERNORM)
    old_w = model[1].weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_layernorm_to_dyt(model, include_rmsnorm=include_rmsnorm)
    assert isinstance(model[2], DyT)
    if include_rmsnorm:
        assert isinstance(model[1], DyT) and isinstance(model[3], DyT)
        assert torch.equal(model[1].weight, old_w) and model[1].bias is None
        assert model[3].weight is None and model[3].bias is None
    else:
        assert isinstance(model[1], nn.RMSNorm) and isinstance(model[3], nn.RMSNorm)
        assert any("include_rmsnorm=True" in str(w.message) for w in caught), "left alone without a word"
    x = torch.randn(3, 8, device=device)
    # Same fp32 formula both ways; only the CPU tanh vs libm differ by ~1 ulp.
    torch.testing.assert_close(model(x), hand(x), rtol=1e-5, atol=1e-6)


def test_convert_model_that_is_a_norm(device):
    ln = randomize_(nn.LayerNorm((4, 8), device=device)).eval()
    new = convert_layernorm_to_dyt(ln, alpha_init_value=0.7)
    assert isinstance(new, DyT) and new is not ln and not new.training
    assert new.normalized_shape == (4, 8) and new.alpha.item() == pytest.approx(0.7)
    assert torch.equal(new.weight, ln.weight) and torch.equal(new.bias, ln.bias)
    x = torch.randn(3, 4, 8, device=device)
    want = dyt_formula(x.reshape(3, -1), new.alpha, ln.weight.reshape(-1), ln.bias.reshape(-1)).reshape(x.shape)
    torch.testing.assert_close(new(x), want, rtol=1e-5, atol=1e-6)
    rms = convert_layernorm_to_dyt(nn.RMSNorm(8, device=device), include_rmsnorm=True)
    assert isinstance(rms, DyT)
    with pytest.warns(UserWarning, match="include_rmsnorm"):
        assert isinstance(convert_layernorm_to_dyt(nn.RMSNorm(8)), nn.RMSNorm)


def test_convert_shared_norm_instance(device):
    """A LayerNorm instance used at two places (weight tying): both places are converted, to one DyT."""
    ln = nn.LayerNorm(8)
    model = nn.Sequential(nn.Linear(8, 8), ln, nn.Linear(8, 8), ln).to(device)
    convert_layernorm_to_dyt(model)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules()), f"a LayerNorm survived: {model}"
    assert model[1] is model[3], "the shared norm was split into independent DyT modules"


def test_convert_norm_shared_across_parents(device):
    ln = nn.LayerNorm(8)
    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(8, 8), ln), "b": nn.Sequential(ln)}).to(device)
    convert_layernorm_to_dyt(model)
    assert isinstance(model["a"][1], DyT) and isinstance(model["b"][0], DyT)
    assert model["a"][1] is model["b"][0], "the shared norm was split into independent DyT modules"


def test_convert_keeps_parameters_tied_between_norm_instances(device):
    """Two LayerNorm instances holding one weight and one bias Parameter (tied by assignment, as a
    model shares a norm's affine between branches). Before, each DyT got its own copy: equal at
    conversion, then trained apart, with nothing said."""
    a, b = randomize_(nn.LayerNorm(8)), nn.LayerNorm(8)
    b.weight, b.bias = a.weight, a.bias
    model = convert_layernorm_to_dyt(nn.Sequential(a, nn.Linear(8, 8), b).to(device))
    assert model[0] is not model[2] and model[0].alpha is not model[2].alpha
    assert model[0].weight is model[2].weight and model[0].bias is model[2].bias
    assert len(list(model.parameters())) == 2 + 2 + 2        # 2 alphas, the tied pair, the Linear's
    torch.testing.assert_close(model[0].weight, a.weight.to(device), rtol=0, atol=0)


class NormsAlsoInAPlainList(nn.Module):
    """Its forward reaches the norms through a plain Python list (not a ModuleList) and an attribute set
    with object.__setattr__ (unregistered), as well as through their registered names."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.LayerNorm(8), nn.LayerNorm(8)
        self.in_order = [self.a, self.b]
        object.__setattr__(self, "last", self.b)

    def forward(self, x):
        for norm in self.in_order:
            x = norm(x)
        return self.last(x)


def test_convert_rebinds_plain_references_to_a_converted_norm(device):
    """Before: the registered slots became DyT, the report said 2 converted, and forward still ran the
    old LayerNorms through the list and the attribute: a LayerNorm model training unused DyT parameters."""
    model = convert_layernorm_to_dyt(randomize_(NormsAlsoInAPlainList()).to(device))
    assert isinstance(model.a, DyT) and isinstance(model.b, DyT)
    assert model.in_order[0] is model.a and model.in_order[1] is model.b and model.last is model.b
    x = torch.randn(3, 8, device=device)
    want = model.b(model.b(model.a(x)))
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert_layernorm_to_dyt(lambda x: x)


# --------------------------------------------------------------------------------------------------
# Models nobody here wrote: timm, diffusers, transformers, torch.
# --------------------------------------------------------------------------------------------------

def _build_case(name: str, seed: int = 0):
    case = CASES[name]
    torch.manual_seed(seed)
    classes = case.channel_dims()
    model = randomize_norms_(case.build(), classes).eval()
    torch.manual_seed(seed + 1)
    return case, classes, model, case.inputs()


def _convert(case, model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # these models hold no norm the converter leaves alone
        return convert_layernorm_to_dyt(model, include_rmsnorm=case.include_rmsnorm, **kwargs)


def _check_against_oracle(label, case, classes, model, hand, hand64, inputs, backend="torch"):
    with use_backend(backend):
        out, grads = loss_and_grads(model, inputs, model)
    naive, naive_grads = loss_and_grads(hand, inputs, hand)
    ref, ref_grads = loss_and_grads(hand64, cast_inputs(inputs, torch.float64), hand64)
    assert_close_3way(f"{label} output", out, ref, naive, model_atol(ref))
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for n, g in grads.items():
        ref_g, naive_err = ref_grads[n], max_abs_err(naive_grads[n], ref_grads[n])
        # A gradient that is zero in exact math (an attention key bias: softmax ignores a shift of every
        # key) comes out of any fp32 run as pure rounding noise, whose size depends on the order of the
        # sums; there the tested run is held to 8x the naive run's noise instead of 2x.
        factor = 8.0 if max_abs(ref_g) <= 100 * naive_err else 2.0
        assert_close_3way(f"{label} d {n}", g, ref_g, naive_grads[n], model_atol(ref_g), factor=factor)


@pytest.mark.parametrize("name", list(CASES))
def test_library_model_matches_float64_dyt(name):
    """Forward, backward and one optimizer step (built after converting) against the float64 oracle."""
    case, classes, model, inputs = _build_case(name)
    hand, hand64 = hand_built_dyt(model, classes), hand_built_dyt(model, classes).double()
    report = conversion_report(model, include_rmsnorm=case.include_rmsnorm)
    assert dict(report.converted) == case.converted and not report.left_alone
    _convert(case, model)
    assert not any(type(m) in classes for m in model.modules()), "a norm survived"
    dyts = [m for m in model.modules() if isinstance(m, DyT)]
    assert len(dyts) == sum(case.converted.values())
    if name == "timm_convnext":  # channels-first norms, including the 16-wide maps with 16 channels
        assert all(not m.channels_last for m in dyts)
    _check_against_oracle(name, case, classes, model, hand, hand64, inputs)

    # One Adam step on each (its first step moves every parameter with a gradient by about lr, however
    # small the gradient), the optimizer built after conversion so it holds the DyT parameters.
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, hand, hand64)]
    for opt in optimizers:
        opt.step()
    held = {id(p) for group in optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in held for m in dyts for p in m.parameters())
    # (An alpha whose gradient is ~0 barely moves: SD3's last context query norm feeds a discarded output.)
    moved = [not torch.equal(m.alpha, torch.full_like(m.alpha, 0.5)) for m in dyts if m.alpha.grad.abs().max() > 1e-6]
    assert moved and all(moved), "an alpha with a gradient never moved"
    # Grad mode on: under no_grad the hand-built torch encoder would take its fused LayerNorm fast path.
    with use_backend("torch"):
        out = main_output(model(**inputs)).detach()
    naive, ref = main_output(hand(**inputs)).detach(), main_output(hand64(**cast_inputs(inputs, torch.float64)))
    assert_close_3way(f"{name} output after a step", out, ref, naive, model_atol(ref))


@pytest.mark.skipif(not INTERPRETER, reason="runs the kernels on CPU tensors through the Triton interpreter "
                    "(with a GPU, TRITON_INTERPRET is unset and the Triton backend refuses CPU tensors)")
@pytest.mark.parametrize("name,fuse", [("timm_convnext", False), ("pixart", True), ("dit", True), ("llama", False)])
def test_library_model_on_triton_interpreter(name, fuse):
    case, classes, model, inputs = _build_case(name)
    if name == "timm_convnext":  # 32x32 images: a quarter of the interpreter's programs (9 s -> 1 s)
        inputs = {"x": torch.randn(2, 3, 32, 32)}
    hand, hand64 = hand_built_dyt(model, classes), hand_built_dyt(model, classes).double()
    _convert(case, model, fuse_modulation=fuse)
    _check_against_oracle(name, case, classes, model, hand, hand64, inputs, backend="triton")


# --------------------------------------------------------------------------------------------------
# fuse_modulation: diffusers' adaLN chains through dyt_modulate.
# --------------------------------------------------------------------------------------------------

# dyt_modulate calls one forward makes once fused: per fused module, one (two for SD3.5's ZeroX).
FUSED_CALLS = {"pixart": 2, "dit": 2, "flux": 4, "sd3": 6}


def _randomize_alphas_(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DyT):
                m.alpha.uniform_(0.3, 1.5)


@pytest.mark.parametrize("name", list(FUSED_CALLS))
def test_fuse_modulation_equals_unfused(name, monkeypatch):
    diffusers_integration = pytest.importorskip("dyt_kernels.integrations.diffusers")
    case, classes, model, inputs = _build_case(name)
    _convert(case, model)
    _randomize_alphas_(model)
    fused = copy.deepcopy(model)
    assert dict(diffusers_integration.fuse_modulation(fused)) == case.fused
    calls = []
    real = diffusers_integration.dyt_modulate
    monkeypatch.setattr(diffusers_integration, "dyt_modulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    with use_backend("torch"):
        out, grads = loss_and_grads(model, inputs, model)
        assert not calls
        out_f, grads_f = loss_and_grads(fused, inputs, fused)
    assert len(calls) == FUSED_CALLS[name], "the fused forwards did not run"
    # Same fp32 expressions in the same order: the outputs agree to the bit. The backward sums dscale,
    # dshift and dalpha in another order than autograd does: a few fp32 eps of the largest term.
    assert torch.equal(out_f, out)
    assert set(grads_f) == set(grads)
    for n, g in grads.items():
        torch.testing.assert_close(grads_f[n], g, rtol=1e-5, atol=16 * FP32_EPS * max_abs(g), msg=n)


def test_convert_fuse_modulation_reports_and_logs(caplog):
    case, classes, model, inputs = _build_case("dit")
    with caplog.at_level("INFO", logger="dyt_kernels.convert"):
        _convert(case, model, fuse_modulation=True)
    assert "converted to DyT: 3 LayerNorm" in caplog.text
    assert "fused into dyt_modulate: 1 AdaLayerNormZero, 1 BasicTransformerBlock" in caplog.text
    from diffusers.models.attention import BasicTransformerBlock

    block = model.transformer_blocks[0]
    assert type(block).__name__ == "FusedBasicTransformerBlock" and isinstance(block, BasicTransformerBlock)


def test_fused_block_falls_back_where_it_does_not_apply():
    """A block with feed-forward chunking runs diffusers' own (unfused) forward, with the same result."""
    case, classes, model, inputs = _build_case("pixart")
    _convert(case, model)
    unfused = copy.deepcopy(model)
    _convert(case, model, fuse_modulation=True)
    for m in (model, unfused):
        m.transformer_blocks[0].set_chunk_feed_forward(4, dim=1)
    with torch.no_grad(), use_backend("torch"):
        torch.testing.assert_close(main_output(model(**inputs)), main_output(unfused(**inputs)), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# torch.compile (torch backend on CPU: the interpreter's Triton path cannot be traced, docs/DESIGN.md).
# --------------------------------------------------------------------------------------------------

# aot_eager traces forward and backward through dynamo and AOTAutograd (where a custom op's fake
# implementation or a swapped class would break) without inductor's C++ build (40 s for the tiny PixArt
# on two cores); one case runs inductor.
COMPILE_CASES = [(name, "aot_eager") for name in CASES] + [("bert", "inductor")]


@pytest.mark.parametrize("name,compiler", COMPILE_CASES)
def test_compiled_converted_model_matches_eager(name, compiler):
    case, classes, model, inputs = _build_case(name)
    _convert(case, model, fuse_modulation=name in FUSED_CALLS)
    _randomize_alphas_(model)
    torch._dynamo.reset()
    with use_backend("torch"):
        want, want_grads = loss_and_grads(model, inputs, model)
        out, grads = loss_and_grads(torch.compile(model, backend=compiler), inputs, model)
    # Inductor reorders and fuses fp32 ops: agreement to a few fp32 eps relative, as for any compiled model.
    # Gradients are held to the largest gradient's scale: some are rounding noise around an exact zero
    # (an attention key bias), whose own scale means nothing.
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * max_abs(want))
    scale = max(max_abs(g) for g in want_grads.values())
    for n, g in grads.items():  # compiled graphs also return zeros for parameters the loss does not reach
        torch.testing.assert_close(g, want_grads.get(n, torch.zeros_like(g)), rtol=1e-4, atol=1e-6 * scale, msg=n)
    assert set(want_grads) <= set(grads)


# --------------------------------------------------------------------------------------------------
# Checkpoints: a converted model comes back with its alphas; a load that would lose them says so.
# --------------------------------------------------------------------------------------------------

def _converted_with_random_alphas(name: str):
    """A converted case model with distinct alphas, every other DyT per-channel, so a lost alpha shows."""
    case, classes, model, inputs = _build_case(name)
    every_other = iter(range(10 ** 6))
    _convert(case, model, fuse_modulation=name in FUSED_CALLS,
             alpha_per_channel=lambda qualified_name, m: next(every_other) % 2 == 1)
    _randomize_alphas_(model)
    return case, model, inputs


def _output(model, inputs):
    with torch.no_grad(), use_backend("torch"):
        return main_output(model(**inputs))


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_through_a_fresh_build(name, tmp_path):
    case, model, inputs = _converted_with_random_alphas(name)
    want = _output(model, inputs)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(123)  # a fresh build has other weights: everything must come from the file
    fresh = case.build().eval()
    loaded = load_dyt_state_dict(fresh, torch.load(tmp_path / "model.pt", weights_only=True),
                                 fuse_modulation=name in FUSED_CALLS)
    assert torch.equal(_output(loaded, inputs), want)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert {n: p.shape for n, p in loaded.named_parameters()} == shapes  # per-channel alphas stay per channel
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]  # fused classes too


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.hf])
def test_save_pretrained_round_trip(name, tmp_path):
    case, model, inputs = _converted_with_random_alphas(name)
    want = _output(model, inputs)
    model.save_pretrained(tmp_path)
    back = load_pretrained_dyt(type(model), str(tmp_path), fuse_modulation=name in FUSED_CALLS).eval()
    assert torch.equal(_output(back, inputs), want)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    # What the recipe is for: plain from_pretrained rebuilds LayerNorms and the output is not the model's.
    plain = type(model).from_pretrained(str(tmp_path)).eval()
    assert not any(isinstance(m, DyT) for m in plain.modules())
    assert max_abs_err(_output(plain, inputs), want) > 1e-3


def test_load_that_would_drop_alphas_warns():
    """A DyT state dict whose norm the model does not have at that name: its alpha is not silently lost."""
    source = convert_layernorm_to_dyt(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))
    target = nn.Sequential(nn.Linear(8, 8), nn.GroupNorm(2, 8))   # same keys but for alpha
    with pytest.warns(UserWarning) as caught:  # the converter's word on the GroupNorm, then the loader's
        load_dyt_state_dict(target, source.state_dict(), strict=False)
    assert any(w.category is DyTCheckpointWarning and "1 DyT alpha(s)" in str(w.message)
               and "DROPPED: 1.alpha" in str(w.message) for w in caught)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="Unexpected key.*1.alpha"):
        load_dyt_state_dict(nn.Sequential(nn.Linear(8, 8), nn.GroupNorm(2, 8)), source.state_dict())


def test_folded_checkpoint_into_a_model_with_norm_weights_warns():
    """A state dict saved after fold_dyt_affine has the DyT's alpha but no weight or bias (its Linears
    hold them). Loaded non-strictly into a built model whose norm has a weight, the DyT kept that weight
    and the model applied the affine twice: off by O(1), no word. Strict loads fail on the missing keys."""
    build = lambda: randomize_(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)))  # noqa: E731
    source = convert_layernorm_to_dyt(build()).eval()
    fold_dyt_affine(source, torch.randn(3, 8))
    folded_state = source.state_dict()
    assert "1.alpha" in folded_state and "1.weight" not in folded_state
    with pytest.warns(DyTCheckpointWarning, match=r"1\.alpha.*no '1\.weight'.*fold_dyt_affine"):
        load_dyt_state_dict(build(), folded_state, strict=False)
    with pytest.raises(RuntimeError, match="Missing key.*1.weight"):
        load_dyt_state_dict(build(), folded_state)


def test_layernorm_checkpoint_into_converted_model_warns_and_load_then_convert_works():
    build = lambda: randomize_(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))  # noqa: E731
    layernorm_state = build().state_dict()
    converted = convert_layernorm_to_dyt(build())
    with pytest.warns(DyTCheckpointWarning, match="looks like a LayerNorm checkpoint"), \
            pytest.raises(RuntimeError, match="Missing key.*1.alpha"):
        converted.load_state_dict(layernorm_state)
    # The documented order for a LayerNorm checkpoint: load, then convert.
    model = build()
    model.load_state_dict(layernorm_state)
    convert_layernorm_to_dyt(model)
    assert torch.equal(model[1].weight, layernorm_state["1.weight"]) and model[1].alpha.item() == 0.5


# --------------------------------------------------------------------------------------------------
# Inference folding.
# --------------------------------------------------------------------------------------------------

# DyTs whose output feeds only Linear layers, per case: Llama's input and post-attention norms (the
# residual is taken before them), timm ViT's norm1 (qkv) and norm2 (fc1). Elsewhere a DyT feeds a
# residual add, a modulation, a conv, or the model's output.
FOLDS = {"llama": {"layers.0.input_layernorm": ["layers.0.self_attn.k_proj", "layers.0.self_attn.q_proj",
                                                "layers.0.self_attn.v_proj"],
                   "layers.0.post_attention_layernorm": ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]},
         "timm_vit": {"blocks.0.norm1": ["blocks.0.attn.qkv"], "blocks.0.norm2": ["blocks.0.mlp.fc1"]}}


@pytest.mark.parametrize("name", list(CASES))
def test_fold_is_exact_to_fp32_rounding(name):
    case, classes, model, inputs = _build_case(name)
    _convert(case, model, fuse_modulation=name in FUSED_CALLS)
    _randomize_alphas_(model)
    want = _output(model, inputs)
    dropped = copy.deepcopy(model)
    with use_backend("torch"):
        report = fold_dyt_affine(model, **inputs)
    assert report.folded == FOLDS.get(name, {})
    dyts = {n for n, m in model.named_modules() if isinstance(m, DyT)}
    assert set(report.folded) | set(report.left) == dyts and all(report.left.values())
    for dyt_name in report.folded:
        m = model.get_submodule(dyt_name)
        assert m.weight is None and m.bias is None
    # Each folded weight and bias carries one fp32 rounding (2^-24 relative); a Linear sums D = 16-32 such
    # terms, which the tiny models pass on at O(1) gain: 64 eps of the output's scale covers it, and an
    # unfolded weight or bias would be off by O(0.1).
    got, atol = _output(model, inputs), 64 * FP32_EPS * max_abs(want)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    if report.folded:  # the check has teeth: dropping the affine instead of folding it is far outside atol
        for dyt_name in report.folded:
            dropped.get_submodule(dyt_name).register_parameter("weight", None)
            dropped.get_submodule(dyt_name).register_parameter("bias", None)
        assert max_abs_err(_output(dropped, inputs), want) > 10 * atol


def test_fold_refuses_a_dyt_that_feeds_anything_but_linears():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc, self.fc2 = DyT(8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.norm(x)
            return self.fc(h) + h            # the DyT output is also a residual

    model = nn.Sequential(Block(), DyT(8), nn.Linear(8, 4, bias=False)).eval()
    randomize_(model)
    x = torch.randn(3, 8)
    want = model(x).detach()
    report = fold_dyt_affine(model, x)
    assert report.folded == {"1": ["2"]} and "0.norm" in report.left and "add" in report.left["0.norm"]
    assert model[2].bias is not None        # the bias-free Linear took the DyT's bias
    torch.testing.assert_close(model(x), want, rtol=0, atol=64 * FP32_EPS * max_abs(want))


# --------------------------------------------------------------------------------------------------
# What a norm computes: established by probing, never guessed from a class name.
# --------------------------------------------------------------------------------------------------

class ChannelsFirstLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass over dim 1 of (N, C, L) tensors, unknown to the converter."""

    def forward(self, x):
        return super().forward(x.transpose(1, -1)).transpose(1, -1)


class LayerNormGELU(nn.LayerNorm):
    def forward(self, x):
        return nn.functional.gelu(super().forward(x))


class PlainRMSNorm(nn.Module):
    """An RMSNorm twin as transformers writes them: weight, variance_epsilon, no bias."""

    def __init__(self, dim, one_plus_weight=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon, self.one_plus_weight = 1e-6, one_plus_weight

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return y * (1 + self.weight if self.one_plus_weight else self.weight)


def _convert_recording(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert_layernorm_to_dyt(model, **kwargs)
    return model, "\n".join(str(w.message) for w in caught)


def test_channels_first_subclass_becomes_channels_first_dyt():
    """L == C, where a channels-last DyT would run on the NCL tensor and be silently wrong."""
    norm = randomize_(ChannelsFirstLayerNorm(8))
    x = torch.randn(2, 8, 8)
    model, said = _convert_recording(nn.Sequential(norm))
    assert not said and isinstance(model[0], DyT) and not model[0].channels_last
    want = dyt_formula(x, model[0].alpha, norm.weight, norm.bias, channel_dim=1)
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def test_subclass_that_is_not_a_layernorm_is_left_alone_with_a_warning():
    model, said = _convert_recording(nn.Sequential(nn.Linear(8, 8), LayerNormGELU(8)))
    assert isinstance(model[1], LayerNormGELU)
    assert "1: " in said and "LayerNormGELU" in said and "could not be established" in said


@pytest.mark.parametrize("include_rmsnorm", [False, True])
def test_rmsnorm_twins_convert_by_what_they_compute(include_rmsnorm):
    model = nn.Sequential(randomize_(PlainRMSNorm(8)), nn.Linear(8, 8))
    hand = copy.deepcopy(model)
    weight = model[0].weight.detach().clone()
    model, said = _convert_recording(model, include_rmsnorm=include_rmsnorm)
    if not include_rmsnorm:
        assert isinstance(model[0], PlainRMSNorm) and "include_rmsnorm=True" in said
        return
    assert isinstance(model[0], DyT) and model[0].bias is None and torch.equal(model[0].weight, weight)
    x = torch.randn(3, 8)
    want = hand[1](dyt_formula(x, torch.tensor(0.5), weight, None))
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def test_one_plus_weight_rmsnorm_is_left_alone_with_a_warning():
    model, said = _convert_recording(nn.Sequential(randomize_(PlainRMSNorm(8, one_plus_weight=True))),
                                     include_rmsnorm=True)
    assert isinstance(model[0], PlainRMSNorm) and "(1 + weight)" in said


def test_transformers_rmsnorm_family():
    """Real twins: Llama's converts; Gemma's (1 + weight) stays; T5's RMSNorm named LayerNorm converts."""
    tf = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    model = nn.ModuleDict({"llama": tf.models.llama.modeling_llama.LlamaRMSNorm(8),
                           "gemma": GemmaRMSNorm(8), "t5": T5LayerNorm(8)})
    randomize_(model)
    report = conversion_report(model, include_rmsnorm=True)
    assert dict(report.converted) == {"transformers.models.llama.modeling_llama.LlamaRMSNorm": 1,
                                      "transformers.models.t5.modeling_t5.T5LayerNorm": 1}
    assert list(report.left_alone) == ["gemma"] and "(1 + weight)" in report.left_alone["gemma"]


def test_norms_dyt_cannot_replace_are_named_in_one_warning():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.InstanceNorm2d(8),
                          nn.LayerNorm([8, 4, 4]))
    before = conversion_report(model)
    assert isinstance(model[1], nn.BatchNorm2d)  # the report changes nothing
    model, said = _convert_recording(model)
    assert set(before.left_alone) == {"1", "2", "3"} and dict(before.converted) == {"LayerNorm": 1}
    for name, cls in (("1", "BatchNorm2d"), ("2", "GroupNorm"), ("3", "InstanceNorm2d")):
        assert f"{name}: {cls}" in said
    assert isinstance(model[4], DyT)


def test_probe_leaves_the_module_and_the_rng_alone():
    norm = LayerNormGELU(8)
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    rng = torch.get_rng_state()
    conversion_report(nn.Sequential(norm, nn.BatchNorm1d(8)))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, norm.state_dict()[k]) for k, v in state.items())


def test_unknown_norm_on_meta_is_left_alone_but_layernorm_converts():
    model = nn.Sequential(ChannelsFirstLayerNorm(8, device="meta"), nn.LayerNorm(8, device="meta"))
    model, said = _convert_recording(model)
    assert isinstance(model[0], ChannelsFirstLayerNorm) and "meta device" in said
    assert isinstance(model[1], DyT) and model[1].alpha.device.type == "meta"


def test_affine_free_norm_takes_its_nearest_ancestors_device():
    """Not the model's first parameter: here that one is on meta, the norm's block is on the CPU."""
    model = nn.Sequential(nn.Linear(4, 4, device="meta"),
                          nn.Sequential(nn.Linear(4, 4, dtype=torch.float64), nn.LayerNorm(4, elementwise_affine=False)))
    convert_layernorm_to_dyt(model)
    assert model[1][1].alpha.device.type == "cpu" and model[1][1].alpha.dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Options.
# --------------------------------------------------------------------------------------------------

def test_per_module_options_and_filter():
    """FLUX's finding as converter options: QK-norm DyT starting at alpha 4, weight 2; others at 0.5."""
    model = nn.ModuleDict({"norm_q": nn.RMSNorm(8), "norm_k": nn.RMSNorm(8), "norm1": randomize_(nn.LayerNorm(8)),
                           "skip": nn.LayerNorm(8)})
    seen = []
    qk = lambda name, m: name.startswith("norm_")  # noqa: E731
    _, said = _convert_recording(
        model, include_rmsnorm=True,
        alpha_init_value=lambda name, m: seen.append((name, type(m).__name__)) or (4.0 if qk(name, m) else 0.5),
        weight_init_value=lambda name, m: 2.0 if qk(name, m) else None,
        alpha_per_channel=qk, module_filter=lambda name, m: name != "skip")
    assert not said and sorted(seen) == [("norm1", "LayerNorm"), ("norm_k", "RMSNorm"), ("norm_q", "RMSNorm")]
    for name in ("norm_q", "norm_k"):
        m = model[name]
        assert m.alpha.shape == (8,) and torch.equal(m.alpha, torch.full((8,), 4.0))
        assert torch.equal(m.weight, torch.full((8,), 2.0))
    assert model["norm1"].alpha.shape == (1,) and model["norm1"].alpha.item() == 0.5
    assert not torch.equal(model["norm1"].weight, torch.ones(8))     # None: the copied weight
    assert isinstance(model["skip"], nn.LayerNorm)
    assert conversion_report(nn.ModuleDict({"skip": nn.LayerNorm(8)}),
                             module_filter=lambda name, m: False).excluded == ["skip"]


def test_weight_init_value_replaces_the_weight_and_keeps_the_bias():
    """weight_init_value starts the weight at a value instead of the LayerNorm's; the bias is still the
    LayerNorm's own (the option names the weight only)."""
    ln = randomize_(nn.LayerNorm(8))
    bias = ln.bias.detach().clone()
    model = convert_layernorm_to_dyt(nn.Sequential(ln), weight_init_value=0.25)
    assert isinstance(model[0], DyT)
    assert torch.equal(model[0].weight.detach(), torch.full((8,), 0.25))
    assert torch.equal(model[0].bias.detach(), bias) and not torch.equal(bias, torch.zeros(8))


@pytest.mark.parametrize("option,value,match", [
    ("alpha_init_value", "0.5", "alpha_init_value must be a finite number"),
    ("weight_init_value", float("nan"), "weight_init_value must be a finite number"),
    ("module_filter", "norm", "module_filter must be a callable"),
])
def test_bad_options_are_named(option, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        convert_layernorm_to_dyt(nn.LayerNorm(4), **{option: value})


# --------------------------------------------------------------------------------------------------
# Third-party code paths that special-case LayerNorm.
# --------------------------------------------------------------------------------------------------

def test_transformer_encoder_nested_tensor_path_after_conversion():
    """Built with the default enable_nested_tensor=True: eval + no_grad + a padding mask packs the batch
    into a nested tensor, which DyT cannot take; the converter turns that packing off."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = randomize_norms_(nn.TransformerEncoder(layer, num_layers=2), {nn.LayerNorm}).eval()
    hand = hand_built_dyt(model, LAYERNORM)
    convert_layernorm_to_dyt(model)
    src, mask = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    want = hand(src, src_key_padding_mask=mask).detach()  # grad mode: the module path, no packing
    with torch.no_grad(), use_backend("torch"):
        got = model(src, src_key_padding_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_diffusers_attention_layernorm_cross_norm():
    diffusers = pytest.importorskip("diffusers")
    attn = diffusers.models.attention_processor.Attention(16, cross_attention_dim=12, heads=2, dim_head=8,
                                                           cross_attention_norm="layer_norm")
    randomize_norms_(attn, {nn.LayerNorm})
    hand = hand_built_dyt(attn, LAYERNORM)
    convert_layernorm_to_dyt(attn)
    assert isinstance(attn.norm_cross, DyT)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 3, 12)
    with use_backend("torch"):
        got = attn(x, encoder_hidden_states=context)
    torch.testing.assert_close(got, hand(x, encoder_hidden_states=context), rtol=1e-5, atol=1e-6)
    copy.deepcopy(attn)(x, encoder_hidden_states=context)  # the fix survives a deep copy


def test_load_pretrained_dyt_from_a_base_model_into_one_with_a_head(tmp_path):
    """transformers saves BertModel's keys without the 'bert.' prefix its task models put in front."""
    tf = pytest.importorskip("transformers")
    case, base, inputs = _converted_with_random_alphas("bert")
    base.save_pretrained(tmp_path)
    with_head = load_pretrained_dyt(tf.BertForSequenceClassification, str(tmp_path)).eval()
    for name, m in base.named_modules():
        if isinstance(m, DyT):
            assert torch.equal(with_head.get_submodule("bert." + name).alpha, m.alpha), name


def test_optimizer_built_before_converting_warns_at_its_first_step():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_layernorm_to_dyt(model)
    late = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        late.step()                                    # built after: holds the DyT, nothing to say
    with pytest.warns(UserWarning, match="SGD holds 2 parameter.*built before converting"):
        early.step()
