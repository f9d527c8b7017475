"""Argument checks of the model constructors and forwards: every error names the argument and what it accepts.

A configuration value that is wrong must fail where the model is built, with its name in the message
("depth must be an integer >= 1, got 0"), not later as an unrelated error deep in a layer (a string
hidden size once surfaced as "not all arguments converted during string formatting").
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from dyt_kernels._checks import check_finite


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """An int (not a bool, not a float that happens to be whole) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive(name: str, value: object) -> float:
    try:
        number = check_finite(name, value)
    except ValueError:
        number = 0.0
    if number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_heads(hidden_size: int, num_heads: int, names: tuple[str, str] = ("hidden_size", "num_heads")) -> None:
    check_int(names[0], hidden_size)
    check_int(names[1], num_heads)
    if hidden_size % num_heads:
        raise ValueError(f"{names[0]}={hidden_size} must be divisible by {names[1]}={num_heads}")


def check_image_config(in_channels: int, image_size: int, patch_size: int) -> None:
    check_int("in_channels", in_channels)
    check_int("patch_size", patch_size)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1 or image_size % patch_size:
        raise ValueError(f"image_size must be a positive int divisible by patch_size={patch_size}, "
                         f"got {image_size!r}")


def check_forward_args(x: Tensor, t: Tensor, cond, in_channels: int, patch_size: int,
                       image_size: int | None) -> None:
    """Errors name the argument and the expected shape (static shapes: free under torch.compile)."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must be (B, {in_channels}, H, W), got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if image_size is not None and (H, W) != (image_size, image_size):
        raise ValueError(f"x must be (B, {in_channels}, {image_size}, {image_size}), got {tuple(x.shape)}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"x's height and width must be divisible by patch_size={patch_size}, got {tuple(x.shape)}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be ({x.shape[0]},), one timestep per image, got {tuple(t.shape)}")
    if cond.mask.dtype != torch.bool:
        raise ValueError(f"cond.mask must be bool (True for real tokens, False for padding), got {cond.mask.dtype}: "
                         f"a 0/1 float mask would be added to the attention logits, masking nothing")
    B, T = cond.mask.shape
    if B != x.shape[0] or cond.tokens.shape[:2] != (B, T) or cond.pooled.shape[0] != B:
        raise ValueError(f"cond must hold tokens ({x.shape[0]}, T, D_txt), mask ({x.shape[0]}, T) and pooled "
                         f"({x.shape[0]}, D_pool), got {tuple(cond.tokens.shape)}, {tuple(cond.mask.shape)}, "
                         f"{tuple(cond.pooled.shape)}")
