"""convert_layernorm_to_dyt: swap the LayerNorms (and RMSNorms) of a model nobody here wrote for DyT.

Two steps: plan (decide, for every norm instance, what it computes and whether it converts; see
recognize.py) then apply (build each DyT, put it at every place the norm was registered). The plan is
public as conversion_report(), so a user can see what would change before anything does.
"""
from __future__ import annotations

import copy
import itertools
import logging
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ._checks import check_finite
from .compat import keep_third_party_paths_working
from .modules import DyT, ModulatedDyT
from .recognize import NOT_REPLACEABLE, NormKind, describe, is_norm_named, recognize

logger = logging.getLogger(__name__)

PerModule = Callable[[str, nn.Module], object]
NumberOption = Union[float, PerModule]


@dataclass
class ConversionReport:
    """What convert_layernorm_to_dyt changes (or changed) in a model.

    converted: source class name -> instances that become DyT. fused: diffusers class -> modules whose
    norm + modulation runs through dyt_modulate. left_alone: qualified name -> why that normalization
    layer is not converted. excluded: qualified names module_filter declined.
    """
    converted: Counter = field(default_factory=Counter)
    fused: Counter = field(default_factory=Counter)
    left_alone: dict = field(default_factory=dict)
    excluded: list = field(default_factory=list)

    def __str__(self) -> str:
        counts = lambda c: ", ".join(f"{n} {name}" for name, n in sorted(c.items())) or "nothing"  # noqa: E731
        lines = [f"converted to DyT: {counts(self.converted)}"]
        if self.fused:
            lines.append(f"norm + modulation fused into dyt_modulate: {counts(self.fused)}")
        if self.excluded:
            lines.append(f"excluded by module_filter: {len(self.excluded)} ({', '.join(self.excluded)})")
        if self.left_alone:
            lines.append(f"left alone: {len(self.left_alone)} normalization layer(s)")
            lines += [f"  {name}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)


@dataclass
class _Plan:
    report: ConversionReport
    kinds: dict          # id(norm) -> (first qualified name, NormKind)


def _per_module(option, name: str, module: nn.Module):
    return option(name, module) if callable(option) else option


def _label(cls: type) -> str:
    """torch's classes by name; others by module too (timm's LayerNorm is not torch's)."""
    return cls.__name__ if cls.__module__.startswith("torch.") else f"{cls.__module__}.{cls.__qualname__}"


def _on_meta(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in itertools.chain(module.parameters(), module.buffers()))


def _cpu_stand_in(module: nn.Module) -> nn.Module:
    """A CPU copy of a norm built on the meta device, for the probe: its code is the module's, its
    tensors zeros (the probe draws its floating parameters at random anyway, recognize.py)."""
    probe = copy.deepcopy(module).to_empty(device="cpu")
    with torch.no_grad():
        for t in itertools.chain(probe.parameters(), probe.buffers()):
            t.zero_()
    return probe


def _plan(model: nn.Module, include_rmsnorm: bool, module_filter: PerModule | None,
          probe_meta: bool = False) -> _Plan:
    """probe_meta: a norm on the meta device is probed on a CPU stand-in (_cpu_stand_in) instead of
    being left alone. load_dyt_state_dict asks for it: a checkpoint's alphas say those norms were DyTs,
    and deferred initialization (a model built under torch.device("meta"), then loaded with
    assign=True) builds every norm there."""
    report, kinds = ConversionReport(), {}
    families = ("layer", "rms") if include_rmsnorm else ("layer",)
    for name, m in model.named_modules():  # each instance once, under its first name
        m_id = id(m)
        shown = name or "(the model itself)"
        cls = _label(type(m))
        if isinstance(m, (DyT, ModulatedDyT)):
            continue
        torch_rms = hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)
        # (a *Norm with children is a container, as diffusers' AdaLayerNorm*, unless it holds a weight of its
        # own: timm's RmsNormAct keeps its weight beside `drop` and `act` children, and is probed; a head
        # named after its model, as RobertaPreLayerNormLMHead with its vocab bias, is not)
        candidate = isinstance(m, nn.LayerNorm) or torch_rms or (is_norm_named(m) and (
            not m._modules or isinstance(m._parameters.get("weight"), nn.Parameter)))
        if not candidate and not isinstance(m, NOT_REPLACEABLE):
            continue
        if module_filter is not None and not module_filter(name, m):
            report.excluded.append(shown)
            continue
        if isinstance(m, NOT_REPLACEABLE):
            report.left_alone[shown] = f"{cls}: normalizes over groups, the batch or positions, not per token"
            continue
        # Every leaf norm is probed for both families, so an RMSNorm left alone says so.
        probe = _cpu_stand_in(m) if probe_meta and _on_meta(m) else m
        kind, why = recognize(probe, ("layer",) if isinstance(m, nn.LayerNorm) else ("layer", "rms"))
        if kind is None:
            report.left_alone[shown] = f"{cls}: what it computes could not be established: {why}"
        elif kind.family not in families:
            report.left_alone[shown] = f"{cls}: an RMSNorm ({describe(kind)}); pass include_rmsnorm=True to convert it"
        elif kind.one_plus_weight:
            report.left_alone[shown] = (f"{cls}: scales by (1 + weight); DyT's weight would not mean the same "
                                        f"thing in this class's checkpoints, so it is not converted")
        elif getattr(m, "bias", None) is not None and getattr(m, "weight", None) is None:
            report.left_alone[shown] = f"{cls}: has a bias but no weight, which DyT cannot hold"
        else:
            kinds[m_id] = (name, kind)
            report.converted[cls] += 1
    return _Plan(report, kinds)


# The parameters of the norms the converter replaced, while something (an optimizer) keeps them alive:
# id -> weak reference (a WeakSet compares tensors with ==, which is elementwise).
_replaced_parameters: dict = {}
_checked_optimizers: weakref.WeakSet = weakref.WeakSet()
_optimizer_hook = None


def _was_replaced(p: torch.Tensor) -> bool:
    ref = _replaced_parameters.get(id(p))
    return ref is not None and ref() is p


def _warn_if_optimizer_predates_conversion(optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: an optimizer built before converting steps the replaced norms'
    orphaned tensors and never the DyT parameters; say so at its first step (checked once per optimizer)."""
    if optimizer in _checked_optimizers:
        return
    _checked_optimizers.add(optimizer)
    stale = sum(_was_replaced(p) for group in optimizer.param_groups for p in group["params"])
    if stale:
        warnings.warn(f"{type(optimizer).__name__} holds {stale} parameter(s) of norms that convert_layernorm_to_dyt "
                      f"replaced: it was built before converting and will not train the DyT parameters. Build the "
                      f"optimizer after converting.", UserWarning, stacklevel=3)


def _watch_optimizers(replaced: list[nn.Module]) -> None:
    global _optimizer_hook
    for norm in replaced:
        for p in norm.parameters():
            _replaced_parameters[id(p)] = weakref.ref(p, lambda _, key=id(p): _replaced_parameters.pop(key, None))
    if _optimizer_hook is None and replaced:
        _optimizer_hook = register_optimizer_step_pre_hook(_warn_if_optimizer_predates_conversion)


def _placement(norm: nn.Module, ancestors: list[nn.Module]) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype for the DyT: the norm's own parameters, else those of its nearest ancestor that has any.

    The nearest ancestor, not the model's first parameter: a model may hold meta or offloaded
    parameters far from a norm that lives on the CPU or a GPU.
    """
    for owner in [norm] + ancestors:
        params = [p for p in owner.parameters() if p.is_floating_point()]
        if params:
            return params[0].device, params[0].dtype
    return None, None


def _build(norm: nn.Module, name: str, kind: NormKind, ancestors: list[nn.Module], opts: dict) -> DyT:
    device, dtype = _placement(norm, ancestors)
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    weight_start = _per_module(opts["weight_init_value"], name, norm)
    shape = kind.normalized_shape if kind.channels_last else kind.normalized_shape[0]
    new = DyT(shape, elementwise_affine=weight is not None, bias=bias is not None, device=device, dtype=dtype,
              alpha_init_value=_per_module(opts["alpha_init_value"], name, norm),
              weight_init_value=1.0 if weight_start is None else weight_start,
              alpha_per_channel=bool(_per_module(opts["alpha_per_channel"], name, norm)),
              channels_last=kind.channels_last)
    new.train(norm.training)
    for attr, old in (("weight", weight), ("bias", bias)):
        if old is None:
            continue
        if opts["copy_affine"] and not (attr == "weight" and weight_start is not None):
            with torch.no_grad():
                getattr(new, attr).copy_(old.reshape(getattr(new, attr).shape))
        getattr(new, attr).requires_grad_(old.requires_grad)
    return new


def _ancestors(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(module) -> its ancestors, nearest first (by its first qualified name)."""
    by_name = dict(model.named_modules())
    out = {}
    for name, m in model.named_modules():
        parts = name.split(".") if name else []
        out[id(m)] = [by_name[".".join(parts[:i])] for i in range(len(parts) - 1, -1, -1)]
    return out


def _tie_shared_affine(by_id: dict, new: dict) -> None:
    """Norm instances that hold one weight (or bias) Parameter get DyTs that hold one too, the first built."""
    first: dict = {}   # id(the norms' shared tensor) -> the DyT parameter made from it first
    for m_id, dyt in new.items():
        for attr in ("weight", "bias"):
            old, made = getattr(by_id[m_id], attr, None), getattr(dyt, attr)
            if not isinstance(old, torch.Tensor) or made is None:
                continue
            kept = first.setdefault(id(old), made)
            if kept is not made and kept.shape == made.shape:
                setattr(dyt, attr, kept)


def _apply(model: nn.Module, plan: _Plan, opts: dict) -> dict[int, DyT]:
    ancestors = _ancestors(model)
    by_id = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}
    new = {m_id: _build(by_id[m_id], name, kind, ancestors.get(m_id, []), opts)
           for m_id, (name, kind) in plan.kinds.items()}
    _tie_shared_affine(by_id, new)
    _watch_optimizers([by_id[m_id] for m_id in new])
    # One DyT per norm *instance*: a norm registered in several places (weight tying) stays shared, and
    # so does a Parameter that several norm instances hold (_tie_shared_affine).
    # _modules is walked directly because named_children() skips a module's repeats.
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, attr, new[id(child)])
                if attr == "_orig_mod" and isinstance(parent, OptimizedModule):
                    # torch.compile(norm) bound the norm's __call__ when it wrapped it: without this the
                    # wrapper keeps calling the LayerNorm, and the DyT's parameters never get a gradient
                    parent._initialize()
        _rebind_plain_references(parent, new)
    return new


# nn.Module's own state in its __dict__: registered children, parameters, buffers and hooks are not
# references a forward reaches a norm through.
_MODULE_STATE = frozenset(vars(nn.Module()))


def _rebind_plain_references(parent: nn.Module, new: dict[int, DyT]) -> None:
    """A forward can reach a norm through an unregistered attribute, or a plain list, tuple or dict
    attribute (not a ModuleList): point those at its DyT too, one level deep."""
    swap = lambda v: new.get(id(v), v) if isinstance(v, nn.Module) else v  # noqa: E731
    for attr, value in list(vars(parent).items()):
        if attr in _MODULE_STATE:
            continue
        if isinstance(value, nn.Module) and id(value) in new:
            object.__setattr__(parent, attr, new[id(value)])
        elif type(value) is list:
            value[:] = [swap(v) for v in value]
        elif type(value) is dict:
            value.update({k: swap(v) for k, v in value.items()})
        elif type(value) is tuple and any(isinstance(v, nn.Module) and id(v) in new for v in value):
            object.__setattr__(parent, attr, tuple(swap(v) for v in value))


def conversion_report(model: nn.Module, *, include_rmsnorm: bool = False,
                      module_filter: PerModule | None = None) -> ConversionReport:
    """What convert_layernorm_to_dyt would do to ``model``, without changing it.

    >>> import torch
    >>> from dyt_kernels import conversion_report
    >>> model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.GroupNorm(2, 8))
    >>> report = conversion_report(model)
    >>> dict(report.converted), list(report.left_alone)
    ({'LayerNorm': 1}, ['1'])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _plan(model, include_rmsnorm, module_filter).report


def _check_option(name: str, value, allow_none: bool = False) -> None:
    if not (callable(value) or (allow_none and value is None)):
        check_finite(name, value)


def convert_layernorm_to_dyt(model: nn.Module, *, alpha_init_value: NumberOption = 0.5,
                             weight_init_value: NumberOption | None = None,
                             alpha_per_channel: bool | PerModule = False, include_rmsnorm: bool = False,
                             copy_affine: bool = True, module_filter: PerModule | None = None,
                             fuse_modulation: bool = False) -> nn.Module:
    """Replace the LayerNorms (and with include_rmsnorm, the RMSNorms) of ``model`` with DyT, in place.

    Which modules: nn.LayerNorm; LayerNorm subclasses and other ``*Norm`` layers whose output is
    checked to be LayerNorm (or RMSNorm) over the last dim, or over dim 1 (timm's LayerNorm2d becomes
    ``DyT(channels_last=False)``); see recognize.py. A layer whose formula cannot be established, and
    GroupNorm, BatchNorm and InstanceNorm, are left alone with a warning naming each one.

    Each DyT keeps the norm's shape, device, dtype, train/eval mode and the requires_grad of its affine
    parameters, and by default (copy_affine) their values. Options, each a value or a callable
    ``(qualified_name, module) -> value``: ``alpha_init_value`` (alpha's start), ``weight_init_value``
    (None: the copied weight; a number: the weight starts there instead), ``alpha_per_channel``.
    ``module_filter(qualified_name, module) -> bool`` chooses which norms convert. ``fuse_modulation``
    routes diffusers' norm + scale/shift chains through dyt_modulate (see integrations/diffusers.py).

    Build the optimizer after converting: the DyT parameters are new tensors (an optimizer built
    before warns at its first step). Load a LayerNorm
    checkpoint before converting; load a DyT checkpoint with load_dyt_state_dict / load_pretrained_dyt.
    What was converted and left alone is logged (logger "dyt_kernels.convert", INFO; conversion_report
    returns the same as an object). Returns the model; if ``model`` is itself a norm, its replacement.

    >>> import torch
    >>> from dyt_kernels import convert_layernorm_to_dyt
    >>> layer = torch.nn.TransformerEncoderLayer(64, 4, batch_first=True)
    >>> layer = convert_layernorm_to_dyt(layer)
    >>> type(layer.norm1).__name__
    'DyT'
    """
    return _convert(model, alpha_init_value=alpha_init_value, weight_init_value=weight_init_value,
                    alpha_per_channel=alpha_per_channel, include_rmsnorm=include_rmsnorm, copy_affine=copy_affine,
                    module_filter=module_filter, fuse_modulation=fuse_modulation)


def _refuse_distributed_wrappers(model: nn.Module) -> None:
    """Refuse, by name, a model already wrapped for data parallelism. DistributedDataParallel's reducer
    holds the parameters it was built with: the DyTs' would never be allreduced, and the ranks drift apart
    silently (with find_unused_parameters) or DDP fails at the second step. fully_shard (FSDP2) and FSDP
    hold the norms' parameters sharded: their affine cannot be copied into a plain DyT."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    for name, m in model.named_modules():
        where = f"model.{name}" if name else "model"
        if isinstance(m, DistributedDataParallel):
            raise ValueError(f"{where} is wrapped in DistributedDataParallel, whose gradient buckets hold the norms' "
                             f"parameters: the DyTs replacing them would never be allreduced. Convert first, then "
                             f"wrap: DistributedDataParallel(convert_layernorm_to_dyt(model), ...)")
        if isinstance(m, (FSDPModule, FullyShardedDataParallel)):
            how = "fully_shard" if isinstance(m, FSDPModule) else "FullyShardedDataParallel"
            raise ValueError(f"{where} is sharded by {how}: its norms' parameters are sharded, and the DyTs "
                             f"replacing them would be plain tensors outside the sharding. Convert first, then "
                             f"shard: convert_layernorm_to_dyt(model), then {how}(...)")


def _refuse_distributed_affines(model: nn.Module, plan: _Plan) -> None:
    """Refuse, by name, a norm to convert whose weight or bias is a DTensor (tensor parallelism applied
    before the conversion): copying it into a plain DyT parameter fails inside DTensor, naming nothing."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    by_id = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}
    for m_id, (name, _) in plan.kinds.items():
        for attr in ("weight", "bias"):
            if isinstance(getattr(by_id[m_id], attr, None), DTensor):
                raise ValueError(f"{name}.{attr} is a DTensor (the model was parallelized before the conversion); "
                                 f"convert first, then apply the parallel plan")


def _refuse_offloaded(model: nn.Module, plan: _Plan) -> None:
    """Refuse, by name, a norm to convert that accelerate has offloaded (cpu_offload, or a device map
    with CPU or disk offload): its tensors are on the meta device, the real ones in a hook's weights map.
    The DyT would be built on meta without the hook, and every forward would fail ("alpha is on meta")."""
    ancestors = _ancestors(model)
    by_id = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}
    for m_id, (name, _) in plan.kinds.items():
        norm, above = by_id[m_id], ancestors.get(m_id, [])
        hooked = any(hasattr(m, "_hf_hook") for m in (norm, *above))
        # (a norm without an affine has no tensor of its own: its DyT goes where its ancestors' are)
        if hooked and (any(t.is_meta for t in (*norm.parameters(), *norm.buffers()))
                       or str(_placement(norm, above)[0]) == "meta"):
            raise ValueError(f"{name} is offloaded by accelerate (its weights live in a hook, the module holds meta "
                             f"tensors): convert before dispatching: convert_layernorm_to_dyt(model), then "
                             f"accelerate.cpu_offload / dispatch_model(model, device_map)")


def _convert(model: nn.Module, *, alpha_init_value: NumberOption = 0.5, weight_init_value: NumberOption | None = None,
             alpha_per_channel: bool | PerModule = False, include_rmsnorm: bool = False, copy_affine: bool = True,
             module_filter: PerModule | None = None, fuse_modulation: bool = False,
             probe_meta: bool = False) -> nn.Module:
    """convert_layernorm_to_dyt, with _plan's probe_meta (load_dyt_state_dict's)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_option("alpha_init_value", alpha_init_value)
    _check_option("weight_init_value", weight_init_value, allow_none=True)
    if module_filter is not None and not callable(module_filter):
        raise TypeError(f"module_filter must be a callable (qualified_name, module) -> bool, got "
                        f"{type(module_filter).__name__}")
    opts = {"alpha_init_value": alpha_init_value, "weight_init_value": weight_init_value,
            "alpha_per_channel": alpha_per_channel, "copy_affine": copy_affine}
    _refuse_distributed_wrappers(model)
    plan = _plan(model, include_rmsnorm, module_filter, probe_meta)
    _refuse_distributed_affines(model, plan)
    _refuse_offloaded(model, plan)
    new = _apply(model, plan, opts)
    result = new.get(id(model), model)
    keep_third_party_paths_working(result)
    if fuse_modulation:
        from .integrations.diffusers import fuse_modulation as fuse
        plan.report.fused.update(fuse(result))
    logger.info("convert_layernorm_to_dyt on %s:\n%s", type(model).__name__, plan.report)
    if plan.report.left_alone:
        lines = "\n".join(f"  {n}: {why}" for n, why in plan.report.left_alone.items())
        warnings.warn(f"convert_layernorm_to_dyt left {len(plan.report.left_alone)} normalization layer(s) "
                      f"alone:\n{lines}", stacklevel=3)
    return result
