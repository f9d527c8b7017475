"""A training run's configuration: the parsed flags, completed by the preset's recipe, checked as a whole,
and, for --resume, reconciled with the checkpoint's.

The result is a plain dict (``cfg``) that the checkpoint stores, so a resumed or evaluated run sees
exactly the values the original run used.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch

from models import PRESETS

from .errors import UsageError
from .recipes import MODELS, check_sampler, recipe_value
from .runtime import check_compile_mode

# Flags whose value shapes the training trajectory: a resumed run must use the checkpoint's.
TRAJECTORY_KEYS = ("model", "norm", "preset", "batch_size", "lr", "warmup_steps", "weight_decay", "ema_decay",
                   "loss_weighting", "snr_gamma", "prediction",
                   "grad_clip", "cfg_dropout", "seed", "data", "labels_file", "image_size", "model_overrides",
                   "model_settings", "precision")
# Keys a checkpoint written before they existed lacks, with the value those runs used (model_settings:
# None, the model is built from the preset as the code defines it now, plus the overrides).
LEGACY_CONFIG = {"prediction": "eps", "labels_file": None, "model_settings": None}
# What a run records of the data it trained on (run_info), compared when it is resumed.
DATA_IDENTITY = ("data_source", "train_examples", "heldout_examples", "class_names", "in_channels")
# Settings of a run that do not shape its trajectory; a resumed run keeps the checkpoint's unless given.
# (--time-limit is not one: it counts the training time of the whole run, so a run it stopped would stop again.)
RUN_KEYS = ("sampler", "sample_every", "checkpoint_every", "eval_samples", "guidance", "sampling_steps",
            "num_threads", "data_dir", "no_progress")
# Flags the recipe fills in when they are not given.
RECIPE_KEYS = ("steps", "batch_size", "lr", "warmup_steps", "ema_decay", "sample_every", "checkpoint_every",
               "loss_weighting", "prediction")


def resolve_train_config(values: dict[str, Any], device: torch.device, world: int) -> dict[str, Any]:
    """The run's full configuration as plain data: flags, with the preset's recipe filling the gaps."""
    model = values["model"]
    preset = values["preset"] if values["preset"] != "auto" else ("seed" if device.type == "cuda" else "small")
    cfg = {k: v for k, v in values.items() if k not in ("config", "model_override")}
    cfg["preset"] = preset
    for key in RECIPE_KEYS:
        if cfg[key] is None:
            cfg[key] = recipe_value(preset, key, model)
    cfg["model_overrides"] = {**recipe_value(preset, "model_overrides", model), **dict(values["model_override"] or [])}
    cfg["model_settings"] = resolved_model_settings(cfg)
    cfg["precision"] = values["precision"] if values["precision"] != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    cfg["sampler"] = values["sampler"] or MODELS[model].default_sampler
    cfg["sampling_steps"] = values["sampling_steps"] or 50
    cfg["out"] = values["out"] or os.path.join("runs", f"{model}-{values['norm']}-{preset}")
    cfg["world_size"] = world
    check_compile_mode(cfg["compile"], device)
    return cfg


def resolved_model_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every setting of the model's preset as the code defines it now, with the run's overrides: what a
    checkpoint records, so it is rebuilt as it was trained even after a preset changes."""
    return {**PRESETS[cfg["model"]][cfg["preset"]], **cfg["model_overrides"]}


def model_settings(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """The settings to build a checkpoint's model with (keyword arguments of models.build_model after
    its name, preset and norm): those it recorded; for a checkpoint written before they were recorded,
    the preset's current ones with its overrides. Says so on stderr where the preset has changed
    since: the model is the one the checkpoint was trained as, not the preset's current one."""
    saved = cfg.get("model_settings")
    if saved is None:
        return dict(cfg["model_overrides"])
    current = resolved_model_settings(cfg)
    changed = [f"{k} {v!r} -> (gone)" if k not in current else f"{k} {v!r} -> {current[k]!r}"
               for k, v in saved.items() if k not in current or current[k] != v]
    changed += [f"{k} (new) {current[k]!r}" for k in current if k not in saved]
    if changed:
        print(f"[checkpoint] {path}: the {cfg['preset']} {cfg['model']} preset has changed since this checkpoint "
              f"was written ({'; '.join(changed)}); building the model it was trained as", file=sys.stderr)
    return {k: v for k, v in saved.items() if k in current}


def check_train_config(cfg: dict[str, Any]) -> None:
    """What no single flag's check can see: flags that must fit each other (after --resume merged)."""
    try:
        check_sampler(cfg["model"], cfg["sampler"])
    except ValueError as e:
        raise UsageError(f"--sampler: {e}") from None
    presets = PRESETS[cfg["model"]]
    allowed = set(presets[cfg["preset"]]) | ({"qk_norm"} if cfg["model"] == "flux" else set())
    unknown = sorted(set(cfg["model_overrides"]) - allowed)
    if unknown:
        raise UsageError(f"--model-override: unknown {cfg['model']} key(s) {unknown}; valid keys: {sorted(allowed)}")
    patch = cfg["model_overrides"].get("patch_size", presets[cfg["preset"]]["patch_size"])
    if isinstance(patch, int) and patch > 0 and cfg["image_size"] % patch:
        raise UsageError(f"--image-size {cfg['image_size']} must be a multiple of the model's patch size {patch} "
                         f"(set by the {cfg['preset']} recipe; change it with --model-override patch_size=N)")
    if cfg["eval_samples"] and cfg["image_size"] % 4:
        raise UsageError(f"--image-size {cfg['image_size']} must be a multiple of 4 to evaluate (the eval "
                         f"classifier pools twice); use --eval-samples 0 to train without evaluating")
    if cfg["batch_size"] % cfg["world_size"]:
        raise UsageError(f"--batch-size {cfg['batch_size']} must be divisible by the {cfg['world_size']} "
                         f"DDP processes")
    if cfg["labels_file"] and cfg["data"] == "mnist":
        raise UsageError("--labels-file goes with --data FOLDER; MNIST has its own labels")


def merge_resume_config(cfg: dict, saved: dict, given: set[str], path: str) -> dict:
    """A resumed run continues with the checkpoint's trajectory flags; contradicting one is an error."""
    given = given | ({"model_overrides"} if "model_override" in given else set())
    saved = {**LEGACY_CONFIG, **saved}
    for key in TRAJECTORY_KEYS:
        if key in given and cfg[key] != saved[key]:
            raise UsageError(f"--resume {path}: the checkpoint was trained with {key}={saved[key]!r}, "
                             f"but this run asks for {key}={cfg[key]!r}; drop the flag to continue exactly")
        cfg[key] = saved[key]
    # Defaults that follow --model were resolved for the command line's (default) model, not the
    # checkpoint's, and the run's own settings (how often it checkpoints and samples, how it is
    # evaluated, its threads) were the user's choice: take them from the checkpoint unless given.
    for key in ("steps", *RUN_KEYS):
        if key not in given and key in saved:
            cfg[key] = saved[key]
    if cfg["world_size"] != saved["world_size"]:
        print(f"[resume] world size changed {saved['world_size']} -> {cfg['world_size']}: the data order "
              f"and noise of each step change with it, so the continuation is not bit-exact", file=sys.stderr)
    return cfg


def check_resumed_data(saved_info: dict, info: dict, path: str) -> None:
    """Say when the data a resumed run loaded differ from those its checkpoint was trained on (a labels
    file or folder edited since, MNIST downloaded where the run had the offline fallback): the run goes
    on, as the user asked, but it is no longer the continuation of the checkpoint's run."""
    changed = [f"{key} {saved_info[key]!r} -> {info[key]!r}" for key in DATA_IDENTITY
               if key in saved_info and saved_info[key] != info[key]]
    if changed:
        print(f"[resume] the training data differ from the checkpoint's ({path}): {'; '.join(changed)}; the "
              f"continuation is not the run the checkpoint started", file=sys.stderr)
