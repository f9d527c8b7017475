"""Tiny PixArt-alpha / FLUX builds and helpers shared by the model tests (test_models, test_pixart, test_flux,
test_text, test_layers): hidden 32, one or two blocks, 16x16 images, so the Triton path runs under the
interpreter on CPU in seconds."""
import torch
import torch.nn.functional as F

from dyt_kernels import ModulatedDyT
from models import build_model

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


def norm_then_modulate(norm, x, shift, scale):
    """The unfused formulation of a modulated norm: the norm in plain math, then modulate."""
    if isinstance(norm, ModulatedDyT):
        n = torch.tanh(norm.alpha * x)
    else:
        n = F.layer_norm(x, x.shape[-1:], eps=norm.eps)
    return n * (1 + scale) + shift


def assert_fused_matches_unfused(name, norm, unfused):
    """The model's forward (residuals fused into the norms) against ``unfused(model, x, t, cond)``, the
    original's forward with every residual added on its own. float64 stays on the plain-PyTorch path, so
    any difference is the fusion's, not rounding's."""
    model = randomize(tiny(name, norm)).double()
    x, t = torch.randn(3, 1, 16, 16, dtype=torch.float64), timesteps(name, 3)
    with torch.no_grad():
        cond = model.encode_prompts(["5", "five", ""])
        fused = model(x, t, cond)
        expected = unfused(model, x, t, cond)
    assert fused.abs().max() > 1e-3  # a zero output would compare equal whatever the wiring
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)
