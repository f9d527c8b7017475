"""Compact PixArt-alpha (arXiv 2310.00426) with LayerNorm or DyT as a switch.

Structure of the original: patch embedding + fixed 2-D sin-cos positions; timestep -> sinusoid(256)
-> MLP; adaLN-single (one shared t_block SiLU + Linear D -> 6D, plus a learned (6, D) table per block);
blocks of self-attention, cross-attention to the text (no norm, no gate) and a GELU(tanh) MLP; a final
norm + modulate (its own (2, D) table) + zero-init Linear; unpatchify.

Fusion: each block hands its MLP residual on as pending (see layers.py), so it is added inside the
next block's norm1 (or the final norm) call, and the cross-attention's residual is added inside
norm2's call. Only the self-attention's gated residual is a separate add: cross-attention reads x
right after it, with no norm in between.
"""
from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from .checks import (check_bool, check_choice, check_forward_args, check_heads, check_image_config, check_int,
                     check_positive)
from .layers import (NORMS, CrossAttention, Mlp, MLPEmbedder, Pending, SelfAttention, modulate_pending, modulated_norm,
                     patchify, sincos_2d, timestep_embedding, unpatchify)
from .text import TextEncoder, TextEncoding

# One dict per preset; build_model(..., **overrides) changes any key. text_* configure TinyTextEncoder.
PIXART_PRESETS = {
    # The seed's configuration (xdiffusion's pixart_alpha_dyt on 32x32 MNIST).
    "seed": dict(patch_size=8, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0, learn_sigma=False,
                 text_dim=256, text_depth=2, text_heads=4, text_len=8),
    # CPU-sized: patch 4 on 32x32 -> 64 tokens, ~1.9M parameters.
    "small": dict(patch_size=4, hidden_size=128, depth=6, num_heads=4, mlp_ratio=4.0, learn_sigma=False,
                  text_dim=64, text_depth=2, text_heads=2, text_len=4),
}


class PixArtBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, norm: str) -> None:
        super().__init__()
        self.norm1 = modulated_norm(hidden_size, norm)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = modulated_norm(hidden_size, norm)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor, t6: Tensor, pending: Pending):
        """t6: the shared t_block output (B, 6D). Returns (x, pending MLP residual)."""
        mods = (self.scale_shift_table[None] + rearrange(t6, "b (six d) -> b six d", six=6)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h, x = modulate_pending(self.norm1, x, pending, shift_msa, scale_msa)
        x = x + gate_msa * self.attn(h)
        h, x = self.norm2(self.cross_attn(x, text, text_mask), shift_mlp, scale_mlp, residual=x)
        return x, (self.mlp(h), gate_mlp)


class FinalLayer(nn.Module):
    """PixArt's T2IFinalLayer: norm, modulate by its own (2, D) table + t, Linear to patch pixels."""

    def __init__(self, hidden_size: int, out_dim: int, norm: str) -> None:
        super().__init__()
        self.norm_final = modulated_norm(hidden_size, norm)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: Tensor, t: Tensor, pending: Pending) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        h, _ = modulate_pending(self.norm_final, x, pending, shift, scale)
        return self.linear(h)


class PixArtAlpha(nn.Module):
    """PixArt-alpha for (B, C, H, W) images conditioned on text prompts.

    ``forward(x, t, cond)``: x (B, C, image_size, image_size); t the DDPM step index, a float or
    long tensor (B,) in [0, 1000); cond the TextEncoding from ``encode_prompts``. Returns the
    prediction (B, C, H, W): the noise, or v under ``DDPM(prediction="v")``; (B, 2C, H, W) with
    learn_sigma (the prediction, then variance values).

    >>> import torch
    >>> from models import build_model
    >>> model = build_model("pixart", "small", norm="dyt")
    >>> cond = model.encode_prompts(["7", "seven"])
    >>> model(torch.randn(2, 1, 32, 32), torch.tensor([10, 999]), cond).shape
    torch.Size([2, 1, 32, 32])
    """

    def __init__(self, text_encoder: TextEncoder, *, in_channels: int = 1, image_size: int = 32,
                 patch_size: int = 8, hidden_size: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, learn_sigma: bool = False, norm: str = "dyt") -> None:
        super().__init__()
        check_choice("norm", norm, NORMS)
        check_image_config(in_channels, image_size, patch_size)
        check_heads(hidden_size, num_heads)
        check_int("depth", depth)
        check_positive("mlp_ratio", mlp_ratio)
        check_bool("learn_sigma", learn_sigma)
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.norm = norm
        self.text_encoder = text_encoder
        grid = image_size // patch_size

        self.x_embedder = nn.Linear(in_channels * patch_size ** 2, hidden_size)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid, grid)[None], persistent=False)
        self.t_embedder = MLPEmbedder(256, hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = Mlp(text_encoder.token_dim, hidden_size, hidden_size)
        self.blocks = nn.ModuleList(PixArtBlock(hidden_size, num_heads, mlp_ratio, norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size ** 2 * self.out_channels, norm)
        self._init_weights()

    def _init_weights(self) -> None:
        # PixArt's initialization; the zero-init final Linear makes the first prediction exactly 0.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("text_encoder."):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.t_embedder.in_layer, self.t_embedder.out_layer, self.t_block[1],
                  self.y_embedder.fc1, self.y_embedder.fc2):
            nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def encode_prompts(self, prompts: Sequence[str]) -> TextEncoding:
        """The conditioning for forward, differentiable into the text encoder."""
        return self.text_encoder(prompts)

    def forward(self, x: Tensor, t: Tensor, cond: TextEncoding) -> Tensor:
        check_forward_args(x, t, cond, self.in_channels, self.patch_size, self.image_size)
        x = self.x_embedder(patchify(x, self.patch_size)) + self.pos_embed
        t = self.t_embedder(timestep_embedding(t, 256))
        t6 = self.t_block(t)
        text = self.y_embedder(cond.tokens)
        pending = None
        for block in self.blocks:
            x, pending = block(x, text, cond.mask, t6, pending)
        x = self.final_layer(x, t, pending)
        return unpatchify(x, self.patch_size, self.image_size, self.image_size)
