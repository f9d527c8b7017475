"""Checkpoints of converted models: bring a DyT model back with its alphas, and say so when a load would not.

A converted model's state dict is its original one plus one ``alpha`` per DyT. The code that builds
the model (``PixArtTransformer2DModel(...)``, ``from_pretrained``, a training script) builds LayerNorms,
so loading it as usual drops the alphas (torch: unexpected keys under strict=False; diffusers and
transformers: a log line). The checkpoint itself says which norms were DyT (the ``*.alpha`` keys) and
with which alpha shape, so loading converts exactly those norms first, then loads everything.
"""
from __future__ import annotations

import os
import warnings
from typing import Mapping

from torch import Tensor, nn

from .modules import ALPHA, DyTCheckpointWarning




def _alpha_owners(keys) -> dict[str, str]:
    """qualified module name -> its alpha key, for every '*.alpha' key ('' for a top-level 'alpha')."""
    owners = {}
    for key in keys:
        if key == ALPHA:
            owners[""] = key
        elif key.endswith("." + ALPHA):
            owners[key[: -len(ALPHA) - 1]] = key
    return owners


def _convert_for(model: nn.Module, alpha_state: Mapping[str, Tensor], fuse_modulation: bool) -> nn.Module:
    """Convert the norms of ``model`` that hold an alpha in ``alpha_state``, with that alpha's shape."""
    from .convert import _convert

    owners = _alpha_owners(alpha_state)
    per_channel = {name: alpha_state[key].numel() > 1 for name, key in owners.items()}
    # probe_meta: a model built on the meta device (deferred init, loaded with assign=True) has its
    # norms there; the probe runs on a CPU stand-in (convert._cpu_stand_in) instead of refusing them.
    return _convert(model, include_rmsnorm=True, fuse_modulation=fuse_modulation,
                    module_filter=lambda name, m: name in owners,
                    alpha_per_channel=lambda name, m: per_channel[name], probe_meta=True)


def _homeless_alphas(model: nn.Module, alpha_state: Mapping[str, Tensor]) -> list[str]:
    """The alphas the converted model has no place for: no DyT or ModulatedDyT at their names, and no
    other module there that holds an ``alpha`` of its own (a Snake activation's, a ReZero gate's)."""
    keys = model.state_dict(keep_vars=True).keys()
    return [key for key in alpha_state if key not in keys]


def _warn_homeless(homeless: list[str], what: str) -> None:
    if homeless:
        warnings.warn(f"{len(homeless)} DyT alpha(s) in {what} have no DyT to go to and are DROPPED: "
                      f"{', '.join(homeless)}. The model does not have those norms at those names, or "
                      f"could not convert them (see the converter's warning).", DyTCheckpointWarning, stacklevel=3)


def _warn_affine_missing(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """A DyT whose alpha the state dict has, but not the weight or bias the DyT holds: under strict=False
    the DyT keeps the model's own values. A state dict saved after fold_dyt_affine is like that, and
    its Linears already hold the affine, which the model would then apply twice."""
    from .modules import DyT, ModulatedDyT

    modules = dict(model.named_modules(remove_duplicate=False))
    lacking = []
    for name, key in _alpha_owners(state_dict).items():
        dyt = modules.get(name)
        prefix = name + "." if name else ""
        if isinstance(dyt, (DyT, ModulatedDyT)):
            lacking += [f"{key} (no '{prefix}{attr}')" for attr in ("weight", "bias")
                        if getattr(dyt, attr) is not None and prefix + attr not in state_dict]
    if lacking:
        warnings.warn(f"the state dict has DyT alphas without the weight or bias their DyTs hold: {', '.join(lacking)}. "
                      f"Those DyTs keep the model's values. A state dict saved after fold_dyt_affine has no DyT "
                      f"weight or bias (its Linears hold them): it is not for loading into a built model.",
                      DyTCheckpointWarning, stacklevel=3)


def load_dyt_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True,
                        fuse_modulation: bool = False, assign: bool = False) -> nn.Module:
    """Load a converted model's state dict into a freshly built (LayerNorm) model, converting it first.

    The norms that have an ``alpha`` in ``state_dict`` become DyT (per-channel where that alpha is),
    then every tensor loads with ``strict``. An alpha that finds no DyT warns (DyTCheckpointWarning)
    instead of vanishing, and so, under strict=False, does an alpha whose DyT's weight or bias the state
    dict lacks (one saved after fold_dyt_affine). Returns the model (if ``model`` is itself a norm, its
    replacement); the missing and unexpected keys that torch returns under strict=False are named in a
    DyTCheckpointWarning instead. ``assign`` is torch's (``nn.Module.load_state_dict``): True keeps the
    state dict's tensors instead of copying into the model's, which a model built under
    ``torch.device("meta")`` needs (its norms, on meta too, are converted all the same).

    >>> import torch
    >>> from dyt_kernels import convert_layernorm_to_dyt, load_dyt_state_dict
    >>> build = lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    >>> state = convert_layernorm_to_dyt(build()).state_dict()      # what torch.save would store
    >>> model = load_dyt_state_dict(build(), state)
    >>> type(model[1]).__name__, sorted(state) == sorted(model.state_dict())
    ('DyT', True)
    """
    alpha_state = {k: state_dict[k] for k in _alpha_owners(state_dict).values()}
    model = _convert_for(model, alpha_state, fuse_modulation)
    homeless = _homeless_alphas(model, alpha_state)
    _warn_homeless(homeless, "the state dict")
    if not strict:  # strict loads name the missing keys themselves
        _warn_affine_missing(model, state_dict)
    missing, unexpected = model.load_state_dict(state_dict, strict=strict, assign=assign)
    unexpected = [k for k in unexpected if k not in homeless]   # those were named already
    if missing or unexpected:  # what strict=False returns, which this function cannot
        warnings.warn(f"load_dyt_state_dict(strict=False) left {_listed(missing)} missing and "
                      f"{_listed(unexpected)} unexpected", DyTCheckpointWarning, stacklevel=2)
    return model


def _listed(keys: list[str], most: int = 8) -> str:
    """'2 key(s) (a, b)', the first ``most`` named."""
    named = ", ".join(keys[:most]) + (f", ... ({len(keys) - most} more)" if len(keys) > most else "")
    return f"{len(keys)} key(s)" + (f" ({named})" if keys else "")


def _read_alphas(directory: str) -> dict[str, Tensor]:
    """Every '*.alpha' tensor in the safetensors (or torch .bin) weight files of a saved model directory."""
    names = sorted(os.listdir(directory))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    out: dict[str, Tensor] = {}
    if safetensors:
        from safetensors import safe_open

        for file in safetensors:
            with safe_open(os.path.join(directory, file), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if k in _alpha_owners([k]).values()})
        return out
    import torch

    for file in (n for n in names if n.endswith(".bin")):
        state = torch.load(os.path.join(directory, file), map_location="cpu", weights_only=True)
        out.update({k: v for k, v in state.items() if k in _alpha_owners([k]).values()})
    return out


def _transformers_renamed(model: nn.Module, alphas: dict[str, Tensor], key_mapping) -> dict[str, Tensor]:
    """The alphas' keys as transformers renames a checkpoint's keys when it loads them into this model.
    transformers 5 saves some models under other names than their modules have (ViTModel's
    `layers.0.layernorm_before` is written as `encoder.layer.0.layernorm_before`) and maps them back on
    loading; the alphas, which from_pretrained does not load, need the same mapping. Unchanged for other
    libraries and for transformers releases without the conversion mapping."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return alphas
    if not isinstance(model, PreTrainedModel):
        return alphas
    transforms = get_model_conversion_mapping(model, key_mapping, None)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return alphas
    return {rename_source_key(k, renamings, converters)[0]: v for k, v in alphas.items()}


def _match_prefix(model: nn.Module, alphas: dict[str, Tensor]) -> dict[str, Tensor]:
    """Re-key alphas saved from a base model into a model with a head, or the reverse (transformers'
    base_model_prefix, e.g. 'bert.'), when the names do not match as they are."""
    prefix = getattr(model, "base_model_prefix", "")
    modules = dict(model.named_modules())
    if not prefix or all(k.rsplit(".", 1)[0] in modules for k in alphas if "." in k):
        return alphas
    added = {f"{prefix}.{k}": v for k, v in alphas.items()}
    if all(k.rsplit(".", 1)[0] in modules for k in added):
        return added
    stripped = {k[len(prefix) + 1:] if k.startswith(prefix + ".") else k: v for k, v in alphas.items()}
    return stripped


def load_pretrained_dyt(model_class, directory: str, *, subfolder: str = "", fuse_modulation: bool = False,
                        **from_pretrained_kwargs) -> nn.Module:
    """``model_class.from_pretrained(directory)`` for a converted diffusers / transformers model, alphas included.

    from_pretrained builds the LayerNorm model and loads every weight but the alphas (it reports them
    as unexpected keys); the norms that have an alpha in the saved files are then converted and their
    alphas loaded. Reads a local directory written by ``save_pretrained`` (safetensors or .bin).

    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertModel
    >>> from dyt_kernels import convert_layernorm_to_dyt, load_pretrained_dyt
    >>> config = BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    >>> with tempfile.TemporaryDirectory() as path:
    ...     convert_layernorm_to_dyt(BertModel(config)).save_pretrained(path)
    ...     print(type(load_pretrained_dyt(BertModel, path).embeddings.LayerNorm).__name__)
    DyT
    """
    folder = os.path.join(directory, subfolder) if subfolder else directory
    if not os.path.isdir(folder):
        raise ValueError(f"directory must be a local folder written by save_pretrained (download a hub model "
                         f"first), got {folder!r}")
    if subfolder:
        from_pretrained_kwargs["subfolder"] = subfolder
    model = model_class.from_pretrained(directory, **from_pretrained_kwargs)
    if any(hasattr(m, "_hf_hook") for m in model.modules()) and any(p.is_meta for p in model.parameters()):
        raise ValueError("device_map offloads part of the model (to the CPU or disk, behind accelerate's hooks, "
                         "the modules holding meta tensors), where the DyTs cannot be built and their alphas "
                         "loaded: load without an offloading device_map, then dispatch: "
                         "accelerate.dispatch_model(load_pretrained_dyt(...), device_map=..., offload_dir=...)")
    alphas = _match_prefix(model, _transformers_renamed(model, _read_alphas(folder),
                                                        from_pretrained_kwargs.get("key_mapping")))
    model = _convert_for(model, alphas, fuse_modulation)
    homeless = _homeless_alphas(model, alphas)
    _warn_homeless(homeless, folder)
    homed = {k: v for k, v in alphas.items() if k not in homeless}
    model.load_state_dict(homed, strict=False)
    return model
