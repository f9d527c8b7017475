"""Tests for models/layers.py: patches and positions, RoPE, and the norm switch's QK-norm starts."""
import torch
from torch import nn

from dyt_kernels import DyT
from models.layers import (apply_rope, default_rope_axes, image_position_ids, patchify, qk_norm_layer, rope_angles,
                           split_heads, unpatchify)


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




def test_split_heads_matches_the_channel_layout():
    """qkv's channels are (q | k | v), each (head 0 | head 1 | ...): head h of q is channels h*d:(h+1)*d."""
    B, L, H, d = 2, 5, 3, 4
    qkv = torch.randn(B, L, 3 * H * d)
    q, k, v = split_heads(qkv, H)
    assert q.shape == (B, H, L, d)
    for i, part in enumerate((q, k, v)):
        for h in range(H):
            start = i * H * d + h * d
            torch.testing.assert_close(part[:, h], qkv[:, :, start:start + d], rtol=0, atol=0)


def test_qk_norm_layer_starts():
    dyt = qk_norm_layer(8, "dyt", alpha_init=4.0, weight_init=2.0)
    assert isinstance(dyt, DyT) and dyt.bias is None
    assert dyt.alpha.item() == 4.0 and set(dyt.weight.tolist()) == {2.0}
    rms = qk_norm_layer(8, "rmsnorm", alpha_init=4.0, weight_init=2.0)  # an RMSNorm has neither start
    assert isinstance(rms, nn.RMSNorm) and set(rms.weight.tolist()) == {1.0}
