"""Sampling: images from a model and its diffusion process, and the `sample` command's work.

``generate`` is what training (the sample grids), evaluation and the command share: chunked, guided,
seeded, and checked, since a sampler fed NaN weights or a NaN guidance scale returns NaN images that
a PNG writer turns into a black grid without a word.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

from models import build_model

from .artifacts import save_grid
from .checkpoint import check_finite_weights, load_checkpoint, load_state
from .config import LEGACY_CONFIG, model_settings
from .diffusion import make_denoiser
from .errors import RunFailed, UsageError
from .prompts import PromptError, grid_prompts, parse_prompt_list
from .recipes import MODELS, check_sampler, make_diffusion
from .runtime import autocast, resolve_device, set_threads

# What a checkpoint must hold for the model to be rebuilt and sampled.
SAMPLE_KEYS = ("config", "run_info", "step", "model", "ema")


@torch.no_grad()
def generate(model: nn.Module, diffusion, prompts: list[str], *, guidance: float, steps: int, sampler: str,
             in_channels: int, image_size: int, device: torch.device, seed: int, precision: str = "fp32",
             batch: int = 250) -> torch.Tensor:
    """Images (len(prompts), C, S, S) in [-1, 1] on the CPU; chunked so 1,000 samples fit in memory.

    >>> import torch
    >>> from models import build_model
    >>> from training.recipes import make_diffusion
    >>> model = build_model("flux", "small", hidden_size=32, depth_double=1, depth_single=1)
    >>> generate(model, make_diffusion("flux", model, 32), ["3", "seven"], guidance=4.0, steps=2,
    ...          sampler="euler", in_channels=1, image_size=32, device=torch.device("cpu"), seed=0).shape
    torch.Size([2, 1, 32, 32])
    """
    was_training = model.training
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    try:
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            with autocast(device, precision):
                denoiser = make_denoiser(model, chunk, guidance)
                x = diffusion.sample(denoiser, (len(chunk), in_channels, image_size, image_size), steps=steps,
                                     sampler=sampler, generator=g, device=device)
            out.append(x.float().cpu())
    finally:
        model.train(was_training)
    images = torch.cat(out) if out else torch.empty(0, in_channels, image_size, image_size)
    if not bool(torch.isfinite(images).all()):
        raise RunFailed(f"sampling produced non-finite values (NaN or inf) with guidance {guidance}: the weights "
                        f"or the guidance scale are not finite")
    return images


def ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model state_dict inside an AveragedModel's state_dict."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}


def model_from_checkpoint(state: dict[str, Any], path: str, weights: str, device: torch.device):
    """(model with the checkpoint's ``weights`` ("ema" or "model"), its diffusion process), refusing
    non-finite weights."""
    cfg, info = {**LEGACY_CONFIG, **state["config"]}, state["run_info"]
    chosen = ema_weights(state["ema"]) if weights == "ema" else state["model"]
    check_finite_weights(chosen, f"{weights} weights", path)
    model = build_model(cfg["model"], cfg["preset"], cfg["norm"], in_channels=info["in_channels"],
                        image_size=cfg["image_size"], **model_settings(cfg, path)).to(device)
    load_state(model, chosen, f"{weights} weights", path)
    return model, make_diffusion(cfg["model"], model, cfg["image_size"], cfg["loss_weighting"], cfg["snr_gamma"],
                                 cfg["prediction"])


def sample_command(opts: dict[str, Any]) -> dict[str, Any]:
    """The `sample` command: a grid of ``num_samples`` images from a checkpoint, with its prompts."""
    device = resolve_device(opts["device"])
    set_threads(opts["num_threads"])
    path = opts["checkpoint"]
    state = load_checkpoint(path, required=SAMPLE_KEYS)
    cfg, info = state["config"], state["run_info"]
    prompts = sample_prompts(opts, info["class_names"])
    if opts["sampler"]:
        try:
            check_sampler(cfg["model"], opts["sampler"])
        except ValueError as e:
            raise UsageError(f"--sampler: {e}") from None
    model, diffusion = model_from_checkpoint(state, path, opts["weights"], device)
    sampler = opts["sampler"] or MODELS[cfg["model"]].default_sampler
    images = generate(model, diffusion, prompts, guidance=opts["guidance"], steps=opts["sampling_steps"],
                      sampler=sampler, in_channels=info["in_channels"], image_size=cfg["image_size"], device=device,
                      seed=opts["seed"], precision=cfg["precision"] if device.type == "cuda" else "fp32")
    out = opts["out"] or os.path.dirname(os.path.abspath(path))
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, f"sample_step{state['step']}_g{opts['guidance']:g}_seed{opts['seed']}.png")
    save_grid(images, prompts, png)
    print(f"[sample] {len(prompts)} images -> {png} (prompts in {os.path.splitext(png)[0]}.txt)", file=sys.stderr)
    return {"path": png, "images": images, "prompts": prompts}


def sample_prompts(opts: dict[str, Any], class_names: list[str]) -> list[str]:
    """--prompts repeated to fill --num-samples, or random labels' prompts when it is not given."""
    n = opts["num_samples"]
    if opts["prompts"] is None:
        return grid_prompts(n, class_names, opts["seed"])
    try:
        given = parse_prompt_list(opts["prompts"], class_names)
    except PromptError as e:
        raise UsageError(f"--prompts: {e}") from None
    if "" in given:
        where = "every image" if set(given) == {""} else f"{given.count('')} of every {len(given)} images"
        print(f"[sample] an empty prompt samples without a condition ({where}): guidance has no effect there",
              file=sys.stderr)
    return [given[i % len(given)] for i in range(n)]
