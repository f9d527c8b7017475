"""Tests for models/: PixArt-alpha and FLUX on dyt_kernels, the norm switch, the text encoder.

Tiny configs throughout (hidden 32, one or two blocks, 16x16 images): the Triton path runs under
the interpreter on CPU here.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyt_kernels
from dyt_kernels import DyT, ModulatedDyT
from models import FLUX_PRESETS, PIXART_PRESETS, TextEncoding, build_model, count_parameters
from models.layers import (ModulatedLayerNorm, apply_rope, attention, default_rope_axes, image_position_ids,
                           patchify, rope_angles, split_heads, timestep_embedding, unpatchify)
from models.text import TextEncoder, Tokenizer

TINY_TEXT = dict(text_dim=16, text_depth=1, text_heads=2, text_len=4)
TINY = {
    "pixart": dict(patch_size=4, hidden_size=32, depth=2, num_heads=2, **TINY_TEXT),
    "flux": dict(patch_size=4, hidden_size=32, depth_double=2, depth_single=2, num_heads=2, **TINY_TEXT),
}
PROMPTS = ["7", "seven", "", "a handwritten 3"]


def tiny(name, norm="dyt", in_channels=1, device="cpu", **overrides):
    return build_model(name, "small", norm=norm, in_channels=in_channels, image_size=16,
                       **{**TINY[name], **overrides}).to(device)


def timesteps(name, batch, device="cpu"):
    # PixArt: DDPM step index in [0, 1000); FLUX: t in [0, 1].
    if name == "pixart":
        return torch.randint(0, 1000, (batch,), device=device)
    return torch.rand(batch, device=device)


def randomize(model, std=0.1):
    """Replace every parameter with fresh noise: the zero-initialized output layers would otherwise
    make outputs 0 and upstream gradients 0, hiding wiring mistakes."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * std)
    return model


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
def test_pixart_learned_sigma_doubles_channels(norm):
    model = tiny("pixart", norm, in_channels=3, learn_sigma=True)
    out = model(torch.randn(2, 3, 16, 16), timesteps("pixart", 2), model.encode_prompts(["1", "one"]))
    assert out.shape == (2, 6, 16, 16)


def test_flux_accepts_other_image_sizes():
    # RoPE positions come from the input's patch grid, so a non-square size divisible by the patch works.
    model = tiny("flux")
    x = torch.randn(2, 1, 8, 20)
    assert model(x, timesteps("flux", 2), model.encode_prompts(["1", "2"])).shape == x.shape


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


def test_flux_qk_norm_can_differ_from_norm():
    found = norm_types(tiny("flux", "dyt", qk_norm="rmsnorm"))
    assert nn.RMSNorm in found and ModulatedDyT in found
    found = norm_types(tiny("flux", "layernorm", qk_norm="dyt"))
    assert DyT in found and ModulatedLayerNorm in found and nn.RMSNorm not in found


def test_flux_qk_init_sets_only_the_qk_dyts():
    model = tiny("flux", "dyt", qk_alpha_init=4.0, qk_weight_init=2.0)
    qk = {id(m) for block in model.modules() if type(block).__name__ == "QKNorm" for m in block.children()}
    dyts = [(id(m) in qk, m) for m in model.modules() if isinstance(m, (DyT, ModulatedDyT))]
    assert sum(is_qk for is_qk, _ in dyts) == 2 * (2 * 2 + 2)  # q and k: 2 double blocks x 2 streams, 2 single
    for is_qk, m in dyts:
        assert m.alpha.item() == m.alpha_init_value == (4.0 if is_qk else 0.5)
        if m.weight is not None:
            assert set(m.weight.tolist()) == ({2.0} if is_qk else {1.0})
    assert FLUX_PRESETS["seed"]["qk_alpha_init"] == 0.5  # the seed's DyT everywhere at alpha0 0.5
    assert FLUX_PRESETS["seed"]["qk_weight_init"] == 1.0
    # An RMSNorm QK-norm has neither knob; it is built as without them.
    torch.manual_seed(0)
    plain = tiny("flux", "layernorm").state_dict()
    torch.manual_seed(0)
    knobs = tiny("flux", "layernorm", qk_alpha_init=4.0, qk_weight_init=2.0).state_dict()
    assert all(torch.equal(plain[k], knobs[k]) for k in plain)


def forward_backward(model, x, t, backend):
    """Output and parameter gradients of a squared-output loss, under the given backend."""
    model.zero_grad()
    with dyt_kernels.use_backend(backend):
        out = model(x.to(next(model.parameters()).dtype), t, model.encode_prompts(["4", ""]))
        out.square().sum().backward()
    return [out.detach()] + [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_triton_path_matches_torch_path(name, device):
    # Three-way check (DESIGN.md): against a float64 oracle, the Triton path's fp32 error may be at
    # most 2x the plain-PyTorch path's fp32 error, plus an atol of 1e-6 of the scale (the
    # interpreter's exp-based tanh and torch.tanh round differently, ~1e-7 relative). The gradients'
    # scale is the largest gradient entry of the whole model: rounding anywhere upstream reaches
    # every reduction, and alpha's gradient (a sum over B*L*D terms that mostly cancel) can be 1e5x
    # smaller than its terms. randomize's std 0.1 keeps activations O(1); at 0.3 this
    # random net amplifies fp32 rounding to ~1e-3 and the check would measure the net, not the kernels.
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


# ----------------------------------------------------------------------------- residual fusion


def norm_then_modulate(norm, x, shift, scale):
    """The unfused formulation: norm in plain math, then modulate."""
    if isinstance(norm, ModulatedDyT):
        n = torch.tanh(norm.alpha * x)
    else:
        n = F.layer_norm(x, x.shape[-1:], eps=norm.eps)
    return n * (1 + scale) + shift


def pixart_unfused(model, x, t, cond):
    """PixArt-alpha's forward as the original writes it: every residual added on its own."""
    p = model.patch_size
    h = model.x_embedder(patchify(x, p)) + model.pos_embed
    temb = model.t_embedder(timestep_embedding(t, 256))
    t6 = model.t_block(temb)
    text = model.y_embedder(cond.tokens)
    B, _, D = h.shape
    for b in model.blocks:
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = (b.scale_shift_table[None] + t6.view(B, 6, D)).chunk(6, 1)
        h = h + g_msa * b.attn(norm_then_modulate(b.norm1, h, s_msa, sc_msa))
        h = h + b.cross_attn(h, text, cond.mask)
        h = h + g_mlp * b.mlp(norm_then_modulate(b.norm2, h, s_mlp, sc_mlp))
    final = model.final_layer
    shift, scale = (final.scale_shift_table[None] + temb[:, None]).chunk(2, 1)
    out = final.linear(norm_then_modulate(final.norm_final, h, shift, scale))
    return unpatchify(out, p, x.shape[2], x.shape[3])


def flux_unfused(model, x, t, cond):
    """FLUX's forward as Black Forest Labs write it: every residual added on its own."""
    p, (B, _, H, W) = model.patch_size, x.shape
    img, txt = model.img_in(patchify(x, p)), model.txt_in(cond.tokens)
    vec = model.time_in(timestep_embedding(1000 * t, 256)) + model.vector_in(cond.pooled)
    T = txt.shape[1]
    ids = torch.cat([torch.zeros(T, 3, dtype=torch.long), image_position_ids(H // p, W // p)])
    angles = rope_angles(ids, model.rope_axes, model.rope_theta)[None]
    mask = torch.cat([cond.mask, torch.ones(B, img.shape[1], dtype=torch.bool)], 1)
    for b in model.double_blocks:
        im, tm = b.img.mod(vec), b.txt.mod(vec)
        iq, ik, iv = b.img.attn.heads(norm_then_modulate(b.img.norm1, img, im[0], im[1]))
        tq, tk, tv = b.txt.attn.heads(norm_then_modulate(b.txt.norm1, txt, tm[0], tm[1]))
        q, k = apply_rope(torch.cat([tq, iq], 2), angles), apply_rope(torch.cat([tk, ik], 2), angles)
        a = attention(q, k, torch.cat([tv, iv], 2), mask)
        img = img + im[2] * b.img.attn.proj(a[:, T:])
        img = img + im[5] * b.img.mlp(norm_then_modulate(b.img.norm2, img, im[3], im[4]))
        txt = txt + tm[2] * b.txt.attn.proj(a[:, :T])
        txt = txt + tm[5] * b.txt.mlp(norm_then_modulate(b.txt.norm2, txt, tm[3], tm[4]))
    h = torch.cat([txt, img], 1)
    for b in model.single_blocks:
        shift, scale, gate = b.modulation(vec)
        qkv, mlp = b.linear1(norm_then_modulate(b.pre_norm, h, shift, scale)).split([3 * h.shape[-1], b.mlp_hidden], -1)
        q, k, v = split_heads(qkv, b.num_heads)
        q, k = b.norm(q, k, v)
        a = attention(apply_rope(q, angles), apply_rope(k, angles), v, mask)
        h = h + gate * b.linear2(torch.cat([a, F.gelu(mlp, approximate="tanh")], -1))
    final = model.final_layer
    shift, scale = final.adaLN_modulation(vec)[:, None].chunk(2, -1)
    out = final.linear(norm_then_modulate(final.norm_final, h[:, T:], shift, scale))
    return unpatchify(out, p, H, W)


@pytest.mark.parametrize("norm", ["dyt", "layernorm"])
@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_fused_residuals_match_the_unfused_blocks(name, norm):
    # float64 stays on the plain-PyTorch path, so any difference is the fusion's, not rounding's.
    model = randomize(tiny(name, norm)).double()
    x, t = torch.randn(3, 1, 16, 16, dtype=torch.float64), timesteps(name, 3)
    with torch.no_grad():
        cond = model.encode_prompts(["5", "five", ""])
        fused = model(x, t, cond)
        unfused = (pixart_unfused if name == "pixart" else flux_unfused)(model, x, t, cond)
    assert fused.abs().max() > 1e-3  # a zero output would compare equal whatever the wiring
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- text


def test_tokenizer_numerals_words_unknown_and_empty():
    tok = Tokenizer(max_length=4)
    ids, mask = tok(["7", "Seven", "", "xyz", "one two three four five"])
    eos, unk = tok.index["<eos>"], tok.index["<unk>"]
    assert ids[0, :2].tolist() == [tok.index["7"], eos]
    assert ids[1, :2].tolist() == [tok.index["seven"], eos]
    assert ids[2].tolist() == [eos, 0, 0, 0] and mask[2].tolist() == [True, False, False, False]
    assert ids[3, :2].tolist() == [unk, eos]
    assert ids[4].tolist() == [tok.index["one"], tok.index["two"], tok.index["three"], eos] and mask[4].all()
    with pytest.raises(TypeError, match="list of str"):
        tok("7")


def test_text_encoder_pooled_is_the_end_token_state():
    model = tiny("flux")
    enc = model.encode_prompts(["", "a handwritten 8"])
    assert enc.tokens.shape == (2, 4, 16) and enc.mask.dtype == torch.bool and enc.pooled.shape == (2, 16)
    torch.testing.assert_close(enc.pooled[0], enc.tokens[0, 0])
    torch.testing.assert_close(enc.pooled[1], enc.tokens[1, 3])


@pytest.mark.parametrize("norm, std", [("layernorm", 0.02), ("dyt", 2 ** -0.5)])
def test_text_embeddings_start_at_the_scale_the_first_layer_sees(norm, std):
    """LayerNorm rescales std-0.02 embeddings to unit size; DyT does not, so under DyT they start there."""
    torch.manual_seed(0)
    enc = build_model("flux", "small", norm=norm).text_encoder
    for p in (enc.token_embedding.weight, enc.position_embedding):
        assert abs(p.std().item() / std - 1) < 0.15  # 31 x 64 and 4 x 64 draws: 15% is over 3 sigma


class FixedTextEncoder(nn.Module):
    """A stand-in for a pretrained encoder, with token and pooled widths unlike the built-in one."""
    token_dim, pooled_dim = 12, 7

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 12))

    def forward(self, prompts):
        ids = torch.tensor([int(p) for p in prompts])
        tokens = self.table[ids][:, None].expand(-1, 3, -1)
        mask = torch.tensor([[True, True, False]]).expand(len(prompts), -1)
        return TextEncoding(tokens=tokens, mask=mask, pooled=tokens[:, 0, :7])


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_a_custom_text_encoder_plugs_in(name):
    encoder = FixedTextEncoder()
    assert isinstance(encoder, TextEncoder)
    config = {k: v for k, v in TINY[name].items() if not k.startswith("text_")}
    model = build_model(name, "small", image_size=16, text_encoder=encoder, **config)
    assert model.text_encoder is encoder
    out = model(torch.randn(2, 1, 16, 16), timesteps(name, 2), model.encode_prompts(["3", "4"]))
    assert out.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="text_\\* overrides"):
        build_model(name, "small", text_encoder=encoder, text_dim=8)


# ----------------------------------------------------------------------------- positions and patches


def test_patch_order_matches_the_position_ids():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 4)
    ids = image_position_ids(2, 3)
    for i, (_, row, col) in enumerate(ids.tolist()):
        torch.testing.assert_close(tokens[:, i], x[:, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4].flatten(1))
    torch.testing.assert_close(unpatchify(tokens, 4, 8, 12), x)


def test_rope_depends_only_on_relative_position():
    axes = default_rope_axes(32)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(pos_q, pos_k):
        angles = rope_angles(torch.tensor([pos_q, pos_k]), axes)[None]
        qr = apply_rope(q.expand(1, 1, 2, 32).contiguous(), angles)[0, 0, 0]
        kr = apply_rope(k.expand(1, 1, 2, 32).contiguous(), angles)[0, 0, 1]
        return qr @ kr

    torch.testing.assert_close(score([0, 1, 2], [0, 3, 1]), score([0, 4, 6], [0, 6, 5]))
    assert not torch.allclose(score([0, 1, 2], [0, 3, 1]), score([0, 1, 2], [0, 1, 3]))
    # Text tokens sit at (0, 0, 0): no rotation.
    torch.testing.assert_close(apply_rope(q, rope_angles(torch.zeros(1, 3), axes)[None]), q)


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
