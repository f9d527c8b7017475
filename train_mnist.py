#!/usr/bin/env python
"""Train, sample and evaluate DyT / LayerNorm PixArt-alpha and FLUX on MNIST.

    python train_mnist.py                                  # DyT PixArt-alpha: `small` on CPU, `seed` on CUDA
    python train_mnist.py --model flux --norm layernorm    # its LayerNorm FLUX twin
    torchrun --nproc_per_node 2 train_mnist.py ...         # DDP, one process per GPU (gloo on CPU)
    python train_mnist.py sample --checkpoint runs/pixart-dyt-small/checkpoint.pt --prompts "2 seven 0"

Outputs under --out: checkpoint.pt (model, EMA, optimizer, scheduler, step, config, RNG states;
atomically replaced), samples_XXXXXXX.png + .txt (8x8 grid, EMA weights, and its prompts),
loss_curve.png, losses.txt, metrics.json (conditional accuracy with and without guidance, feature
FID, wall time).
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from typing import Any

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning threads
# that wait at each parallel region's barrier for a descheduled sibling made 2-thread training steps
# 5-7x slower than with this setting (measured on this project's 2-core machines); a user's own
# OMP_WAIT_POLICY still wins. It has to be set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

from models import build_model, count_parameters
from models.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from models.data import ImageSet, StepBatches, load_dataset, make_prompts, to_model_range
from models.diffusion import DDPM, default_sampler, make_denoiser, make_diffusion

# ------------------------------------------------------------------------------------------ recipes
# What --preset sets when a flag is not given. "seed" is the seed's GPU recipe (batch 1024, bf16 on
# CUDA, 20k steps PixArt-alpha / 10k FLUX, Adam lr 2e-4, eps-prediction). "small" is the 2-core-CPU
# recipe: under 10 minutes of training to >= 95% guided conditional accuracy (README "Results").
RECIPES: dict[str, dict[str, Any]] = {
    "seed": {
        "steps": {"pixart": 20_000, "flux": 10_000}, "batch_size": 1024, "lr": 2e-4, "warmup_steps": 1000,
        "ema_decay": 0.9995, "sample_every": 1000, "checkpoint_every": 1000, "loss_weighting": "simple",
        "prediction": "eps",
        "model_overrides": {"pixart": {}, "flux": {}},
    },
    "small": {
        # Tuned on the 2-core CPU (README "How the small recipe was tuned"): patch 8 (16 tokens) and
        # batch 128 for both; PixArt-alpha's DDPM predicts v (eps reached 12%), at lr 3e-3 with min-SNR.
        # FLUX's QK-norm DyTs start at RMSNorm's output scale (alpha0 4, weight0 2; at alpha0 0.5 the attention
        # logits start with a spread of 0.006, not 1, and DyT FLUX trailed LayerNorm); an RMSNorm ignores both.
        "steps": {"pixart": 2000, "flux": 1500}, "batch_size": 128, "lr": {"pixart": 3e-3, "flux": 2e-3},
        "warmup_steps": 100, "ema_decay": 0.995, "sample_every": 500, "checkpoint_every": 250,
        "loss_weighting": {"pixart": "min_snr", "flux": "simple"}, "prediction": "v",
        "model_overrides": {"pixart": {"patch_size": 8},
                            "flux": {"patch_size": 8, "qk_alpha_init": 4.0, "qk_weight_init": 2.0}},
    },
}
# Flags whose value shapes the training trajectory: a resumed run must use the checkpoint's.
TRAJECTORY_KEYS = ("model", "norm", "preset", "batch_size", "lr", "warmup_steps", "weight_decay", "ema_decay",
                   "loss_weighting", "snr_gamma", "prediction",
                   "grad_clip", "cfg_dropout", "seed", "data", "image_size", "model_overrides", "precision")
# Keys a checkpoint written before they existed lacks, with the value those runs used.
LEGACY_CONFIG = {"prediction": "eps"}
DEFAULT_GUIDANCE = 4.0


# --------------------------------------------------------------------------------------- arguments

def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model-override takes KEY=VALUE (e.g. hidden_size=192), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _literal(value.strip())


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_mnist.py",
        description="Train a DyT or LayerNorm PixArt-alpha / FLUX diffusion transformer on MNIST (or an image "
                    "folder), then sample and evaluate it. Every flag can also come from --config file.yaml "
                    "(keys as the flag names, dashes or underscores). Sampling from a checkpoint: "
                    "`train_mnist.py sample --help`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML file of flag values; flags given on the command line win")
    a("--model", choices=("pixart", "flux"), default="pixart", help="PixArt-alpha (DDPM) or FLUX (rectified flow)")
    a("--norm", choices=("dyt", "layernorm"), default="dyt", help="Dynamic Tanh or the original LayerNorm")
    a("--preset", choices=("auto", "seed", "small"), default="auto",
      help="model size and training recipe: seed (the seed's GPU recipe), small (2-core CPU, ~10 min); "
           "auto picks small on CPU, seed on CUDA")
    a("--steps", type=int, help="training steps (default: the preset's)")
    a("--batch-size", type=int, help="global batch size, split over DDP processes (default: the preset's)")
    a("--lr", type=float, help="AdamW peak learning rate (default: the preset's)")
    a("--warmup-steps", type=int, help="linear learning-rate warm-up steps, then constant (default: the preset's)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--ema-decay", type=float, help="EMA decay of the weights used for sampling (default: the preset's)")
    a("--loss-weighting", choices=DDPM.LOSS_WEIGHTINGS,
      help="PixArt's per-step weight on the MSE of its prediction (eps or v): simple (DDPM), min_snr, "
           "trunc_snr (default: the preset's)")
    a("--prediction", choices=DDPM.PREDICTIONS,
      help="what PixArt's network predicts: eps (DDPM) or v (Salimans & Ho); default: the preset's")
    a("--snr-gamma", type=float, default=5.0, help="gamma of min_snr / the cap of trunc_snr")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    a("--cfg-dropout", type=float, default=0.2, help="share of training prompts replaced by '' for guidance")
    a("--model-override", type=_override, action="append", dest="model_override", metavar="KEY=VALUE",
      help="change one model preset key, e.g. hidden_size=192 or, for FLUX, qk_norm=rmsnorm, qk_alpha_init=4 "
           "(repeatable; see models.PIXART_PRESETS / FLUX_PRESETS)")
    a("--out", help="output directory (default: runs/<model>-<norm>-<preset>)")
    a("--data", default="mnist", help="'mnist', or a folder of images with a labels.txt/.csv ('file,label' lines)")
    a("--labels-file", help="labels file for --data FOLDER (default: FOLDER/labels.txt|csv|tsv)")
    a("--data-dir", default="data", help="where MNIST is downloaded and the eval classifier is cached")
    a("--image-size", type=int, default=32, help="images are resized to this square size")
    a("--resume", help="checkpoint to continue from (exactly: same data order, RNG and optimizer state)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    a("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="autocast dtype; auto: bf16 on CUDA")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--sample-every", type=int, help="write a sample grid every N steps (default: the preset's; 0: only at the end)")
    a("--checkpoint-every", type=int, help="write checkpoint.pt every N steps (default: the preset's)")
    a("--seed", type=int, default=0, help="seed for initialization, data order, noise and prompts")
    a("--eval", action="store_true", help="only evaluate the checkpoint given by --resume (or OUT/checkpoint.pt)")
    a("--eval-samples", type=int, default=1000,
      help="generated images per guidance setting for conditional accuracy and FID (0: skip evaluation)")
    a("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale for samples")
    a("--sampling-steps", type=int, help="sampler steps (default: 50 DDIM steps / 50 Euler steps)")
    a("--sampler", choices=("ddim", "ddpm", "euler"), help="PixArt: ddim (default) or ddpm (ancestral); FLUX: euler")
    a("--time-limit", type=float, help="stop training after this many minutes of training time (with a checkpoint)")
    a("--num-threads", type=int, help="CPU threads per process (default: available cores / local processes)")
    a("--no-progress", action="store_true", help="no tqdm bar (a log line every 10%% instead)")
    return p


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_mnist.py sample", description="Sample an image grid from a train_mnist.py checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML file of flag values; flags given on the command line win")
    a("--checkpoint", required=True, help="checkpoint.pt written by training")
    a("--prompts", help="prompts separated by spaces (or commas), e.g. \"2 seven 0\"; repeated to fill "
                        "--num-samples (default: random digits, numeral or word)")
    a("--num-samples", type=int, default=64, help="images to generate")
    a("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale (1: none)")
    a("--sampling-steps", type=int, default=50, help="sampler steps")
    a("--sampler", choices=("ddim", "ddpm", "euler"), help="PixArt: ddim (default) or ddpm; FLUX: euler")
    a("--out", help="output directory (default: the checkpoint's directory)")
    a("--seed", type=int, default=0, help="seed for the noise and random prompts")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    a("--weights", choices=("ema", "model"), default="ema", help="EMA weights or the raw trained weights")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv, with defaults taken from --config YAML when given (command-line flags win)."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        import yaml
        with open(pre.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            parser.error(f"--config {pre.config}: expected a mapping of flag names to values")
        dests = {action.dest for action in parser._actions}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        if "model_overrides" in values:  # YAML spells overrides as a mapping
            overrides = values.pop("model_overrides") or {}
            values["model_override"] = list(overrides.items())
        unknown = sorted(set(values) - dests - {"config"})
        if unknown:
            parser.error(f"--config {pre.config}: unknown keys {unknown}; valid: {sorted(dests - {'help'})}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ set-up

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(device_name: str):
    """(rank, world_size, local_rank, local_world_size, device); initializes DDP under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local_rank, local_world, device


def set_threads(requested: int | None, local_world: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested or max(1, cores // max(1, local_world))
    torch.set_num_threads(threads)
    return threads


def step_seed(seed: int, step: int, rank: int) -> int:
    """A well-mixed 63-bit seed per (seed, step, rank): each step's noise, timesteps and prompt
    choices depend on nothing else, which is what makes --resume exact."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def image_seq_len(model: nn.Module, image_size: int) -> int:
    return (image_size // model.patch_size) ** 2


def diffusion_for(model_name: str, model: nn.Module, image_size: int, loss_weighting: str = "simple",
                  snr_gamma: float = 5.0, prediction: str = "eps"):
    return make_diffusion("ddpm" if model_name == "pixart" else "rectified_flow", image_seq_len(model, image_size),
                          loss_weighting, snr_gamma, prediction)


class TrainingObjective(nn.Module):
    """model + diffusion loss as one module, so DDP sees the prompt encoding inside its forward."""

    def __init__(self, model: nn.Module, diffusion) -> None:
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def forward(self, x0: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        return self.diffusion.training_loss(self.model, x0, self.model.encode_prompts(prompts), generator)


def ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model state_dict inside an AveragedModel's state_dict."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}


# ---------------------------------------------------------------------------------------- sampling

@torch.no_grad()
def generate(model: nn.Module, diffusion, prompts: list[str], *, guidance: float, steps: int, sampler: str,
             in_channels: int, image_size: int, device: torch.device, seed: int, precision: str = "fp32",
             batch: int = 250) -> torch.Tensor:
    """Images (len(prompts), C, S, S) in [-1, 1] on the CPU; chunked so 1,000 samples fit in memory.

    >>> # see tests/test_train.py::test_generate_count_and_range
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
    return torch.cat(out) if out else torch.empty(0, in_channels, image_size, image_size)


def save_grid(images: torch.Tensor, prompts: list[str], path_png: str) -> None:
    """8-wide (or sqrt-wide) PNG grid via torchvision, and the prompts row by row in a .txt beside it."""
    from torchvision.utils import save_image
    nrow = 8 if len(prompts) >= 64 else max(1, math.ceil(math.sqrt(len(prompts))))
    save_image((images + 1) / 2, path_png, nrow=nrow, padding=2, pad_value=1.0)
    rows = [" ".join(p if p else '""' for p in prompts[r:r + nrow]) for r in range(0, len(prompts), nrow)]
    with open(os.path.splitext(path_png)[0] + ".txt", "w") as f:
        f.write("\n".join(rows) + "\n")


def grid_prompts(n: int, class_names: list[str], seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(class_names), (n,), generator=g)
    return make_prompts(labels, class_names, g)


def save_loss_curve(losses: list[float], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.5, alpha=0.35, label="loss")
    if len(losses) >= 20:
        w = max(10, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"mean of {w}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -------------------------------------------------------------------------------------- evaluation

def evaluate(model: nn.Module, diffusion, train: ImageSet, test: ImageSet, cfg: dict, device: torch.device,
             out_dir: str | None = None) -> dict[str, Any]:
    """Conditional accuracy and feature FID of ``eval_samples`` images, with and without guidance."""
    from models.classifier import (conditional_accuracy, features, frechet_distance, load_or_train_classifier,
                                   predict)
    start = time.time()
    clf, clf_acc, clf_path = load_or_train_classifier(train, test, cfg["data_dir"], device)
    n, classes = cfg["eval_samples"], train.class_names
    # Balanced labels (n / classes of each), prompts numeral or word 50/50.
    labels = torch.arange(n) % len(classes)
    prompts = make_prompts(labels, classes, torch.Generator().manual_seed(cfg["seed"] + 1))
    real_feats = features(clf, test.images, device)
    # Floor for the FID: real training digits vs the held-out ones, at the same sample count.
    g = torch.Generator().manual_seed(0)
    real_train = train.images[torch.randperm(len(train), generator=g)[:n]]
    result: dict[str, Any] = {
        "classifier_heldout_accuracy": clf_acc, "classifier_path": clf_path, "eval_samples": n,
        "fid_reference_real_train_vs_heldout": frechet_distance(features(clf, real_train, device), real_feats),
        "fid_real_images": len(test), "guidance": cfg["guidance"], "sampler": cfg["sampler"],
        "sampling_steps": cfg["sampling_steps"],
    }
    for tag, guidance in (("guided", cfg["guidance"]), ("unguided", 1.0)):
        t0 = time.time()
        images = generate(model, diffusion, prompts, guidance=guidance, steps=cfg["sampling_steps"],
                          sampler=cfg["sampler"], in_channels=train.channels, image_size=train.image_size,
                          device=device, seed=cfg["seed"] + 2, precision=cfg["precision"])
        acc = conditional_accuracy(clf, images, labels, device)
        pred = predict(clf, images, device)
        per_class = [(pred[labels == c] == c).float().mean().item() for c in range(len(classes))]
        result[f"cond_acc_{tag}"] = acc
        result[f"per_class_acc_{tag}"] = [round(v, 4) for v in per_class]
        result[f"fid_{tag}"] = frechet_distance(features(clf, images, device), real_feats)
        result[f"sampling_time_s_{tag}"] = round(time.time() - t0, 1)
        if out_dir:
            save_grid(images[:64], prompts[:64], os.path.join(out_dir, f"eval_{tag}.png"))
    result["eval_time_s"] = round(time.time() - start, 1)
    return result


# ----------------------------------------------------------------------------------------- training

def resolve_config(args: argparse.Namespace, device: torch.device, world: int) -> dict[str, Any]:
    """The run's full configuration as plain data: flags, with the preset's recipe filling the gaps."""
    preset = args.preset if args.preset != "auto" else ("seed" if device.type == "cuda" else "small")
    recipe = RECIPES[preset]
    cfg = {k: v for k, v in vars(args).items() if k not in ("config", "model_override")}
    cfg["preset"] = preset
    for key in ("steps", "batch_size", "lr", "warmup_steps", "ema_decay", "sample_every", "checkpoint_every",
                "loss_weighting", "prediction"):
        if cfg[key] is None:  # a recipe value is one for both models, or a {model: value} dict
            value = recipe[key]
            cfg[key] = value[args.model] if isinstance(value, dict) else value
    overrides = dict(recipe["model_overrides"][args.model])
    overrides.update(dict(args.model_override or []))
    cfg["model_overrides"] = overrides
    cfg["precision"] = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    cfg["sampler"] = args.sampler or ("ddim" if args.model == "pixart" else "euler")
    cfg["sampling_steps"] = args.sampling_steps or 50
    cfg["out"] = args.out or os.path.join("runs", f"{args.model}-{args.norm}-{preset}")
    cfg["world_size"] = world
    if (cfg["sampler"] == "euler") != (args.model == "flux"):
        raise SystemExit(f"--sampler {cfg['sampler']} does not fit --model {args.model} "
                         f"(pixart: ddim or ddpm; flux: euler)")
    return cfg


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Dests the user set on the command line or in --config, as opposed to left at their defaults."""
    probe = copy.deepcopy(parser)
    probe._defaults = {}  # drop what --config put there; its keys are added below
    for action in probe._actions:
        action.default, action.required = argparse.SUPPRESS, False
    given = set(vars(probe.parse_known_args(argv)[0]))
    config_path = getattr(parser.parse_known_args(argv)[0], "config", None)
    if config_path:
        import yaml
        with open(config_path) as f:
            given |= {k.replace("-", "_") for k in (yaml.safe_load(f) or {})}
        if "model_overrides" in given:
            given.add("model_override")
    return given


def merge_resume_config(cfg: dict, saved: dict, given: set[str], path: str) -> dict:
    """A resumed run continues with the checkpoint's trajectory flags; contradicting one is an error."""
    given = given | ({"model_overrides"} if "model_override" in given else set())
    saved = {**LEGACY_CONFIG, **saved}
    for key in TRAJECTORY_KEYS:
        if key in given and cfg[key] != saved[key]:
            raise SystemExit(f"--resume {path}: the checkpoint was trained with {key}={saved[key]!r}, "
                             f"but this run asks for {key}={cfg[key]!r}; drop the flag to continue exactly")
        cfg[key] = saved[key]
    # Defaults that follow --model were resolved for the command line's (default) model, not the
    # checkpoint's: take them from the checkpoint unless given.
    for key in ("steps", "sampler"):
        if key not in given:
            cfg[key] = saved[key]
    if (cfg["sampler"] == "euler") != (cfg["model"] == "flux"):
        raise SystemExit(f"--sampler {cfg['sampler']} does not fit the checkpoint's model {cfg['model']} "
                         f"(pixart: ddim or ddpm; flux: euler)")
    if cfg["world_size"] != saved["world_size"]:
        print(f"[resume] world size changed {saved['world_size']} -> {cfg['world_size']}: the data order "
              f"and noise of each step change with it, so the continuation is not bit-exact", file=sys.stderr)
    return cfg


def train(argv: list[str]) -> dict[str, Any]:
    parser = train_parser()
    args = parse_args(parser, argv)
    rank, world, local_rank, local_world, device = setup_distributed(args.device)
    threads = set_threads(args.num_threads, local_world)
    cfg = resolve_config(args, device, world)
    is_main = rank == 0
    out = cfg["out"]

    resume_path = args.resume or (os.path.join(out, "checkpoint.pt") if args.eval else None)
    saved = None
    if resume_path:
        try:
            saved = load_checkpoint(resume_path)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        cfg = merge_resume_config(cfg, saved["config"], explicit_flags(parser, argv), resume_path)
        if args.out is None:  # a resumed run writes beside the checkpoint it continues
            cfg["out"] = out = os.path.dirname(os.path.abspath(resume_path))

    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    import random
    random.seed(cfg["seed"])

    # Rank 0 loads (and downloads) first so the others find MNIST on disk.
    if is_main:
        train_set, test_set = load_dataset(cfg["data"], cfg["data_dir"], cfg["image_size"], cfg["labels_file"])
    if world > 1:
        dist.barrier()
    if not is_main:
        train_set, test_set = load_dataset(cfg["data"], cfg["data_dir"], cfg["image_size"], cfg["labels_file"])

    model = build_model(cfg["model"], cfg["preset"], cfg["norm"], in_channels=train_set.channels,
                        image_size=cfg["image_size"], **cfg["model_overrides"]).to(device)
    diffusion = diffusion_for(cfg["model"], model, cfg["image_size"], cfg["loss_weighting"], cfg["snr_gamma"],
                              cfg["prediction"])
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema_decay"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    warmup = max(1, cfg["warmup_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

    start_step, losses, train_time = 0, [], 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start_step, losses, train_time = saved["step"], list(saved["losses"]), saved["train_time_s"]
        if is_main:
            set_rng_state(saved["rng"])

    run_info = {"device": device_name(device), "threads_per_process": threads, "world_size": world,
                "parameters": count_parameters(model), "data_source": train_set.source,
                "data_notes": train_set.notes, "train_examples": len(train_set), "heldout_examples": len(test_set),
                "class_names": train_set.class_names, "in_channels": train_set.channels,
                "diffusion": diffusion.config(), "loadavg_start": list(os.getloadavg())}

    if args.eval:
        if is_main:
            os.makedirs(out, exist_ok=True)
            result = finish(cfg, run_info, model, ema, diffusion, train_set, test_set, device, losses,
                            start_step, train_time, wall=0.0, evaluate_only=True)
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return result if is_main else {}

    objective: nn.Module = TrainingObjective(torch.compile(model) if cfg["compile"] else model, diffusion)
    if world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    batches = StepBatches(len(train_set), cfg["batch_size"], world, rank, cfg["seed"])
    images = train_set.images.to(device)
    fixed_prompts = grid_prompts(64, train_set.class_names, cfg["seed"])
    if is_main:
        os.makedirs(out, exist_ok=True)
        print(f"[train] {cfg['model']} norm={cfg['norm']} preset={cfg['preset']} "
              f"({run_info['parameters'] / 1e6:.2f}M parameters, overrides {cfg['model_overrides']}) on "
              f"{run_info['device']} x{world}, {threads} threads/process; {len(train_set)} images from "
              f"{train_set.source}; steps {start_step}->{cfg['steps']}, batch {cfg['batch_size']}, lr {cfg['lr']}",
              file=sys.stderr)

    def checkpoint(step: int) -> str:
        path = os.path.join(out, "checkpoint.pt")
        save_checkpoint({"config": cfg, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "losses": losses, "train_time_s": train_time, "rng": rng_state(),
                         "run_info": run_info}, path)
        return path

    def sample_grid(step: int) -> None:
        imgs = generate(ema.module, diffusion, fixed_prompts, guidance=cfg["guidance"],
                        steps=cfg["sampling_steps"], sampler=cfg["sampler"], in_channels=train_set.channels,
                        image_size=cfg["image_size"], device=device, seed=cfg["seed"], precision=cfg["precision"])
        save_grid(imgs, fixed_prompts, os.path.join(out, f"samples_{step:07d}.png"))

    from tqdm import tqdm
    bar = tqdm(total=cfg["steps"], initial=start_step, unit="step", dynamic_ncols=True,
               disable=not is_main or args.no_progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    wall_start = time.time()
    last_ckpt = resume_path if saved is not None else None
    step = start_step
    model.train()
    while step < cfg["steps"]:
        t0 = time.perf_counter()
        idx = batches.indices(step)
        x0 = to_model_range(images[idx])
        g_cpu = torch.Generator().manual_seed(step_seed(cfg["seed"], step, rank))
        prompts = make_prompts(train_set.labels[idx.cpu()], train_set.class_names, g_cpu, cfg["cfg_dropout"])
        g = g_cpu if device.type == "cpu" else torch.Generator(device).manual_seed(step_seed(cfg["seed"], step, rank))
        with autocast(device, cfg["precision"]):
            loss = objective(x0, prompts, g)
        loss_value = loss.detach().float()
        if world > 1:  # every rank sees the mean loss, so every rank stops on the same step
            dist.all_reduce(loss_value)
            loss_value /= world
        loss_value = loss_value.item()
        if not math.isfinite(loss_value):
            bar.close()
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise SystemExit(f"error: the training loss is {loss_value} at step {step + 1}; stopping without "
                             f"saving ({where}). Try a lower --lr or --precision fp32.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        ema.update_parameters(model)
        step += 1
        losses.append(loss_value)
        train_time += time.perf_counter() - t0
        if is_main:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}", refresh=False)
            if args.no_progress and step % max(1, cfg["steps"] // 10) == 0:
                print(f"[train] step {step}/{cfg['steps']} loss {np.mean(losses[-50:]):.4f} "
                      f"{train_time:.0f}s", file=sys.stderr)
        over_time = cfg["time_limit"] is not None and train_time >= 60 * cfg["time_limit"]
        if world > 1:  # ranks stop together even if their clocks disagree
            flag = torch.tensor([float(over_time)], device=device)
            dist.broadcast(flag, 0)
            over_time = bool(flag.item())
        if is_main:
            if cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0 and step < cfg["steps"]:
                last_ckpt = checkpoint(step)
            if cfg["sample_every"] and step % cfg["sample_every"] == 0 and step < cfg["steps"]:
                sample_grid(step)
        if over_time:
            if is_main:
                print(f"[train] --time-limit {cfg['time_limit']} min reached at step {step}", file=sys.stderr)
            break
    bar.close()
    wall = time.time() - wall_start
    if world > 1:
        dist.barrier()
    if not is_main:
        dist.destroy_process_group()
        return {}
    checkpoint(step)
    sample_grid(step)
    save_loss_curve(losses, os.path.join(out, "loss_curve.png"),
                    f"{cfg['model']} / {cfg['norm']} / {cfg['preset']}")
    with open(os.path.join(out, "losses.txt"), "w") as f:
        f.write("\n".join(repr(v) for v in losses) + "\n")
    result = finish(cfg, run_info, model, ema, diffusion, train_set, test_set, device, losses, step, train_time,
                    wall)
    if world > 1:
        dist.destroy_process_group()
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def finish(cfg, run_info, model, ema, diffusion, train_set, test_set, device, losses, step, train_time, wall,
           evaluate_only: bool = False) -> dict[str, Any]:
    """Evaluate (unless --eval-samples 0) and write metrics.json."""
    metrics = {"model": cfg["model"], "norm": cfg["norm"], "preset": cfg["preset"], "steps": step,
               "batch_size": cfg["batch_size"], "lr": cfg["lr"], "model_overrides": cfg["model_overrides"],
               "train_time_s": round(train_time, 1), "train_time_min": round(train_time / 60, 2),
               "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None, **run_info}
    if not evaluate_only:
        metrics["wall_time_s"] = round(wall, 1)
    if cfg["eval_samples"] > 0:
        metrics.update(evaluate(ema.module, diffusion, train_set, test_set, cfg, device, cfg["out"]))
    metrics["loadavg_end"] = list(os.getloadavg())
    with open(os.path.join(cfg["out"], "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if "cond_acc_guided" in metrics:
        print(f"[eval] {cfg['model']}/{cfg['norm']}/{cfg['preset']} step {step}: conditional accuracy "
              f"{100 * metrics['cond_acc_guided']:.1f}% (guidance {cfg['guidance']}), "
              f"{100 * metrics['cond_acc_unguided']:.1f}% (none); feature FID {metrics['fid_guided']:.2f} / "
              f"{metrics['fid_unguided']:.2f} (real-vs-real {metrics['fid_reference_real_train_vs_heldout']:.2f}); "
              f"train time {train_time / 60:.1f} min", file=sys.stderr)
    return metrics


# ----------------------------------------------------------------------------------------- sampling

def sample(argv: list[str]) -> dict[str, Any]:
    args = parse_args(sample_parser(), argv)
    device = resolve_device(args.device)
    set_threads(None, 1)
    try:
        state = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    cfg, info = state["config"], state["run_info"]
    model = build_model(cfg["model"], cfg["preset"], cfg["norm"], in_channels=info["in_channels"],
                        image_size=cfg["image_size"], **cfg["model_overrides"]).to(device)
    model.load_state_dict(ema_weights(state["ema"]) if args.weights == "ema" else state["model"])
    diffusion = diffusion_for(cfg["model"], model, cfg["image_size"],
                              prediction={**LEGACY_CONFIG, **cfg}["prediction"])
    sampler = args.sampler or default_sampler(diffusion)
    if args.prompts:
        given = [p.strip() for p in (args.prompts.split(",") if "," in args.prompts else args.prompts.split())]
        prompts = [given[i % len(given)] for i in range(args.num_samples)]
    else:
        prompts = grid_prompts(args.num_samples, info["class_names"], args.seed)
    images = generate(model, diffusion, prompts, guidance=args.guidance, steps=args.sampling_steps, sampler=sampler,
                      in_channels=info["in_channels"], image_size=cfg["image_size"], device=device, seed=args.seed,
                      precision=cfg["precision"] if device.type == "cuda" else "fp32")
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"sample_step{state['step']}_g{args.guidance:g}_seed{args.seed}.png")
    save_grid(images, prompts, path)
    print(f"[sample] {len(prompts)} images -> {path} (prompts in {os.path.splitext(path)[0]}.txt)", file=sys.stderr)
    return {"path": path, "images": images, "prompts": prompts}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "sample":
        return sample(argv[1:])
    return train(argv)


if __name__ == "__main__":
    main()
