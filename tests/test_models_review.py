"""PixArt-alpha and FLUX against diffusers' independent implementations (PixArtTransformer2DModel,
FluxTransformer2DModel), weights copied across, in float64. The fused-vs-unfused tests in test_pixart.py and
test_flux.py reuse this project's attention, RoPE, embeddings and head split, so they cannot see a mistake
inside those; these compare every piece with code written by others. LayerNorm twins (diffusers has no DyT);
the DyT models differ only in the norm, which test_pixart/test_flux check against plain math."""
import pytest
import torch

from models import TextEncoding
from models.layers import image_position_ids, patchify, sincos_2d, unpatchify
from tiny_models import randomize, tiny, timesteps

diffusers = pytest.importorskip("diffusers")
D, H, P = 32, 2, 4  # tiny_models' hidden size, heads and patch


def linear(sd, dst, src, rows=slice(None)):
    sd[dst + ".weight"], sd[dst + ".bias"] = src.weight[rows], src.bias[rows]


def thirds(sd, names, src):
    for j, name in enumerate(names):
        linear(sd, name, src, slice(j * D, (j + 1) * D))


def test_pixart_matches_diffusers():
    torch.manual_seed(0)
    model = randomize(tiny("pixart", "layernorm")).double()
    ref = diffusers.PixArtTransformer2DModel(
        sample_size=16, in_channels=1, out_channels=1, patch_size=P, num_attention_heads=H, attention_head_dim=D // H,
        num_layers=2, cross_attention_dim=D, caption_channels=16, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1, use_additional_conditions=False,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000).double()
    sd = {"pos_embed.proj.weight": model.x_embedder.weight.reshape(D, 1, P, P),
          "pos_embed.proj.bias": model.x_embedder.bias,
          "scale_shift_table": model.final_layer.scale_shift_table}
    linear(sd, "adaln_single.emb.timestep_embedder.linear_1", model.t_embedder.in_layer)
    linear(sd, "adaln_single.emb.timestep_embedder.linear_2", model.t_embedder.out_layer)
    linear(sd, "adaln_single.linear", model.t_block[1])
    linear(sd, "caption_projection.linear_1", model.y_embedder.fc1)
    linear(sd, "caption_projection.linear_2", model.y_embedder.fc2)
    linear(sd, "proj_out", model.final_layer.linear)
    for i, b in enumerate(model.blocks):
        p = f"transformer_blocks.{i}."
        sd[p + "scale_shift_table"] = b.scale_shift_table
        thirds(sd, [p + "attn1.to_q", p + "attn1.to_k", p + "attn1.to_v"], b.attn.qkv)
        linear(sd, p + "attn1.to_out.0", b.attn.proj)
        linear(sd, p + "attn2.to_q", b.cross_attn.q_linear)
        thirds(sd, [p + "attn2.to_k", p + "attn2.to_v"], b.cross_attn.kv_linear)
        linear(sd, p + "attn2.to_out.0", b.cross_attn.proj)
        linear(sd, p + "ff.net.0.proj", b.mlp.fc1)
        linear(sd, p + "ff.net.2", b.mlp.fc2)
    assert ref.load_state_dict(sd, strict=False) == ([], [])
    # PixArt's (MAE's) sin-cos table puts the column's features first; models.layers puts the row's first, a
    # fixed channel permutation of the same features (equivalent under a permutation of the learned weights).
    theirs = ref.pos_embed.pos_embed[0].float()
    torch.testing.assert_close(torch.cat([theirs[:, D // 2:], theirs[:, :D // 2]], 1), sincos_2d(D, 4, 4))
    ref.pos_embed.pos_embed = model.pos_embed.clone()
    x, t = torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.tensor([3, 500, 999])
    with torch.no_grad():
        cond = model.encode_prompts(["a handwritten 3", "7", ""])  # 4, 2 and 1 real tokens: the mask matters
        ours = model(x, t, cond)
        out = ref(x, encoder_hidden_states=cond.tokens, timestep=t, encoder_attention_mask=cond.mask.double(),
                  return_dict=False)[0]
    assert ours.abs().max() > 0.1
    # The same float64 operations up to summation order: agreement to ~1e-15 (0 observed); 1e-12 has room.
    torch.testing.assert_close(ours, out, rtol=1e-12, atol=1e-12)


def test_flux_matches_diffusers():
    torch.manual_seed(0)
    model = randomize(tiny("flux", "layernorm")).double()
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=P * P, out_channels=P * P, num_layers=2, num_single_layers=2,
        attention_head_dim=D // H, num_attention_heads=H, joint_attention_dim=16, pooled_projection_dim=16,
        guidance_embeds=False, axes_dims_rope=tuple(model.rope_axes)).double()
    sd = {}
    linear(sd, "x_embedder", model.img_in)
    linear(sd, "context_embedder", model.txt_in)
    linear(sd, "time_text_embed.timestep_embedder.linear_1", model.time_in.in_layer)
    linear(sd, "time_text_embed.timestep_embedder.linear_2", model.time_in.out_layer)
    linear(sd, "time_text_embed.text_embedder.linear_1", model.vector_in.in_layer)
    linear(sd, "time_text_embed.text_embedder.linear_2", model.vector_in.out_layer)
    for i, b in enumerate(model.double_blocks):
        p = f"transformer_blocks.{i}."
        linear(sd, p + "norm1.linear", b.img.mod.lin)
        linear(sd, p + "norm1_context.linear", b.txt.mod.lin)
        thirds(sd, [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"], b.img.attn.qkv)
        thirds(sd, [p + "attn.add_q_proj", p + "attn.add_k_proj", p + "attn.add_v_proj"], b.txt.attn.qkv)
        for name, norm in [("norm_q", b.img.attn.norm.query_norm), ("norm_k", b.img.attn.norm.key_norm),
                           ("norm_added_q", b.txt.attn.norm.query_norm), ("norm_added_k", b.txt.attn.norm.key_norm)]:
            sd[p + "attn." + name + ".weight"] = norm.weight
        linear(sd, p + "attn.to_out.0", b.img.attn.proj)
        linear(sd, p + "attn.to_add_out", b.txt.attn.proj)
        for ff, stream in (("ff", b.img), ("ff_context", b.txt)):
            linear(sd, p + ff + ".net.0.proj", stream.mlp.fc1)
            linear(sd, p + ff + ".net.2", stream.mlp.fc2)
    for i, b in enumerate(model.single_blocks):
        p = f"single_transformer_blocks.{i}."
        linear(sd, p + "norm.linear", b.modulation.lin)
        thirds(sd, [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"], b.linear1)
        linear(sd, p + "proj_mlp", b.linear1, slice(3 * D, None))
        sd[p + "attn.norm_q.weight"], sd[p + "attn.norm_k.weight"] = b.norm.query_norm.weight, b.norm.key_norm.weight
        linear(sd, p + "proj_out", b.linear2)
    last = model.final_layer.adaLN_modulation[1]  # FLUX's (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift)
    sd["norm_out.linear.weight"] = torch.cat([last.weight[D:], last.weight[:D]])
    sd["norm_out.linear.bias"] = torch.cat([last.bias[D:], last.bias[:D]])
    linear(sd, "proj_out", model.final_layer.linear)
    assert ref.load_state_dict(sd, strict=False) == ([], [])
    x, t = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    with torch.no_grad():
        cond = model.encode_prompts(["a handwritten 3", "the digit seven"])
        assert cond.mask.all()  # diffusers' FLUX takes no text mask: full prompts
        ours = model(x, t, cond)
        T = cond.tokens.shape[1]
        out = ref(hidden_states=patchify(x, P), encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled,
                  timestep=t, img_ids=image_position_ids(4, 4).double(), txt_ids=torch.zeros(T, 3, dtype=torch.float64),
                  return_dict=False)[0]
    assert ours.abs().max() > 0.1
    # float64 except RoPE's cos/sin, which both compute from fp32 (models.layers.rope_angles) or cast to it:
    # their ~1e-7 relative differences reach the output through the (weak, std-0.1 weights) attention as ~1e-10
    # observed; a wiring mistake is O(0.1). 1e-7 leaves room for fp32 rotation rounding and catches any mistake.
    torch.testing.assert_close(ours, unpatchify(out, P, 16, 16), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("norm", ["dyt", "layernorm"])
@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_padding_changes_nothing(name, norm):
    """The same prompts with 5 padding slots or none (cond cut to the longest prompt's real tokens) give the
    same images: padding is masked out of every attention (text encoder, cross / joint attention)."""
    torch.manual_seed(0)
    model = randomize(tiny(name, norm, text_len=8)).double()
    x, t = torch.randn(2, 1, 16, 16, dtype=torch.float64), timesteps(name, 2)
    with torch.no_grad():
        cond = model.encode_prompts(["7", "a 3"])
        n = int(cond.mask.sum(1).max())
        assert n == 3
        cut = TextEncoding(cond.tokens[:, :n], cond.mask[:, :n], cond.pooled)
        padded, unpadded = model(x, t, cond), model(x, t, cut)
    assert padded.abs().max() > 0.1
    # float64; the only difference is exp(-inf) = 0 terms in softmax sums: 8e-16 observed.
    torch.testing.assert_close(padded, unpadded, rtol=1e-12, atol=1e-12)
