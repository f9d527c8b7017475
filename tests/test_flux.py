"""Tests for models/flux.py: other image sizes, the QK-norm switch and its starts, named modulation chunks,
and the fused residuals against FLUX's unfused blocks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyt_kernels import DyT, ModulatedDyT
from models import FLUX_PRESETS
from models.flux import BlockModulation, Modulation, SingleModulation
from models.layers import (ModulatedLayerNorm, apply_rope, attention, image_position_ids, patchify, rope_angles,
                           split_heads, timestep_embedding, unpatchify)
from tiny_models import assert_fused_matches_unfused, norm_then_modulate, randomize, tiny, timesteps


def norm_types(model):
    return {type(m) for m in model.modules()}


def test_flux_accepts_other_image_sizes():
    # RoPE positions come from the input's patch grid, so a non-square size divisible by the patch works.
    model = tiny("flux")
    x = torch.randn(2, 1, 8, 20)
    assert model(x, timesteps("flux", 2), model.encode_prompts(["1", "2"])).shape == x.shape


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
        # FLUX's chunk order: (shift, scale, gate) of the attention, then of the MLP.
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
        shift, scale, gate = b.modulation(vec)  # FLUX's order
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
def test_fused_residuals_match_the_unfused_blocks(norm):
    assert_fused_matches_unfused("flux", norm, flux_unfused)


def test_modulation_chunks_are_named_in_flux_order():
    """The names must sit on the chunks in the order FLUX's Linear produces them (shift, scale, gate per
    sub-layer): a swapped name would still run, only wrongly, so the values are checked one by one."""
    torch.manual_seed(0)
    vec = torch.randn(2, 8)
    for chunks in (BlockModulation, SingleModulation):
        mod = Modulation(8, chunks)
        out = mod(vec)
        assert isinstance(out, chunks) and all(c.shape == (2, 1, 8) for c in out)
        flat = mod.lin(F.silu(vec))
        for i, name in enumerate(chunks._fields):
            torch.testing.assert_close(getattr(out, name)[:, 0], flat[:, 8 * i:8 * (i + 1)], rtol=0, atol=0)
    assert BlockModulation._fields == ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")


def test_qk_starts_survive_reset_parameters():
    """The QK-norm starts go through DyT's constructor (weight_init_value), so resetting a QK DyT keeps
    them; writing them into the parameters after construction (as FLUX once did) lost the weight's."""
    model = tiny("flux", "dyt", qk_alpha_init=4.0, qk_weight_init=2.0)
    qk = model.single_blocks[0].norm.query_norm
    with torch.no_grad():
        qk.alpha.fill_(-1.0)
        qk.weight.fill_(-1.0)
    qk.reset_parameters()
    assert qk.alpha.item() == 4.0 and set(qk.weight.tolist()) == {2.0}


def test_default_rope_axes_always_encode_rows_and_columns():
    """default_rope_axes gave head_dim 4 the axes [4, 0, 0]: every channel on axis 0, which is 0 for every
    token, so nothing rotated and a FLUX with 2-channel-pair heads saw no image position at all (transposing
    the patch grid only transposed the output). Rows and columns get 2 channels each at the least; head_dim 2
    cannot hold both and is refused unless rope_axes are given."""
    from models.layers import default_rope_axes
    assert default_rope_axes(4) == [0, 2, 2]
    assert [default_rope_axes(d) for d in (6, 8, 32, 64)] == [[2, 2, 2], [4, 2, 2], [8, 12, 12], [16, 24, 24]]
    torch.manual_seed(0)
    model = randomize(tiny("flux", "layernorm", hidden_size=8, num_heads=2)).double()
    assert model.rope_axes == [0, 2, 2]
    x, t = torch.randn(2, 1, 16, 16, dtype=torch.float64), timesteps("flux", 2)
    with torch.no_grad():
        cond = model.encode_prompts(["7", "3"])
        # A position-blind model maps the patch-transposed image to the patch-transposed output.
        blind = unpatchify(patchify(model(x, t, cond), 4).unflatten(1, (4, 4)).transpose(1, 2).flatten(1, 2), 4, 16, 16)
        blind_input = unpatchify(patchify(x, 4).unflatten(1, (4, 4)).transpose(1, 2).flatten(1, 2), 4, 16, 16)
        moved = model(blind_input, t, cond)
    assert blind.abs().max() > 1e-3  # a zero output would compare equal whatever the positions
    # Position-blind (the old [4, 0, 0]), the two agree to float64 rounding (2e-16 here); with positions they
    # differ by 4e-4 (std-0.1 weights keep the logits, and so RoPE's effect, small): 1e-9 splits the two.
    assert (moved - blind).abs().max() > 1e-9 * blind.abs().max()
    with pytest.raises(ValueError, match="head_dim=2"):
        tiny("flux", hidden_size=4, num_heads=2)
    assert tiny("flux", hidden_size=4, num_heads=2, rope_axes=[0, 2, 0]).rope_axes == [0, 2, 0]
