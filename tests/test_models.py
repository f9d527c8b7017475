"""Tests for models/__init__.py (build_model, count_parameters, the presets) and for what every model
shares: shapes, gradients, the norm switch, the Triton path, torch.compile, and argument errors.

Per-model behaviour is in test_pixart.py and test_flux.py; the text side in test_text.py.
"""
import copy

import pytest
import torch
from torch import nn

import dyt_kernels
from dyt_kernels import DyT, ModulatedDyT
from models import FLUX_PRESETS, PIXART_PRESETS, build_model, count_parameters
from models.layers import ModulatedLayerNorm, default_rope_axes
from tiny_models import PROMPTS, randomize, tiny, timesteps


# ----------------------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("norm", ["dyt", "layernorm"])
@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_output_shape(name, norm, in_channels, device):
    model = tiny(name, norm, in_channels, device)
    x = torch.randn(len(PROMPTS), in_channels, 16, 16, device=device)
    out = model(x, timesteps(name, len(PROMPTS), device), model.encode_prompts(PROMPTS))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("norm", ["dyt", "layernorm"])
@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_every_parameter_gets_a_gradient(name, norm):
    model = randomize(tiny(name, norm))
    out = model(torch.randn(4, 1, 16, 16), timesteps(name, 4), model.encode_prompts(PROMPTS))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    assert any(n.startswith("text_encoder.") for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- the norm switch


def norm_types(model):
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_dyt_model_has_no_layernorm_or_rmsnorm(name):
    found = norm_types(tiny(name, "dyt"))
    assert not found & {nn.LayerNorm, nn.RMSNorm, ModulatedLayerNorm}
    assert {DyT, ModulatedDyT} <= found  # DyT in the text encoder (and FLUX's QK-norm), ModulatedDyT in blocks


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_layernorm_model_is_the_original(name):
    model = tiny(name, "layernorm")
    found = norm_types(model)
    assert not found & {DyT, ModulatedDyT}
    assert {nn.LayerNorm, ModulatedLayerNorm} <= found
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, ModulatedLayerNorm))
    if name == "flux":
        assert nn.RMSNorm in found


def forward_backward(model, x, t, backend):
    """Output and parameter gradients of a squared-output loss, under the given backend."""
    model.zero_grad()
    with dyt_kernels.use_backend(backend):
        out = model(x.to(next(model.parameters()).dtype), t, model.encode_prompts(["4", ""]))
        out.square().sum().backward()
    return [out.detach()] + [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_triton_path_matches_torch_path(name, device):
    # Three-way check (docs/DESIGN.md, "Proving kernels without a GPU"): against a float64 oracle,
    # the Triton path's fp32 error may be at most 2x the plain-PyTorch path's fp32 error, plus an atol
    # of 1e-6 of the scale (the interpreter's exp-based tanh and torch.tanh round differently, ~1e-7
    # relative). The gradients' scale is the largest gradient entry of the whole model: rounding
    # anywhere upstream reaches every reduction, and alpha's gradient (a sum over B*L*D terms that
    # mostly cancel) can be 1e5x smaller than its terms. randomize's std 0.1 keeps activations O(1); at
    # 0.3 this random net amplifies fp32 rounding to ~1e-3 and the check would measure the net, not the
    # kernels.
    model = randomize(tiny(name, "dyt", device=device))
    x, t = torch.randn(2, 1, 16, 16, device=device), timesteps(name, 2, device)
    oracle = forward_backward(copy.deepcopy(model).double(), x, t, "torch")
    via_torch = forward_backward(model, x, t, "torch")
    via_triton = forward_backward(model, x, t, "triton")
    grad_scale = max(g.abs().max().item() for g in oracle[1:])
    names = ["output"] + [n for n, _ in model.named_parameters()]
    for i, (n, ref, a, b) in enumerate(zip(names, oracle, via_torch, via_triton)):
        torch_err = (a.double() - ref).abs().max().item()
        triton_err = (b.double() - ref).abs().max().item()
        scale = ref.abs().max().item() if i == 0 else grad_scale
        assert triton_err <= 2 * torch_err + 1e-6 * scale, (n, triton_err, torch_err)


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_torch_compile_fullgraph_forward_and_backward(name):
    torch._dynamo.reset()
    one_block = {"pixart": dict(depth=1), "flux": dict(depth_double=1, depth_single=1)}[name]  # compile time
    model = randomize(tiny(name, "dyt", **one_block))
    x, t = torch.randn(2, 1, 16, 16), timesteps(name, 2)
    ids, mask = model.text_encoder.tokenizer(["9", "nine"])
    with dyt_kernels.use_backend("torch"):
        cond = model.text_encoder.encode(ids, mask)
        expected = model(x, t, cond)
        expected.square().mean().backward()
        eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        compiled_cond = torch.compile(model.text_encoder.encode, fullgraph=True)(ids, mask)
        out = torch.compile(model, fullgraph=True)(x, t, compiled_cond)
        out.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for n, g in eager_grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_presets():
    assert default_rope_axes(64) == [16, 24, 24]
    seed = FLUX_PRESETS["seed"]
    assert seed["hidden_size"] // seed["num_heads"] == sum(seed["rope_axes"]) == 64
    assert (seed["depth_double"], seed["depth_single"], seed["patch_size"]) == (6, 12, 8)
    assert (PIXART_PRESETS["seed"]["depth"], PIXART_PRESETS["seed"]["hidden_size"]) == (12, 384)
    model = build_model("flux", "small")
    assert sum(model.rope_axes) == model.single_blocks[0].linear1.in_features // model.single_blocks[0].num_heads
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.text_encoder.requires_grad_(False)
    frozen = count_parameters(model.text_encoder)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, kwargs, match", [
    (("dit",), {}, "name must be one of"),
    (("pixart", "huge"), {}, "preset must be one of"),
    (("flux", "small"), {"norm": "rmsnorm"}, "norm must be one of"),
    (("flux", "small"), {"qk_norm": "layernorm"}, "qk_norm must be one of"),
    (("pixart", "seed"), {"image_size": 30}, "divisible by patch_size=8"),
    (("flux", "small"), {"image_size": 30}, "divisible by patch_size=4"),
    (("pixart", "small"), {"in_channels": 0}, "in_channels"),
    (("pixart", "small"), {"qk_norm": "dyt"}, "unknown pixart override"),
    (("flux", "small"), {"depth": 3}, "unknown flux override"),
    (("flux", "small"), {"rope_axes": [8, 8, 8]}, "rope_axes"),
    (("flux", "small"), {"qk_alpha_init": float("nan")}, "qk_alpha_init must be a finite number"),
    (("flux", "small"), {"qk_weight_init": "2"}, "qk_weight_init must be a finite number"),
    (("pixart", "small"), {"num_heads": 5}, "divisible by num_heads"),
    # Each of these once surfaced as an unrelated error deep in a layer, or not at all.
    (("pixart", "small"), {"depth": 0}, "depth must be an integer >= 1, got 0"),
    (("pixart", "small"), {"hidden_size": "abc"}, "hidden_size must be an integer >= 1, got 'abc'"),
    (("pixart", "small"), {"hidden_size": 64.0}, "hidden_size must be an integer"),
    (("pixart", "small"), {"mlp_ratio": 0}, "mlp_ratio must be a finite number > 0"),
    (("pixart", "small"), {"learn_sigma": "yes"}, "learn_sigma must be True or False"),
    (("pixart", "small"), {"patch_size": True}, "patch_size must be an integer"),
    (("flux", "small"), {"depth_double": 0, "depth_single": 0}, "at least one block"),
    (("flux", "small"), {"depth_single": -1}, "depth_single must be an integer >= 0"),
    (("flux", "small"), {"rope_axes": "8,12,12"}, "rope_axes"),
    (("flux", "small"), {"rope_theta": float("inf")}, "rope_theta must be a finite number > 0"),
    (("flux", "small"), {"text_dim": 30, "text_heads": 4}, "text_dim=30 must be divisible by text_heads=4"),
    (("flux", "small"), {"text_len": 1}, "text_len must be an integer >= 2"),
    (("pixart", "small"), {"text_depth": -1}, "text_depth must be an integer >= 0"),
])
def test_build_model_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(*args, **kwargs)


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_forward_errors_name_the_argument(name):
    model = tiny(name)
    cond = model.encode_prompts(["1", "2"])
    with pytest.raises(ValueError, match=r"x must be \(B, 1, "):
        model(torch.randn(2, 3, 16, 16), timesteps(name, 2), cond)
    with pytest.raises(ValueError, match=r"t must be \(2,\)"):
        model(torch.randn(2, 1, 16, 16), timesteps(name, 3), cond)
    with pytest.raises(ValueError, match=r"cond must hold tokens \(3, T, D_txt\)"):
        model(torch.randn(3, 1, 16, 16), timesteps(name, 3), cond)


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_a_float_text_mask_is_refused_not_added_to_the_logits(name):
    """TextEncoding.mask is bool (True: a real token). A plugged-in encoder handing a 0/1 float mask (as
    Hugging Face tokenizers' attention_mask, cast) once ran: scaled_dot_product_attention adds a float mask
    to the logits, so padding got +0 against the tokens' +1 and was attended to, with no error (outputs
    differed from the bool mask's by ~1e-2 here). It is refused, naming the argument."""
    from models import TextEncoding
    model = randomize(tiny(name))
    x, t = torch.randn(2, 1, 16, 16), timesteps(name, 2)
    cond = model.encode_prompts(["7", "3"])
    assert not cond.mask.all()  # there is padding to mask
    for dtype in (torch.float32, torch.long):
        bad = TextEncoding(cond.tokens, cond.mask.to(dtype), cond.pooled)
        with pytest.raises(ValueError, match=rf"cond.mask must be bool .*got {dtype}"):
            model(x, t, bad)
    ids, mask = model.text_encoder.tokenizer(["7"])
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        model.text_encoder.encode(ids, mask.float())
