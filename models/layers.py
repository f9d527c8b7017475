"""Pieces PixArt-alpha and FLUX share: the norm switch, attention, MLPs, timestep and position encodings.

The norm switch lives here so both models swap LayerNorm for DyT the same way:

    norm="dyt"        every norm is DyT (alpha0 = 0.5); modulated norms call dyt_modulate
    norm="layernorm"  the originals: LayerNorm (no affine, eps 1e-6) through layernorm_modulate

A "pending residual" is a branch output not yet added to the stream: ``(branch, gate)`` stands for
``x + gate * branch`` (``x + branch`` when gate is None). A block hands it to whatever comes next, so
when the next thing is a modulated norm, the add and the norm run as one fused call.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dyt_kernels import DyT, ModulatedDyT, layernorm_modulate

from .checks import check_choice

NORMS = ("dyt", "layernorm")
QK_NORMS = ("dyt", "rmsnorm")
# The originals' eps for their LayerNorms and RMSNorms.
NORM_EPS = 1e-6

Pending = Optional[Tuple[Tensor, Optional[Tensor]]]


# ----------------------------------------------------------------------------- norms


class ModulatedLayerNorm(nn.Module):
    """LayerNorm (no affine) + adaLN modulate, the original blocks' norm; same call as ModulatedDyT."""

    def __init__(self, hidden_size: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor, residual: Tensor | None = None,
                gate: Tensor | None = None):
        return layernorm_modulate(x, shift, scale, residual=residual, gate=gate, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


def modulated_norm(hidden_size: int, norm: str) -> nn.Module:
    """The norm in front of an adaLN modulation: forward(x, shift, scale, residual=None, gate=None)."""
    check_choice("norm", norm, NORMS)
    return ModulatedDyT(hidden_size) if norm == "dyt" else ModulatedLayerNorm(hidden_size)


def plain_norm(dim: int, norm: str) -> nn.Module:
    """An affine norm with no modulation (the text encoder's pre-norms)."""
    check_choice("norm", norm, NORMS)
    return DyT(dim) if norm == "dyt" else nn.LayerNorm(dim)


def qk_norm_layer(head_dim: int, qk_norm: str, alpha_init: float = 0.5, weight_init: float = 1.0) -> nn.Module:
    """FLUX's per-head QK-norm: an RMSNorm (learnable scale, no bias), or its DyT stand-in with the same
    parameter set, starting at weight_init * tanh(alpha_init * q). An RMSNorm has neither start."""
    check_choice("qk_norm", qk_norm, QK_NORMS)
    if qk_norm == "dyt":
        return DyT(head_dim, bias=False, alpha_init_value=alpha_init, weight_init_value=weight_init)
    return nn.RMSNorm(head_dim, eps=NORM_EPS)


def modulate_pending(norm: nn.Module, x: Tensor, pending: Pending, shift: Tensor, scale: Tensor):
    """(h, x'): x' = x plus the pending residual, h = the modulated norm of x', in one norm call."""
    if pending is None:
        return norm(x, shift, scale), x
    branch, gate = pending
    return norm(branch, shift, scale, residual=x, gate=gate)


def add_pending(x: Tensor, pending: Pending) -> Tensor:
    """Settle a pending residual where no norm follows to fuse it into."""
    if pending is None:
        return x
    branch, gate = pending
    return x + branch if gate is None else x + gate * branch


# ----------------------------------------------------------------------------- attention and MLPs


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*D) -> q, k, v, each (B, H, L, D/H) (views of qkv)."""
    return rearrange(qkv, "b l (qkv h d) -> qkv b h l d", qkv=3, h=num_heads).unbind(0)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention over (B, H, L, d) heads -> (B, L, H*d).

    key_mask (B, Lk) bool marks the keys that may be attended to; every row needs at least one
    (the text tokenizer always emits an end token, so even "" has one). It must be bool: torch adds a
    float mask to the logits, so a 0/1 float mask would mask nothing.
    """
    if key_mask is not None and key_mask.dtype != torch.bool:
        raise ValueError(f"key_mask must be a bool tensor (True: may be attended to), got {key_mask.dtype}: "
                         f"a float mask would be added to the attention logits instead of masking")
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(out, "b h l d -> b l (h d)")


class SelfAttention(nn.Module):
    """Multi-head self-attention (qkv with bias, optional per-head QK-norm, output projection)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None = None, qk_alpha_init: float = 0.5,
                 qk_weight_init: float = 1.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = None if qk_norm is None else QKNorm(dim // num_heads, qk_norm, qk_alpha_init, qk_weight_init)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, L, d), QK-normalized; FLUX's joint attention concatenates these across streams."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        if self.norm is not None:
            q, k = self.norm(q, k, v)
        return q, k, v

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return self.proj(attention(*self.heads(x), key_mask))


class QKNorm(nn.Module):
    """FLUX's per-head query/key normalization (RMSNorm, or DyT under the switch)."""

    def __init__(self, head_dim: int, qk_norm: str, alpha_init: float = 0.5, weight_init: float = 1.0) -> None:
        super().__init__()
        self.query_norm = qk_norm_layer(head_dim, qk_norm, alpha_init, weight_init)
        self.key_norm = qk_norm_layer(head_dim, qk_norm, alpha_init, weight_init)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class CrossAttention(nn.Module):
    """PixArt's cross-attention: queries from the image tokens, keys/values from the text tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        q = rearrange(self.q_linear(x), "b l (h d) -> b h l d", h=self.num_heads)
        k, v = rearrange(self.kv_linear(context), "b l (kv h d) -> kv b h l d", kv=2, h=self.num_heads).unbind(0)
        return self.proj(attention(q, k, v, context_mask))


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear: the transformer MLP of both models, and PixArt's caption projection."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, in_dim if out_dim is None else out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: PixArt's timestep embedder, FLUX's time_in and vector_in."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        # Sinusoids come in fp32 and a plugged-in text encoder may pool in its own dtype.
        return self.out_layer(F.silu(self.in_layer(x.to(self.in_layer.weight.dtype))))


# ----------------------------------------------------------------------------- encodings


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), [cos | sin] over geometric frequencies, in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions -> (N, dim) [sin | cos] features."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D position embedding (grid_h*grid_w, dim), row-major; half the channels encode the row."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs hidden size divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)
    return emb.float()


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p), tokens row-major over the patch grid."""
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch_size, p2=patch_size)


def unpatchify(x: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """The inverse of patchify: (B, L, C*p*p) -> (B, C, H, W)."""
    return rearrange(x, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=height // patch_size, w=width // patch_size,
                     p1=patch_size, p2=patch_size)


def default_rope_axes(head_dim: int) -> list[int]:
    """[head_dim - 2k, k, k] with k = 2*max(1, floor(3*head_dim/16)): [16, 24, 24] for FLUX's seed head_dim 64.

    Axis 0 (the image index) is 0 for every token here, so its channels are not rotated; the row and
    column axes share the rest equally, at least one channel pair each (head_dim 4: [0, 2, 2]; the
    plain formula's [4, 0, 0] would rotate nothing and leave the image tokens without positions).
    Every axis needs an even size (channels rotate in pairs), so head_dim 2 has no default.
    """
    if head_dim < 4:
        raise ValueError(f"FLUX's default rope_axes need head_dim >= 4 (a channel pair each for rows and columns), "
                         f"got head_dim={head_dim}; give rope_axes, or fewer heads")
    k = 2 * max(1, (3 * head_dim) // 16)
    return [head_dim - 2 * k, k, k]


def rope_angles(ids: Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> Tensor:
    """Rotation angles (..., L, head_dim/2) for position ids (..., L, n_axes), one frequency band per axis."""
    parts = []
    for i, d in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, d, 2, device=ids.device, dtype=torch.float32) / d)
        parts.append(ids[..., i:i + 1].float() * freqs)
    return torch.cat(parts, dim=-1)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, H, L, d) by angles (B or 1, L, d/2), in fp32
    or better."""
    cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
    x0, x1 = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)
    return out.to(x.dtype)


def image_position_ids(grid_h: int, grid_w: int, device=None) -> Tensor:
    """FLUX's image ids (grid_h*grid_w, 3): (0, row, col), row-major like patchify."""
    rows, cols = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device),
                                indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
