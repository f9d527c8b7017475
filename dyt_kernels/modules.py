"""nn.Modules over the functional ops: DyT (a drop-in for nn.LayerNorm) and ModulatedDyT (adaLN)."""
import math
import numbers
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_finite, modulation_fits
from .functional import dyt, dyt_modulate


def _shape_tuple(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    """nn.LayerNorm's normalized_shape: one positive integer or a non-empty sequence of them."""
    dims = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else normalized_shape
    ok = isinstance(dims, Sequence) and not isinstance(dims, (str, bytes)) and len(dims) > 0 and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims)
    if not ok or isinstance(normalized_shape, bool):
        raise ValueError(f"normalized_shape must be positive ints (one, or a non-empty sequence of them), "
                         f"got {normalized_shape!r}")
    return tuple(int(d) for d in dims)


def _flag(name: str, value: object) -> bool:
    """A DyT-only switch: True or False (a numpy bool too), as dyt's channels_last. A string from a
    config ("False") is truthy, and would silently pick the other layout or alpha shape."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if value is True or value is False or numpy_bool:
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_dtype(dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (the parameters are trained), got {dtype!r}")


ALPHA = "alpha"


class DyTCheckpointWarning(UserWarning):
    """A load that would lose DyT alphas, or give a DyT no alpha from the checkpoint."""


def _warn_on_layernorm_state(module, state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook of every DyT: a LayerNorm checkpoint has weights but no alpha."""
    if prefix + ALPHA in state_dict:
        return
    if any(prefix + name in state_dict for name in ("weight", "bias")):
        warnings.warn(
            f"the state dict has '{prefix}weight' but no '{prefix}{ALPHA}': it looks like a LayerNorm "
            f"checkpoint loaded into a DyT model. Under strict=False alpha keeps its current value "
            f"{module.alpha.detach().flatten()[:4].tolist()}. Load a LayerNorm checkpoint before converting: "
            f"model.load_state_dict(state); convert_layernorm_to_dyt(model).", DyTCheckpointWarning, stacklevel=4)


def _flat(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.reshape(-1)


def _alpha_weight_bias(module: nn.Module) -> tuple:
    """module.alpha, module.weight, module.bias, read from the module's parameter dict where they live
    there: nn.Module.__getattr__ costs ~0.4 µs a read, three reads as much as the rest of a small
    call's Python. Where one is not in the dict (a parametrization or weight_norm moved it, a
    subclass redefines it) all three are read as attributes, so the op gets what the module answers."""
    params = module._parameters
    try:
        return params["alpha"], params["weight"], params["bias"]
    except KeyError:
        return module.alpha, module.weight, module.bias


class DyT(nn.Module):
    """Dynamic Tanh, ``weight * tanh(alpha * x) + bias``: replaces ``nn.LayerNorm`` one word for one.

    Takes every argument nn.LayerNorm takes. DyT has no epsilon: ``eps`` is accepted and ignored,
    and the ``eps`` attribute reads NaN, so code that would apply LayerNorm math to a module with
    ``.eps`` (PyTorch's fused TransformerEncoderLayer inference path, which requires
    ``norm1.eps == norm2.eps``) never mistakes a DyT for a LayerNorm.

    Args beyond LayerNorm's: ``alpha_init_value`` (0.5 in the paper), ``weight_init_value`` (1, where
    ``reset_parameters`` starts the weight), ``alpha_per_channel`` (one alpha per element of
    normalized_shape instead of one shared scalar) and ``channels_last`` (False: normalize dim 1 of an
    (N, C, ...) tensor, as in ConvNeXt; normalized_shape is then C).

    >>> import torch
    >>> from dyt_kernels import DyT
    >>> norm = DyT(384)                  # was nn.LayerNorm(384)
    >>> norm(torch.randn(2, 16, 384)).shape
    torch.Size([2, 16, 384])
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None, *,
                 alpha_init_value: float = 0.5, alpha_per_channel: bool = False,
                 channels_last: bool = True, weight_init_value: float = 1.0) -> None:
        super().__init__()
        self.normalized_shape = _shape_tuple(normalized_shape)
        _check_dtype(dtype)
        channels_last, alpha_per_channel = _flag("channels_last", channels_last), _flag("alpha_per_channel",
                                                                                        alpha_per_channel)
        if not channels_last and len(self.normalized_shape) != 1:
            raise ValueError(f"channels_last=False normalizes one dim (C); normalized_shape must be an int, "
                             f"got {normalized_shape!r}")
        self.eps = math.nan
        self.elementwise_affine = elementwise_affine
        self.alpha_init_value = check_finite("alpha_init_value", alpha_init_value)
        self.weight_init_value = check_finite("weight_init_value", weight_init_value)
        self.alpha_per_channel = alpha_per_channel
        self.channels_last = channels_last
        factory = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty(self.normalized_shape if alpha_per_channel else (1,), **factory))
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_warn_on_layernorm_state)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init_value)
            if self.weight is not None:
                self.weight.fill_(self.weight_init_value)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    @torch.jit.ignore
    def _forward(self, x: Tensor) -> Tensor:
        # Under torch.jit.script this stays a Python call (the ops are Triton launches or custom ops).
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        alpha, weight, bias = _alpha_weight_bias(self)
        if not self.channels_last:
            if x.dim() < 2 or x.shape[1] != self.normalized_shape[0]:
                raise ValueError(f"x must be (N, C={self.normalized_shape[0]}, ...) for channels_last=False, "
                                 f"got shape {tuple(x.shape)}")
            return dyt(x, alpha.reshape(-1), weight, bias, channels_last=False)
        k = len(self.normalized_shape)
        # torch.Size is a tuple: its last k sizes against normalized_shape (all of them, so a mismatch,
        # where x has fewer than k dims)
        if x.shape[-k:] != self.normalized_shape:
            raise ValueError(f"x must end in normalized_shape={self.normalized_shape}, got shape {tuple(x.shape)}")
        if k == 1:
            return dyt(x, alpha, weight, bias)
        # Several normalized dims: DyT is elementwise, so flatten them into one channel dim.
        y = dyt(x.reshape(*x.shape[: x.dim() - k], -1), alpha.reshape(-1), _flat(weight), _flat(bias))
        return y.reshape(x.shape)

    def __prepare_scriptable__(self) -> nn.Module:
        """What torch.jit.script compiles in place of this module: the same parameters, the formula in
        torch ops (the kernels are Triton launches, which TorchScript cannot hold), so a scripted model
        saves and loads, as a scripted nn.LayerNorm does."""
        return _ScriptedDyT(self)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, alpha_init_value={self.alpha_init_value}, "
                f"weight_init_value={self.weight_init_value}, alpha_per_channel={self.alpha_per_channel}, "
                f"elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}, channels_last={self.channels_last}")


class ModulatedDyT(nn.Module):
    """DyT followed by adaLN modulation, optionally with the block's gated residual add fused in.

    ``forward(x, shift, scale, residual=None, gate=None)`` returns ``h`` or ``(h, r)``; see
    ``dyt_modulate``. PixArt-alpha and FLUX use no affine (elementwise_affine=False).

    >>> import torch
    >>> from dyt_kernels import ModulatedDyT
    >>> norm = ModulatedDyT(384)
    >>> x, shift, scale = torch.randn(2, 16, 384), torch.zeros(2, 384), torch.zeros(2, 384)
    >>> norm(x, shift, scale).shape
    torch.Size([2, 16, 384])
    """

    def __init__(self, hidden_size: int, *, elementwise_affine: bool = False, alpha_init_value: float = 0.5,
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        _check_dtype(dtype)
        self.hidden_size = hidden_size
        self.alpha_init_value = check_finite("alpha_init_value", alpha_init_value)
        factory = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty((1,), **factory))
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(hidden_size, **factory))
            self.bias = nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_warn_on_layernorm_state)

    def reset_parameters(self) -> None:
        """alpha = alpha_init_value, weight = 1, bias = 0: where the constructor starts them, and what
        deferred init (meta device, to_empty, then every module's reset_parameters) relies on."""
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init_value)
            if self.weight is not None:
                self.weight.fill_(1.0)
                self.bias.zero_()

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor, residual: Optional[Tensor] = None,
                gate: Optional[Tensor] = None) -> Any:
        return self._forward(x, shift, scale, residual, gate)

    @torch.jit.ignore
    def _forward(self, x: Tensor, shift: Tensor, scale: Tensor, residual: Optional[Tensor] = None,
                 gate: Optional[Tensor] = None) -> Any:  # Any: h, or (h, r) with a residual
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, L, D) with D=hidden_size={self.hidden_size}, got {shape}")
        alpha, weight, bias = _alpha_weight_bias(self)
        return dyt_modulate(x, alpha, shift, scale, weight, bias, residual=residual, gate=gate)

    def __prepare_scriptable__(self) -> nn.Module:
        """As DyT's: torch.jit.script compiles the formula in torch ops over the same parameters."""
        return _ScriptedModulatedDyT(self)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, alpha_init_value={self.alpha_init_value}, "
                f"elementwise_affine={self.weight is not None}")


def dyt_parameter_names(model: nn.Module) -> list[str]:
    """The qualified names (as ``model.named_parameters()`` gives them) of the parameters DyT and ModulatedDyT
    modules hold: alpha, weight and bias, which recipes leave out of weight decay as they do a norm's
    (the DyT paper's timm recipes decay no 1-D parameter). Hugging Face's Trainer recognizes only
    nn.LayerNorm instances and a few name patterns, so after conversion it would decay them::

        class DyTTrainer(transformers.Trainer):
            def get_decay_parameter_names(self, model):
                skip = set(dyt_parameter_names(model))
                return [n for n in super().get_decay_parameter_names(model) if n not in skip]

    >>> import torch
    >>> from dyt_kernels import convert_layernorm_to_dyt, dyt_parameter_names
    >>> model = convert_layernorm_to_dyt(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
    >>> dyt_parameter_names(model)
    ['1.alpha', '1.weight', '1.bias']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    held = {id(p) for m in model.modules() if isinstance(m, (DyT, ModulatedDyT)) for p in m.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in held]


# What torch.jit.script compiles for DyT and ModulatedDyT (their __prepare_scriptable__): reference.py's
# formulas, written in TorchScript's subset, over the modules' own parameters. As the ops: fp32 math (float64
# for float64 x), the result in x's dtype; dyt_modulate's r rounded to the residual's dtype before the norm.

def _scripted_dyt(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  channel_shape: list[int]) -> Tensor:
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = alpha.to(ct).reshape(()) if alpha.numel() == 1 else alpha.to(ct).reshape(channel_shape)
    y = torch.tanh(a * x.to(ct))
    if weight is not None:
        y = y * weight.to(ct).reshape(channel_shape)
    if bias is not None:
        y = y + bias.to(ct).reshape(channel_shape)
    return y.to(x.dtype)


class _ScriptedDyT(nn.Module):
    def __init__(self, norm: DyT) -> None:
        super().__init__()
        self.alpha, self.weight, self.bias = norm.alpha, norm.weight, norm.bias
        self.normalized_shape = list(norm.normalized_shape)
        self.channels_last = norm.channels_last
        self.eps = norm.eps   # NaN, as DyT's (nn.TransformerEncoderLayer's scripted forward compares them)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError("x must be float32, bfloat16, float16 or float64 (a floating-point tensor)")
        k = len(self.normalized_shape)
        if self.channels_last:
            if x.dim() < k or list(x.shape[x.dim() - k:]) != self.normalized_shape:
                raise ValueError("x must end in normalized_shape={}, got shape {}".format(self.normalized_shape,
                                                                                      x.shape))
            return _scripted_dyt(x, self.alpha, self.weight, self.bias, self.normalized_shape)
        if x.dim() < 2 or x.shape[1] != self.normalized_shape[0]:
            raise ValueError("x must be (N, C={}, ...) for channels_last=False, got shape {}".format(
                self.normalized_shape[0], x.shape))
        shape = [self.normalized_shape[0]]
        for _ in range(x.dim() - 2):
            shape.append(1)
        return _scripted_dyt(x, self.alpha, self.weight, self.bias, shape)


def _per_sample(m: Tensor, x: Tensor) -> Tensor:
    return m.reshape(x.shape[0], 1, x.shape[2]) if m.dim() == 2 else m


def _scripted_modulation(name: str, m: Tensor, x: Tensor) -> Tensor:
    """m, refused unless (B, D), (B, 1, D) or (B, L, D) for a (B, L, D) x, as check_modulation refuses it."""
    B, L, D = x.shape[0], x.shape[1], x.shape[2]
    if not modulation_fits(m, B, L, D):
        raise ValueError("{} must be (B, D), (B, 1, D) or (B, L, D) with B={}, L={}, D={}, got shape {}".format(
            name, B, L, D, m.shape))
    return m


class _ScriptedModulatedDyT(nn.Module):
    def __init__(self, norm: ModulatedDyT) -> None:
        super().__init__()
        self.alpha, self.weight, self.bias = norm.alpha, norm.weight, norm.bias
        self.hidden_size = norm.hidden_size

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor, residual: Optional[Tensor] = None,
                gate: Optional[Tensor] = None) -> Any:   # h, or (h, r) with a residual
        if not x.is_floating_point():
            raise TypeError("x must be float32, bfloat16, float16 or float64 (a floating-point tensor)")
        if x.dim() != 3 or x.shape[2] != self.hidden_size:
            raise ValueError("x must be (B, L, D) with D=hidden_size={}, got shape {}".format(self.hidden_size,
                                                                                            x.shape))
        shift, scale = _scripted_modulation("shift", shift, x), _scripted_modulation("scale", scale, x)
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        r = x
        if residual is None:
            if gate is not None:
                raise ValueError("gate scales x before the residual add, so it needs residual; got residual=None")
        else:
            if residual.shape != x.shape:
                raise ValueError("residual must match x: shape {}, got {}".format(x.shape, residual.shape))
            # (the add in float64 for a float64 residual stream, as eager `residual + gate * x` keeps it)
            at = torch.float64 if residual.dtype == torch.float64 else ct
            wide = x.to(at)
            if gate is not None:
                wide = wide * _per_sample(_scripted_modulation("gate", gate, x), x).to(at)
            wide = residual.to(at) + wide
            # r rounded to the residual's dtype, as the ops store it, with its gradient passed straight to the
            # wide sum (the norm's share and r's own added there, then rounded once, as the ops do)
            r = wide + (wide.to(residual.dtype).to(at) - wide).detach()
        n = _scripted_dyt(r.to(ct), self.alpha, self.weight, self.bias, [self.hidden_size])
        h = (n * (1 + _per_sample(scale, x).to(ct)) + _per_sample(shift, x).to(ct)).to(x.dtype)
        if residual is None:
            return h
        return h, r.to(residual.dtype)
