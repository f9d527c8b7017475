"""Tests for models/pixart.py: learned sigma, and the fused residuals against PixArt-alpha's unfused blocks."""
import pytest
import torch

from models.layers import patchify, timestep_embedding, unpatchify
from tiny_models import assert_fused_matches_unfused, norm_then_modulate, tiny, timesteps


@pytest.mark.parametrize("norm", ["dyt", "layernorm"])
def test_pixart_learned_sigma_doubles_channels(norm):
    model = tiny("pixart", norm, in_channels=3, learn_sigma=True)
    out = model(torch.randn(2, 3, 16, 16), timesteps("pixart", 2), model.encode_prompts(["1", "one"]))
    assert out.shape == (2, 6, 16, 16)


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


@pytest.mark.parametrize("norm", ["dyt", "layernorm"])
def test_fused_residuals_match_the_unfused_blocks(norm):
    assert_fused_matches_unfused("pixart", norm, pixart_unfused)
