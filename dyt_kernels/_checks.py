"""Argument checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

try:   # torch imports numpy where it is installed; a numpy scalar alpha needs it (as_alpha)
    import numpy as _np
except ImportError:   # pragma: no cover
    _np = None

_FP32_MAX = torch.finfo(torch.float32).max
# The float32 rounding of a real number of at least this magnitude is infinite: the midpoint between
# the largest float32, 2^128 - 2^104, and 2^128, which rounds to even, i.e. up.
_FP32_ROUNDS_TO_INF = 2.0 ** 128 - 2.0 ** 103


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
    """alpha as a 1-D tensor of 1 (shared) or `channels` (per-channel) elements.

    A Python or numpy real number is taken as eager `alpha * x` takes it: in float64 for a float64 x
    (float32 would round 0.1 to 0.100000001490116: 1.5e-8 relative, in a computation exact to 1e-16),
    else in float32, a value past its range rounding to +-inf as the cast of a Python scalar does
    (torch.full refuses to round it: "cannot be converted to type float without overflow")."""
    if _np is not None and isinstance(alpha, _np.ndarray) and torch.compiler.is_compiling():
        alpha = _traced_numpy_alpha(alpha, x)
    if not isinstance(alpha, Tensor):
        if isinstance(alpha, bool):
            raise TypeError(f"alpha must be a real number or a torch.Tensor, got bool {alpha!r}")
        if not isinstance(alpha, numbers.Real):  # Python and numpy scalars are Real
            raise TypeError(f"alpha must be a real number or a torch.Tensor, got {type(alpha).__name__}")
        try:
            value = float(alpha)
        except OverflowError:
            raise ValueError(f"alpha must be a real number within float64's range, got an int of "
                             f"{int(alpha).bit_length()} bits") from None
        if x.dtype == torch.float64:
            alpha = _filled(value, x, torch.float64)
        elif abs(value) > _FP32_MAX and value == value:   # rounds to +-inf (or to the max, at its edge)
            # rounded here, as torch.tensor([value], dtype=torch.float32) rounds it: traced
            # (torch.compile, torch.export), that tensor is a float32 constant, which refuses it
            big = _FP32_MAX if abs(value) < _FP32_ROUNDS_TO_INF else math.inf
            alpha = torch.full((1,), big if value > 0 else -big, device=x.device, dtype=torch.float32)
        else:
            alpha = _filled(value, x, torch.float32)
    if alpha.numel() != 1 and (alpha.dim() != 1 or alpha.shape[0] != channels):
        raise ValueError(
            f"alpha must have 1 element (scalar) or shape ({channels},) (per channel), got {shape_str(alpha)}"
        )
    return check_param("alpha", alpha, x, alpha.numel())


def _filled(value: float, x: Tensor, dtype: torch.dtype) -> Tensor:
    """torch.full((1,), value): traced, ones * value, the same number. torch.compile passes a Python
    float argument in as a symbol that becomes a tensor input of the graph, which a product takes
    and torch.full's fill value does not: with torch.full the graph was specialized on the value, a
    recompile for every new alpha (up to dynamo's recompile limit, then eager)."""
    if torch.compiler.is_compiling():
        return torch.ones(1, device=x.device, dtype=dtype) * value
    return torch.full((1,), value, device=x.device, dtype=dtype)


def _traced_numpy_alpha(alpha, x: Tensor):
    """A numpy scalar alpha as torch.compile traces it: dynamo hands it in as a 0-d ndarray (which
    the checks refuse by name), so it is taken here as eager takes the number: a real value through
    float64 (as float(alpha) goes), then in x's compute dtype, a float32 past its range rounding to
    +-inf as the cast does. Other arrays (bool, complex, n-d) go to the checks as they are."""
    if alpha.ndim != 0:
        return alpha
    t = torch.as_tensor(alpha)
    if t.dtype == torch.bool or t.dtype.is_complex:
        return alpha
    t = t.to(device=x.device, dtype=torch.float64).reshape(1)
    return t if x.dtype == torch.float64 else t.to(torch.float32)


def _dtensor_class():
    """torch's DTensor class where torch.distributed.tensor is imported (no DTensor exists before)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def check_same_kind(name: str, t: Tensor, x: Tensor) -> Tensor:
    """t, refused by name where one of t and x is a DTensor and the other a plain tensor that DTensor
    would not replicate implicitly (more than one element, outside torch's implicit_replication()).
    DTensor refuses such a mix itself, from inside the plain ops, naming no argument ("aten.mul.Tensor
    got mixed torch.Tensor and DTensor"). Plain tensors on both sides cost two type checks."""
    if (type(t) is Tensor or type(t) is torch.nn.Parameter) and (type(x) is Tensor or type(x) is torch.nn.Parameter):
        return t
    dtensor = _dtensor_class()
    if dtensor is None:
        return t
    x_dist, t_dist = isinstance(x, dtensor), isinstance(t, dtensor)
    if x_dist == t_dist or (x if t_dist else t).numel() == 1 or _implicit_replication(dtensor):
        return t
    if x_dist:
        raise TypeError(f"{name} is a plain torch.Tensor but x is a DTensor; make it one on x's mesh "
                        f"(distribute_tensor({name}, x.device_mesh, [Replicate()]), or nn.Module parameters "
                        f"through torch's parallel styles), or pass x.to_local()")
    raise TypeError(f"{name} is a DTensor but x is a plain torch.Tensor; pass x as a DTensor on {name}'s mesh, "
                    f"or {name}.full_tensor() (a module sharded by fully_shard holds DTensor parameters "
                    f"outside its root's forward)")


def _implicit_replication(dtensor) -> bool:
    """Whether torch's implicit_replication() context is on (DTensor then replicates plain tensors)."""
    flag = getattr(torch._C, "_get_dtensor_allow_implicit_replication", None)
    if flag is not None:
        return flag()
    return bool(getattr(getattr(dtensor, "_op_dispatcher", None), "_allow_implicit_replication", False))


def _replicated_if_one_sharded_element(p: Tensor) -> Tensor:
    """A one-element DTensor sharded over its dim (a partition function that shards every 1-D
    parameter) as a replicated one: the plain ops view a one-element alpha/weight/bias as a scalar,
    which DTensor refuses on a sharded dim ("would remove or reshape sharded dimension 0").
    redistribute is differentiable: the gradient goes back sharded."""
    if p.numel() == 1 and type(p) is not Tensor and type(p) is not torch.nn.Parameter:
        dtensor = _dtensor_class()
        if dtensor is not None and isinstance(p, dtensor) and any(pl.is_shard() for pl in p.placements):
            from torch.distributed.tensor import Replicate
            return p.redistribute(p.device_mesh, [Replicate()] * p.device_mesh.ndim)
    return p


def check_param(name: str, p: Tensor | None, x: Tensor, channels: int) -> Tensor | None:
    if p is None:
        return None
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    _check_layout(name, p)
    check_same_kind(name, p, x)
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
    p = _replicated_if_one_sharded_element(p)
    return resolved(p if p.is_contiguous() else p.contiguous())


def modulation_fits(m: Tensor, B: int, L: int, D: int) -> bool:
    """Whether m is (B, D), (B, 1, D) or (B, L, D). Compared by rank: `tuple(m.shape) in ((B, D), ...)`
    would compare L with D for a (B, L, D) m, which torch.export records as a guard L != D on a dynamic L."""
    if m.dim() == 2:
        return m.shape[0] == B and m.shape[1] == D
    return m.dim() == 3 and m.shape[0] == B and m.shape[2] == D and (m.shape[1] == 1 or m.shape[1] == L)


def check_modulation(name: str, m: Tensor | None, x: Tensor) -> Tensor | None:
    """shift / scale / gate: (B, D), (B, 1, D) or (B, L, D) for x of shape (B, L, D)."""
    if m is None:
        return None
    B, L, D = x.shape
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    _check_layout(name, m)
    check_same_kind(name, m, x)
    if not modulation_fits(m, B, L, D):
        raise ValueError(f"{name} must be (B, D), (B, 1, D) or (B, L, D) with B={B}, L={L}, D={D}, "
                         f"got {shape_str(m)}")
    if m.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {m.dtype}")
    if m.device != x.device:
        raise ValueError(f"{name} is on {m.device} but x is on {x.device}; move them to one device")
    return resolved(m)
