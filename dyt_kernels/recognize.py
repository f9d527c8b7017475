"""What a normalization module computes, established before the converter swaps it for DyT.

A class name is a hint, never proof: timm's LayerNorm2d subclasses nn.LayerNorm but normalizes dim 1
of an NCHW tensor; transformers ships dozens of *RMSNorm twins, and some (Gemma's) scale by
(1 + weight) instead of weight. Converting on the name alone would be silently wrong for those.

So the layout and the formula come from the module itself: a copy of it runs on small random tensors
and its output is compared with each formula it could be computing (LayerNorm or RMSNorm, over the last
dim or over dim 1, scaled by weight or by 1 + weight). Exactly one candidate must match; none or
several (a module that adds an activation, one that adapts to its input) leaves the module alone, as
does a forward that takes more than the tensor (a gated RMSNorm's gate): the probes see it without.
The probes are shaped so that the wrong layout cannot even run: (2, o, o, C) puts C last only,
(2, C, o, o) puts it at dim 1 only (o != C), with 3-D variants for 1-D sequence layouts. A probe that
raises is a candidate that does not apply. Running on a deep copy in float32 leaves the model's own
module, its buffers (running statistics) and the global RNG untouched. The copy's parameters are drawn
at random first, and it is probed in train and in eval mode, so the verdict rests neither on the values
the parameters hold now (ones and zeros at init) nor on the mode (a dropout is the identity in eval).

Exact nn.LayerNorm and nn.RMSNorm need no probe: their formulas are torch's own.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# torch's norms that DyT cannot replace: they normalize over groups, batches or spatial positions.
NOT_REPLACEABLE = (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                   nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, nn.CrossMapLRN2d)

# Right formula: ~1e-7 relative (fp32 rounding, plus eps / var(x) ~ 1e-5 when eps is unknown).
# Wrong formula: the two layouts, or LayerNorm vs RMSNorm, differ by O(1); weight vs 1 + weight differs by
# 1 / (1 + |weight|), still > 1e-3 for weights up to 1000. 1e-4 separates the two with margin both ways.
MATCH_RTOL = 1e-4


@dataclass(frozen=True)
class NormKind:
    """What a module computes: 'layer' or 'rms' normalization, over the last dim(s) or dim 1."""
    family: str              # "layer" or "rms"
    channels_last: bool
    normalized_shape: tuple[int, ...]
    one_plus_weight: bool = False   # weight applied as (1 + weight), Gemma style


def is_norm_named(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ or "rmsnorm" in type(module).__name__.lower()


def _eps(module: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return 0.0


def channel_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The per-channel shape a norm's weight has (or would have), from its weight or its size attributes."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() >= 1:
        return tuple(weight.shape)
    for name in ("normalized_shape", "dim", "hidden_size", "num_channels"):
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return (value,)
        if isinstance(value, (tuple, list, torch.Size)) and value and all(isinstance(v, int) for v in value):
            return tuple(value)
    return None


def _formula(x: Tensor, kind: NormKind, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """The candidate formula in float64."""
    x = x.double()
    if not kind.channels_last:
        x = x.movedim(1, -1)
    dims = tuple(range(-len(kind.normalized_shape), 0))
    if kind.family == "layer":
        x = x - x.mean(dims, keepdim=True)
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * (1 + weight.double() if kind.one_plus_weight else weight.double())
    if bias is not None:
        y = y + bias.double()
    return y if kind.channels_last else y.movedim(-1, 1)


def _probe_shapes(shape: tuple[int, ...], channels_last: bool) -> list[tuple[int, ...]]:
    other = 3 if 3 not in shape else (5 if 5 not in shape else 7)
    if channels_last:
        return [(2, other, other, *shape), (2, other, *shape)]
    return [(2, shape[0], other, other), (2, shape[0], other)]


def _matches(probe: nn.Module, kind: NormKind, weight, bias, eps: float, gen: torch.Generator) -> bool:
    for shape in _probe_shapes(kind.normalized_shape, kind.channels_last):
        # The offset gives every row a mean, so LayerNorm (which removes it) and RMSNorm differ by O(1).
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5).float()
        try:
            with torch.no_grad():
                y = probe.forward(x.to(probe_device(probe)))
        except Exception:  # noqa: BLE001 - a probe that cannot run is a layout the module does not take
            continue
        if not isinstance(y, Tensor) or tuple(y.shape) != shape:
            continue
        want = _formula(x, kind, weight, bias, eps)
        err = (y.detach().double().cpu() - want).norm() / want.norm().clamp_min(1e-30)
        if err.item() <= MATCH_RTOL:
            return True
    return False


def _other_inputs(module: nn.Module) -> list[str]:
    """The named inputs a module's forward takes besides the tensor it normalizes (a gated RMSNorm's gate)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):   # a builtin or C-implemented forward: nothing to read
        return []
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in named[1:]]


def _draw_parameters_(probe: nn.Module, gen: torch.Generator) -> None:
    """Random values, of either sign and away from 0, in every floating parameter of the probe copy.

    What a module computes must not be read off the values its parameters hold now: at init a weight of
    ones hides weight ** 2, a shift of zeros under another name than bias (dropped by a DyT) hides
    itself, and a weight of zeros makes LayerNorm and RMSNorm alike. Drawn values show each.
    """
    with torch.no_grad():
        for p in probe.parameters():
            if p.is_floating_point():
                magnitude = 0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float64)
                sign = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int64) * 2 - 1
                p.copy_((sign * magnitude).to(p.dtype))


def probe_device(module: nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def recognize(module: nn.Module, families: tuple[str, ...]) -> tuple[NormKind | None, str]:
    """The single NormKind among ``families`` that the module computes, or (None, why not)."""
    if type(module) is nn.LayerNorm:
        return NormKind("layer", True, tuple(module.normalized_shape)), ""
    if hasattr(nn, "RMSNorm") and type(module) is nn.RMSNorm:
        return NormKind("rms", True, tuple(module.normalized_shape)), ""
    # The probes call forward with the tensor alone; a forward that takes more (Mamba-2's gated RMSNorm:
    # norm(x * silu(gate))) computes something else when the model passes it, and a DyT takes one input.
    others = _other_inputs(module)
    if others:
        return None, f"its forward takes more than the tensor it normalizes ({', '.join(others)}), which a DyT cannot"
    shape = channel_shape(module)
    if shape is None:
        return None, "its channel count could not be found (no weight, normalized_shape or dim)"
    if any(t.device.type == "meta" for t in list(module.parameters()) + list(module.buffers())):
        return None, "it is on the meta device, where what it computes cannot be probed"
    try:
        probe = copy.deepcopy(module).float()
    except Exception as err:  # noqa: BLE001
        return None, f"a copy to probe it could not be made ({type(err).__name__}: {err})"
    gen = torch.Generator().manual_seed(0)
    _draw_parameters_(probe, gen)
    weight = getattr(probe, "weight", None)
    bias = getattr(probe, "bias", None)
    weight = weight if isinstance(weight, Tensor) else None
    bias = bias if isinstance(bias, Tensor) else None
    weight64 = None if weight is None else weight.detach().double().cpu()
    bias64 = None if bias is None else bias.detach().double().cpu()
    candidates = []
    for family in families:
        for channels_last in (True, False):
            if not channels_last and len(shape) != 1:
                continue
            for one_plus in ((False, True) if weight is not None else (False,)):
                candidates.append(NormKind(family, channels_last, shape, one_plus))
    # In train and in eval mode: a dropout inside the norm is the identity in eval mode only, and a DyT
    # made from a model in eval mode (as from_pretrained gives it) would train on without it.
    # (A dropout in train mode draws from the global RNG: fork it, so the model's own runs see it unmoved.)
    device = probe_device(probe)
    accelerator = [] if device.type in ("cpu", "meta") else [device.index if device.index is not None else 0]
    with torch.random.fork_rng(devices=accelerator, device_type=device.type if accelerator else "cuda"):
        found = [k for k in candidates
                 if all(_matches(probe.train(mode), k, weight64, bias64, _eps(module), gen) for mode in (False, True))]
    if len(found) == 1:
        return found[0], ""
    if not found:
        names = " or ".join(f"{f}-norm" for f in families)
        return None, f"its output matched no {names} formula over the last dim or dim 1 (in train and eval mode)"
    return None, "its output matched several formulas (" + ", ".join(map(describe, found)) + ")"


def describe(kind: NormKind) -> str:
    layout = "last dim" if kind.channels_last else "dim 1"
    scale = "(1 + weight)" if kind.one_plus_weight else "weight"
    return f"{kind.family}-norm over the {layout}, scaled by {scale}"
