"""Compact FLUX (Black Forest Labs' FLUX.1 transformer) with LayerNorm/RMSNorm or DyT as a switch.

Structure of the original: img_in / txt_in Linear; vec = MLP(sinusoid(1000 t)) + MLP(pooled text);
double-stream blocks (separate img/txt weights, joint attention over cat(txt, img) with 3-axis RoPE and
per-head QK-norm), then single-stream blocks over cat(txt, img) (one Linear -> qkv | MLP, parallel
attention and GELU(tanh) MLP, one Linear back); LastLayer on the image tokens. Left out: the guidance
embedding (FLUX-dev's distilled guidance scale), which training from scratch has no use for.

Two deliberate differences: padding text tokens are masked out of the joint attention (the prompts
here are one or two words in a fixed-length slot), and the image tokens come from patchify + img_in
on pixels instead of from 2x2-packed VAE latents.

QK-norm under DyT: weight * tanh(alpha * q) per head, starting at alpha0 = qk_alpha_init and weight0 =
qk_weight_init (0.5 and 1 in both presets, the paper's DyT). The projections hand it q and k with an RMS of
0.03-0.17 at initialization, so at those values the attention logits start with a standard deviation of
~0.006 where RMSNorm starts them at ~1; a training recipe can start the DyT at RMSNorm's output scale
instead (alpha0 4, weight0 2: README "How the small recipe was tuned").

Fusion: in a double block the attention's gated residual is added inside norm2's call; every block
hands its last gated residual on as pending (see layers.py), so it is added inside the next block's
first norm (or the final norm) call. It is settled with a plain add only where the two streams are
concatenated.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import (check_choice, check_finite, check_forward_args, check_heads, check_image_config, check_int,
                     check_positive)
from .layers import (NORMS, QK_NORMS, Mlp, MLPEmbedder, Pending, QKNorm, SelfAttention, add_pending, apply_rope,
                     attention, default_rope_axes, image_position_ids, modulate_pending, modulated_norm, patchify,
                     rope_angles, split_heads, timestep_embedding, unpatchify)
from .text import TextEncoder, TextEncoding

# One dict per preset; build_model(..., **overrides) changes any key. text_* configure TinyTextEncoder.
# rope_axes None means default_rope_axes(head_dim): [16, 24, 24] at the seed's head_dim 64.
FLUX_PRESETS = {
    # The seed's configuration (xdiffusion's flux_dyt on 32x32 MNIST).
    "seed": dict(patch_size=8, hidden_size=384, depth_double=6, depth_single=12, num_heads=6, mlp_ratio=4.0,
                 rope_axes=[16, 24, 24], rope_theta=10000.0, qk_alpha_init=0.5, qk_weight_init=1.0, text_dim=256,
                 text_depth=2, text_heads=4, text_len=8),
    # CPU-sized: patch 4 on 32x32 -> 64 image tokens, head_dim 32 -> rope axes [8, 12, 12], ~2.4M parameters.
    "small": dict(patch_size=4, hidden_size=128, depth_double=2, depth_single=4, num_heads=4, mlp_ratio=4.0,
                  rope_axes=None, rope_theta=10000.0, qk_alpha_init=0.5, qk_weight_init=1.0, text_dim=64,
                  text_depth=2, text_heads=2, text_len=4),
}

QK_NORM_FOR = {"dyt": "dyt", "layernorm": "rmsnorm"}


class BlockModulation(NamedTuple):
    """A double-stream block's adaLN chunks, each (B, 1, D): one (shift, scale, gate) per sub-layer."""
    shift_msa: Tensor
    scale_msa: Tensor
    gate_msa: Tensor
    shift_mlp: Tensor
    scale_mlp: Tensor
    gate_mlp: Tensor


class SingleModulation(NamedTuple):
    """A single-stream block's adaLN chunks, each (B, 1, D): its attention and MLP run in parallel."""
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """SiLU + Linear from vec to the named chunks of ``chunks`` (BlockModulation or SingleModulation)."""

    def __init__(self, dim: int, chunks: type[BlockModulation] | type[SingleModulation]) -> None:
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(dim, len(chunks._fields) * dim)

    def forward(self, vec: Tensor):
        return self.chunks(*self.lin(F.silu(vec))[:, None, :].chunk(len(self.chunks._fields), dim=-1))


class StreamLayers(nn.Module):
    """One stream's weights in a double-stream block (FLUX's img_* or txt_* modules)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm: str, qk_norm: str,
                 qk_alpha_init: float, qk_weight_init: float) -> None:
        super().__init__()
        self.mod = Modulation(dim, BlockModulation)
        self.norm1 = modulated_norm(dim, norm)
        self.attn = SelfAttention(dim, num_heads, qk_norm, qk_alpha_init, qk_weight_init)
        self.norm2 = modulated_norm(dim, norm)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def before_attention(self, x: Tensor, vec: Tensor, pending: Pending):
        """(x, mod, (q, k, v)) with the pending residual settled into x."""
        mod = self.mod(vec)
        h, x = modulate_pending(self.norm1, x, pending, mod.shift_msa, mod.scale_msa)
        return x, mod, self.attn.heads(h)

    def after_attention(self, x: Tensor, attn: Tensor, mod: BlockModulation):
        """(x + gate_msa * proj(attn), pending MLP residual)."""
        h, x = self.norm2(self.attn.proj(attn), mod.shift_mlp, mod.scale_mlp, residual=x, gate=mod.gate_msa)
        return x, (self.mlp(h), mod.gate_mlp)


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm: str, qk_norm: str,
                 qk_alpha_init: float, qk_weight_init: float) -> None:
        super().__init__()
        self.img = StreamLayers(dim, num_heads, mlp_ratio, norm, qk_norm, qk_alpha_init, qk_weight_init)
        self.txt = StreamLayers(dim, num_heads, mlp_ratio, norm, qk_norm, qk_alpha_init, qk_weight_init)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, angles: Tensor, mask: Tensor,
                pending: tuple[Pending, Pending]):
        """Returns (img, txt, (img pending, txt pending))."""
        img, img_mods, (img_q, img_k, img_v) = self.img.before_attention(img, vec, pending[0])
        txt, txt_mods, (txt_q, txt_k, txt_v) = self.txt.before_attention(txt, vec, pending[1])
        q = apply_rope(torch.cat([txt_q, img_q], dim=2), angles)
        k = apply_rope(torch.cat([txt_k, img_k], dim=2), angles)
        out = attention(q, k, torch.cat([txt_v, img_v], dim=2), mask)
        T = txt.shape[1]
        img, img_pending = self.img.after_attention(img, out[:, T:], img_mods)
        txt, txt_pending = self.txt.after_attention(txt, out[:, :T], txt_mods)
        return img, txt, (img_pending, txt_pending)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on cat(txt, img): linear1 -> (qkv | mlp), linear2 over both."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm: str, qk_norm: str,
                 qk_alpha_init: float, qk_weight_init: float) -> None:
        super().__init__()
        self.num_heads, self.mlp_hidden = num_heads, int(dim * mlp_ratio)
        self.modulation = Modulation(dim, SingleModulation)
        self.pre_norm = modulated_norm(dim, norm)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.norm = QKNorm(dim // num_heads, qk_norm, qk_alpha_init, qk_weight_init)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)

    def forward(self, x: Tensor, vec: Tensor, angles: Tensor, mask: Tensor, pending: Pending):
        """Returns (x, pending gated residual)."""
        mod = self.modulation(vec)
        h, x = modulate_pending(self.pre_norm, x, pending, mod.shift, mod.scale)
        qkv, mlp = self.linear1(h).split([3 * x.shape[-1], self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = attention(apply_rope(q, angles), apply_rope(k, angles), v, mask)
        return x, (self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=-1)), mod.gate)


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, norm: str) -> None:
        super().__init__()
        self.norm_final = modulated_norm(dim, norm)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor, pending: Pending) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # no gate: nothing follows
        h, _ = modulate_pending(self.norm_final, x, pending, shift, scale)
        return self.linear(h)


class Flux(nn.Module):
    """FLUX for (B, C, H, W) images conditioned on text prompts (rectified flow).

    ``forward(x, t, cond)``: x (B, C, H, W) with H and W divisible by patch_size (RoPE positions
    adapt to the size); t a float tensor (B,) in [0, 1], multiplied by 1000 inside the sinusoidal
    embedding; cond the TextEncoding from ``encode_prompts``. Returns the prediction (B, C, H, W).

    Position ids: text tokens (0, 0, 0), image tokens (0, row, col) on the patch grid.

    >>> import torch
    >>> from models import build_model
    >>> model = build_model("flux", "small", norm="dyt")
    >>> cond = model.encode_prompts(["7", "seven"])
    >>> model(torch.randn(2, 1, 32, 32), torch.rand(2), cond).shape
    torch.Size([2, 1, 32, 32])
    """

    def __init__(self, text_encoder: TextEncoder, *, in_channels: int = 1, image_size: int = 32,
                 patch_size: int = 8, hidden_size: int = 384, depth_double: int = 6, depth_single: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, rope_axes: Sequence[int] | None = None,
                 rope_theta: float = 10000.0, norm: str = "dyt", qk_norm: str | None = None,
                 qk_alpha_init: float = 0.5, qk_weight_init: float = 1.0) -> None:
        super().__init__()
        check_choice("norm", norm, NORMS)
        qk_norm = QK_NORM_FOR[norm] if qk_norm is None else check_choice("qk_norm", qk_norm, QK_NORMS)
        check_image_config(in_channels, image_size, patch_size)
        check_heads(hidden_size, num_heads)
        check_int("depth_double", depth_double, minimum=0)
        check_int("depth_single", depth_single, minimum=0)
        if depth_double + depth_single < 1:
            raise ValueError(f"FLUX needs at least one block: depth_double={depth_double}, depth_single={depth_single}")
        check_positive("mlp_ratio", mlp_ratio)
        check_positive("rope_theta", rope_theta)
        # Where the QK-norm is DyT, where it starts: weight * tanh(alpha * q) with alpha0 = qk_alpha_init and
        # weight0 = qk_weight_init (README "How the small recipe was tuned"). An RMSNorm has neither knob.
        self.qk_alpha_init = check_finite("qk_alpha_init", qk_alpha_init)
        self.qk_weight_init = check_finite("qk_weight_init", qk_weight_init)
        head_dim = hidden_size // num_heads
        rope_axes = default_rope_axes(head_dim) if rope_axes is None else rope_axes
        if (not isinstance(rope_axes, (list, tuple)) or len(rope_axes) != 3 or sum(rope_axes) != head_dim
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 or d % 2 for d in rope_axes)):
            raise ValueError(f"rope_axes must be 3 even sizes summing to head_dim={head_dim}, got {rope_axes!r}")
        rope_axes = list(rope_axes)
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.norm, self.qk_norm = norm, qk_norm
        self.rope_axes, self.rope_theta = rope_axes, rope_theta
        self.text_encoder = text_encoder

        self.img_in = nn.Linear(in_channels * patch_size ** 2, hidden_size)
        self.time_in = MLPEmbedder(256, hidden_size)
        self.vector_in = MLPEmbedder(text_encoder.pooled_dim, hidden_size)
        self.txt_in = nn.Linear(text_encoder.token_dim, hidden_size)
        block_args = (hidden_size, num_heads, mlp_ratio, norm, qk_norm, self.qk_alpha_init, self.qk_weight_init)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(*block_args) for _ in range(depth_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(*block_args) for _ in range(depth_single))
        self.final_layer = LastLayer(hidden_size, patch_size ** 2 * in_channels, norm)
        # Trained from scratch here: start from a zero prediction, as DiT and PixArt do.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def encode_prompts(self, prompts: Sequence[str]) -> TextEncoding:
        """The conditioning for forward, differentiable into the text encoder."""
        return self.text_encoder(prompts)

    def forward(self, x: Tensor, t: Tensor, cond: TextEncoding) -> Tensor:
        check_forward_args(x, t, cond, self.in_channels, self.patch_size, None)
        B, _, H, W = x.shape
        p = self.patch_size
        img = self.img_in(patchify(x, p))
        txt = self.txt_in(cond.tokens)
        vec = self.time_in(timestep_embedding(1000.0 * t, 256)) + self.vector_in(cond.pooled)
        T = txt.shape[1]
        ids = torch.cat([torch.zeros(T, 3, dtype=torch.long, device=x.device),
                         image_position_ids(H // p, W // p, device=x.device)])
        angles = rope_angles(ids, self.rope_axes, self.rope_theta)[None]
        mask = torch.cat([cond.mask, cond.mask.new_ones(B, img.shape[1])], dim=1)

        pending: tuple[Pending, Pending] = (None, None)
        for block in self.double_blocks:
            img, txt, pending = block(img, txt, vec, angles, mask, pending)
        x = torch.cat([add_pending(txt, pending[1]), add_pending(img, pending[0])], dim=1)
        single: Pending = None
        for block in self.single_blocks:
            x, single = block(x, vec, angles, mask, single)
        if single is not None:
            single = (single[0][:, T:], single[1])
        out = self.final_layer(x[:, T:], vec, single)
        return unpatchify(out, p, H, W)
