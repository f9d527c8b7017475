"""Evaluation: conditional accuracy and feature FID of generated images, metrics.json, and the `eval` command.

Conditional accuracy is the share of generated images that the classifier (training/classifier.py)
assigns to the prompted label; the FID compares the classifier's features of generated and of real
held-out images. Both are measured with guidance and without, on balanced labels.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from models import count_parameters

from .artifacts import save_grid, write_json
from .checkpoint import load_checkpoint
from .classifier import conditional_accuracy, features, frechet_distance, load_or_train_classifier, predict
from .config import LEGACY_CONFIG
from .data import ImageSet, load_dataset
from .errors import UsageError
from .prompts import make_prompts
from .recipes import check_sampler
from .runtime import device_name, resolve_device, seed_everything, set_threads
from .sampling import SAMPLE_KEYS, generate, model_from_checkpoint

EVAL_KEYS = SAMPLE_KEYS + ("losses", "train_time_s")


def evaluate(model: nn.Module, diffusion, train_set: ImageSet, heldout: ImageSet, cfg: dict, device: torch.device,
             out_dir: str | None = None) -> dict[str, Any]:
    """Conditional accuracy and feature FID of ``cfg["eval_samples"]`` images, with and without guidance."""
    start = time.time()
    clf, clf_acc, clf_path = load_or_train_classifier(train_set, heldout, cfg["data_dir"], device)
    n, classes = cfg["eval_samples"], train_set.class_names
    # Balanced labels (n / classes of each), prompts numeral or word 50/50.
    labels = torch.arange(n) % len(classes)
    prompts = make_prompts(labels, classes, torch.Generator().manual_seed(cfg["seed"] + 1))
    real_feats = features(clf, heldout.images, device)
    # Floor for the FID: real training digits vs the held-out ones, at the same sample count.
    g = torch.Generator().manual_seed(0)
    real_train = train_set.images[torch.randperm(len(train_set), generator=g)[:n]]
    result: dict[str, Any] = {
        "classifier_heldout_accuracy": clf_acc, "classifier_path": clf_path, "eval_samples": n,
        "fid_reference_real_train_vs_heldout": frechet_distance(features(clf, real_train, device), real_feats),
        "fid_real_images": len(heldout), "guidance": cfg["guidance"], "sampler": cfg["sampler"],
        "sampling_steps": cfg["sampling_steps"],
    }
    for tag, guidance in (("guided", cfg["guidance"]), ("unguided", 1.0)):
        t0 = time.time()
        images = generate(model, diffusion, prompts, guidance=guidance, steps=cfg["sampling_steps"],
                          sampler=cfg["sampler"], in_channels=train_set.channels, image_size=train_set.image_size,
                          device=device, seed=cfg["seed"] + 2, precision=cfg["precision"])
        pred = predict(clf, images, device)
        result[f"cond_acc_{tag}"] = conditional_accuracy(clf, images, labels, device)
        # A label with no sample (fewer samples than labels) has no accuracy: None, not NaN, in the JSON.
        result[f"per_class_acc_{tag}"] = [round((pred[labels == c] == c).float().mean().item(), 4)
                                          if (labels == c).any() else None for c in range(len(classes))]
        result[f"fid_{tag}"] = frechet_distance(features(clf, images, device), real_feats)
        result[f"sampling_time_s_{tag}"] = round(time.time() - t0, 1)
        if out_dir:
            save_grid(images[:64], prompts[:64], os.path.join(out_dir, f"eval_{tag}.png"))
    result["eval_time_s"] = round(time.time() - start, 1)
    return result


def write_metrics(cfg: dict, run_info: dict, model: nn.Module, diffusion, data: tuple[ImageSet, ImageSet],
                  device: torch.device, progress: dict[str, Any]) -> dict[str, Any]:
    """Evaluate ``model`` (unless eval_samples is 0) and write metrics.json into cfg["out"].

    progress: "step", "losses", "train_time" and, for a run that trained, "wall".
    """
    losses, train_time = progress["losses"], progress["train_time"]
    metrics = {"model": cfg["model"], "norm": cfg["norm"], "preset": cfg["preset"], "steps": progress["step"],
               "batch_size": cfg["batch_size"], "lr": cfg["lr"], "model_overrides": cfg["model_overrides"],
               "train_time_s": round(train_time, 1), "train_time_min": round(train_time / 60, 2),
               "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None, **run_info}
    if "wall" in progress:
        metrics["wall_time_s"] = round(progress["wall"], 1)
    if cfg["eval_samples"] > 0:
        metrics.update(evaluate(model, diffusion, *data, cfg, device, cfg["out"]))
    metrics["loadavg_end"] = list(os.getloadavg())
    write_json(os.path.join(cfg["out"], "metrics.json"), metrics)
    if "cond_acc_guided" in metrics:
        print(f"[eval] {cfg['model']}/{cfg['norm']}/{cfg['preset']} step {progress['step']}: conditional accuracy "
              f"{100 * metrics['cond_acc_guided']:.1f}% (guidance {cfg['guidance']}), "
              f"{100 * metrics['cond_acc_unguided']:.1f}% (none); feature FID {metrics['fid_guided']:.2f} / "
              f"{metrics['fid_unguided']:.2f} (real-vs-real {metrics['fid_reference_real_train_vs_heldout']:.2f}); "
              f"train time {train_time / 60:.1f} min", file=sys.stderr)
    return metrics


def run_info(cfg: dict, device: torch.device, threads: int, world: int, model: nn.Module, diffusion,
             train_set: ImageSet, heldout: ImageSet) -> dict[str, Any]:
    """Where and on what a run ran: recorded in the checkpoint and in metrics.json."""
    return {"device": device_name(device), "threads_per_process": threads, "world_size": world,
            "parameters": count_parameters(model), "data_source": train_set.source,
            "data_notes": train_set.notes, "train_examples": len(train_set), "heldout_examples": len(heldout),
            "class_names": train_set.class_names, "in_channels": train_set.channels,
            "diffusion": diffusion.config(), "loadavg_start": list(os.getloadavg())}


def eval_command(opts: dict[str, Any]) -> dict[str, Any]:
    """The `eval` command: evaluate a checkpoint's EMA weights; metrics.json beside it (or in --out)."""
    device = resolve_device(opts["device"])
    threads = set_threads(opts["num_threads"])
    path = opts["checkpoint"]
    state = load_checkpoint(path, required=EVAL_KEYS)
    cfg = {**LEGACY_CONFIG, **state["config"]}
    for key in ("eval_samples", "guidance", "sampling_steps", "data_dir"):
        cfg[key] = opts[key]
    if opts["sampler"]:
        try:
            cfg["sampler"] = check_sampler(cfg["model"], opts["sampler"])
        except ValueError as e:
            raise UsageError(f"--sampler: {e}") from None
    cfg["out"] = opts["out"] or os.path.dirname(os.path.abspath(path))
    seed_everything(cfg["seed"])  # as training does before it evaluates; evaluation seeds its own draws too
    model, diffusion = model_from_checkpoint(state, path, "ema", device)
    data = load_dataset(cfg["data"], cfg["data_dir"], cfg["image_size"], cfg["labels_file"])
    os.makedirs(cfg["out"], exist_ok=True)
    info = run_info(cfg, device, threads, 1, model, diffusion, *data)
    progress = {"step": state["step"], "losses": list(state["losses"]), "train_time": state["train_time_s"]}
    return write_metrics(cfg, info, model, diffusion, data, device, progress)
