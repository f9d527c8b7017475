"""Compact PixArt-alpha and FLUX diffusion transformers on dyt_kernels, with LayerNorm or DyT as a switch.

    >>> import torch
    >>> from models import build_model, count_parameters
    >>> model = build_model("flux", "small", norm="dyt", in_channels=1, image_size=32)
    >>> cond = model.encode_prompts(["7", "seven", ""])
    >>> model(torch.randn(3, 1, 32, 32), torch.rand(3), cond).shape
    torch.Size([3, 1, 32, 32])

Timesteps: PixArt takes the DDPM step index (B,) in [0, 1000); FLUX takes t (B,) in [0, 1].
"""
from __future__ import annotations

from torch import nn

from .checks import check_choice, check_heads, check_int
from .flux import FLUX_PRESETS, Flux
from .layers import NORMS
from .pixart import PIXART_PRESETS, PixArtAlpha
from .text import DIGIT_WORDS, TextEncoder, TextEncoding, TinyTextEncoder, Tokenizer

MODELS = {"pixart": (PixArtAlpha, PIXART_PRESETS), "flux": (Flux, FLUX_PRESETS)}
PRESETS = {name: presets for name, (_, presets) in MODELS.items()}
TEXT_KEYS = {"text_dim": "dim", "text_depth": "depth", "text_heads": "num_heads", "text_len": "max_length"}


def build_model(name: str, preset: str = "seed", norm: str = "dyt", in_channels: int = 1, image_size: int = 32,
                **overrides) -> nn.Module:
    """Build "pixart" or "flux" from a preset ("seed" or "small"), with norm "dyt" or "layernorm".

    overrides replace preset keys (see PIXART_PRESETS / FLUX_PRESETS), plus FLUX's qk_norm ("dyt" or
    "rmsnorm"; default follows norm) and text_encoder (any TextEncoder, e.g. a pretrained one,
    instead of a TinyTextEncoder built from the text_* keys).

    >>> from models import build_model
    >>> tiny = build_model("pixart", "small", norm="layernorm", hidden_size=64, depth=2)
    >>> tiny.norm
    'layernorm'
    """
    check_choice("name", name, tuple(MODELS))
    cls, presets = MODELS[name]
    check_choice("preset", preset, tuple(presets))
    check_choice("norm", norm, NORMS)
    allowed = set(presets[preset]) | {"text_encoder"} | ({"qk_norm"} if name == "flux" else set())
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown {name} override(s) {unknown}; valid keys: {sorted(allowed)}")
    config = {**presets[preset], **overrides}
    text_config = {TEXT_KEYS[k]: config.pop(k) for k in TEXT_KEYS}
    text_encoder = config.pop("text_encoder", None)
    if text_encoder is None:
        _check_text_keys(text_config)
        text_encoder = TinyTextEncoder(norm=norm, **text_config)
    elif not isinstance(text_encoder, TextEncoder):
        raise TypeError(f"text_encoder must implement TextEncoder (token_dim, pooled_dim, __call__(prompts)), "
                        f"got {type(text_encoder).__name__}")
    elif set(overrides) & set(TEXT_KEYS):
        raise ValueError(f"text_* overrides configure the built-in encoder; drop them or text_encoder, got "
                         f"{sorted(set(overrides) & set(TEXT_KEYS))}")
    return cls(text_encoder, in_channels=in_channels, image_size=image_size, norm=norm, **config)


def _check_text_keys(text_config: dict) -> None:
    """The text_* keys checked under the names build_model takes them by."""
    check_heads(text_config["dim"], text_config["num_heads"], ("text_dim", "text_heads"))
    check_int("text_depth", text_config["depth"], minimum=0)
    check_int("text_len", text_config["max_length"], minimum=2)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once), optionally only those with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["build_model", "count_parameters", "MODELS", "NORMS", "PRESETS", "PIXART_PRESETS", "FLUX_PRESETS",
           "PixArtAlpha", "Flux", "TextEncoder", "TextEncoding", "TinyTextEncoder", "Tokenizer", "DIGIT_WORDS"]
