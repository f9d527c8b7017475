"""Argument checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_finite(name: str, value: object) -> float:
    """A plain finite number (int, float or a numpy scalar; not a bool or a string), as a float."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, (bool, str, bytes)) or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def shape_str(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


# Dense tensors, and nested jagged ones (functional.py sends those to the plain ops, which torch's
# nested tensors implement); sparse and mkldnn layouts are refused by name.
INPUT_LAYOUTS = (torch.strided, torch.jagged)


def _check_layout(name: str, t: Tensor, layouts: tuple = (torch.strided,)) -> None:
    if t.layout not in layouts:
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout}; convert it with .to_dense()")


def resolved(t: Tensor) -> Tensor:
    """t with a lazy negation applied: torch marks some views negated instead of negating memory
    (z.conj().imag of a complex z, and any view of one), and the kernels read memory through raw
    pointers, so such a tensor is copied negated (resolve_neg is differentiable). Others come back as
    they are, the very object (dynamo traces resolve_neg, not is_neg)."""
    return t.resolve_neg()


def check_input(name: str, x: object, min_dim: int = 1) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _check_layout(name, x, INPUT_LAYOUTS)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {shape_str(x)}")
    return resolved(x)


def as_alpha(alpha: object, x: Tensor, channels: int) -> Tensor:
    """alpha as a 1-D tensor of 1 (shared) or `channels` (per-channel) elements."""
    if not isinstance(alpha, Tensor):
        if isinstance(alpha, bool):
            raise TypeError(f"alpha must be a real number or a torch.Tensor, got bool {alpha!r}")
        if isinstance(alpha, numbers.Real):  # Python and numpy scalars
            return torch.full((1,), float(alpha), device=x.device, dtype=torch.float32)
        raise TypeError(f"alpha must be a real number or a torch.Tensor, got {type(alpha).__name__}")
    if alpha.numel() != 1 and (alpha.dim() != 1 or alpha.shape[0] != channels):
        raise ValueError(
            f"alpha must have 1 element (scalar) or shape ({channels},) (per channel), got {shape_str(alpha)}"
        )
    return check_param("alpha", alpha, x, alpha.numel())


def check_param(name: str, p: Tensor | None, x: Tensor, channels: int) -> Tensor | None:
    if p is None:
        return None
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    _check_layout(name, p)
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
    if p.numel() != channels or (p.dim() != 1 and name != "alpha"):
        raise ValueError(f"{name} must have shape ({channels},), got {shape_str(p)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}; move them to one device")
    # The kernels index per-channel vectors with unit stride: a strided view (a column of a packed
    # table) is copied, which autograd differentiates through.
    if p.dim() != 1:
        p = p.reshape(-1)
    return resolved(p if p.is_contiguous() else p.contiguous())


def check_modulation(name: str, m: Tensor | None, x: Tensor) -> Tensor | None:
    """shift / scale / gate: (B, D), (B, 1, D) or (B, L, D) for x of shape (B, L, D)."""
    if m is None:
        return None
    B, L, D = x.shape
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    _check_layout(name, m)
    # compared by rank: `tuple(m.shape) in ((B, D), ...)` would compare L with D for a (B, L, D) m,
    # which torch.export records as a guard L != D on a dynamic L
    ok = (m.shape[0] == B and m.shape[1] == D if m.dim() == 2 else
          m.dim() == 3 and m.shape[0] == B and m.shape[2] == D and (m.shape[1] == 1 or m.shape[1] == L))
    if not ok:
        raise ValueError(f"{name} must be (B, D), (B, 1, D) or (B, L, D) with B={B}, L={L}, D={D}, "
                         f"got {shape_str(m)}")
    if m.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {m.dtype}")
    if m.device != x.device:
        raise ValueError(f"{name} is on {m.device} but x is on {x.device}; move them to one device")
    return resolved(m)
