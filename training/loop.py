"""The training loop: set-up (or --resume), the steps, periodic checkpoints and sample grids, the finish.

Each step's data, noise, timesteps and prompt choices depend only on (seed, step, rank) (see
runtime.step_seed and data.StepBatches), and a checkpoint holds the model, EMA, optimizer, scheduler
and RNG states, so a resumed run continues bit for bit. SIGINT and SIGTERM let the current step
finish, write a checkpoint of it and say how to resume (training/interrupt.py).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dyt_kernels import dyt_parameter_names
from models import build_model

from .artifacts import save_grid, save_losses
from .checkpoint import (check_finite_weights, load_checkpoint, load_state, nonfinite_tensors,
                         remove_orphan_temp_files, rng_state, save_checkpoint, set_rng_state)
from .config import (check_resumed_data, check_train_config, merge_resume_config, model_settings,
                     resolve_train_config)
from .data import ImageSet, StepBatches, load_dataset, to_model_range
from .errors import RunFailed, UsageError
from .evaluate import run_info, write_metrics
from .interrupt import Interrupted, handle_signals
from .prompts import grid_prompts, make_prompts
from .recipes import make_diffusion
from .runtime import (autocast, compile_model, mark_step, seed_everything, set_threads, setup_distributed,
                      step_seed)
from .sampling import generate

RESUME_KEYS = ("config", "step", "model", "ema", "optimizer", "scheduler", "losses", "train_time_s", "rng",
               "run_info")


class TrainingObjective(nn.Module):
    """model + diffusion loss as one module, so DDP sees the prompt encoding inside its forward."""

    def __init__(self, model: nn.Module, diffusion) -> None:
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def forward(self, x0: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        return self.diffusion.training_loss(self.model, x0, self.model.encode_prompts(prompts), generator)


@dataclass
class Run:
    """Everything a training run holds between steps."""
    cfg: dict[str, Any]
    device: torch.device
    rank: int
    world: int
    data: tuple[ImageSet, ImageSet]
    model: nn.Module
    diffusion: Any
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    info: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    losses: list[float] = field(default_factory=list)
    train_time: float = 0.0
    last_checkpoint: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def checkpoint(self) -> str:
        """Write checkpoint.pt of the current step (refusing non-finite weights) and return its path."""
        path = os.path.join(self.cfg["out"], "checkpoint.pt")
        bad = nonfinite_tensors(self.model.state_dict())
        if bad:
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "none was written")
            raise RunFailed(f"the weights became non-finite by step {self.step} (e.g. {bad[0]}); not saving them "
                            f"({where}). Try a lower --lr or --precision fp32.")
        save_checkpoint({"config": self.cfg, "step": self.step, "model": self.model.state_dict(),
                         "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "losses": self.losses,
                         "train_time_s": self.train_time, "rng": rng_state(), "run_info": self.info}, path)
        self.last_checkpoint = path
        return path

    def sample_grid(self, prompts: list[str]) -> None:
        cfg, train_set = self.cfg, self.data[0]
        images = generate(self.ema.module, self.diffusion, prompts, guidance=cfg["guidance"],
                          steps=cfg["sampling_steps"], sampler=cfg["sampler"], in_channels=train_set.channels,
                          image_size=cfg["image_size"], device=self.device, seed=cfg["seed"],
                          precision=cfg["precision"])
        save_grid(images, prompts, os.path.join(cfg["out"], f"samples_{self.step:07d}.png"))


def train(values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """The `train` command: train, then write the last checkpoint, a sample grid, the losses and
    metrics.json. Returns the metrics (an empty dict on DDP ranks other than 0)."""
    run = prepare(values, given)
    with handle_signals() as guard, guard.deferred():
        wall = run_steps(run, guard)
        if run.world > 1:
            dist.barrier()
        if not run.is_main:
            dist.destroy_process_group()
            return {}
        # The last checkpoint is written with signals still deferred: a signal during the write lets it
        # finish (the steps since the last periodic checkpoint are kept), then stops the run here.
        path = run.checkpoint()
        if guard.received:
            raise Interrupted(guard.received, f"stopped by {Interrupted(guard.received).signal_name} after step "
                                              f"{run.step}: checkpoint written to {path}", resume_from=path)
    run.sample_grid(grid_prompts(64, run.data[0].class_names, run.cfg["seed"]))
    cfg = run.cfg
    save_losses(run.losses, cfg["out"], f"{cfg['model']} / {cfg['norm']} / {cfg['preset']}")
    progress = {"step": run.step, "losses": run.losses, "train_time": run.train_time, "wall": wall}
    metrics = write_metrics(cfg, run.info, run.ema.module, run.diffusion, run.data, run.device, progress)
    if run.world > 1:
        dist.destroy_process_group()
    return metrics


def prepare(values: dict[str, Any], given: set[str]) -> Run:
    """Devices, configuration, data, model, EMA, optimizer and scheduler; restored from --resume."""
    rank, world, _, local_world, device = setup_distributed(values["device"])
    cfg = resolve_train_config(values, device, world)
    saved = None
    if cfg["resume"]:
        saved = load_checkpoint(cfg["resume"], required=RESUME_KEYS)
        check_finite_weights(saved["model"], "model weights", cfg["resume"])
        check_finite_weights(saved["ema"], "EMA weights", cfg["resume"])
        cfg = merge_resume_config(cfg, saved["config"], given, cfg["resume"])
        if "out" not in given:  # a resumed run writes beside the checkpoint it continues
            cfg["out"] = os.path.dirname(os.path.abspath(cfg["resume"]))
        if cfg["steps"] < saved["step"]:
            raise UsageError(f"--steps {cfg['steps']} is below the checkpoint's step {saved['step']}; "
                             f"give at least {saved['step']} (the checkpoint's run went to {saved['config']['steps']})")
    check_train_config(cfg)
    threads = set_threads(cfg["num_threads"], local_world)  # after --resume: the run's own, unless given
    seed_everything(cfg["seed"])
    data = load_data(cfg, rank, world)
    model, diffusion = build(cfg, data[0], device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema_decay"]))
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"])
    warmup = max(1, cfg["warmup_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    run = Run(cfg, device, rank, world, data, model, diffusion, ema, optimizer, scheduler)
    if saved is not None:
        load_state(model, saved["model"], "model weights", cfg["resume"])
        load_state(ema, saved["ema"], "EMA weights", cfg["resume"])
        load_state(optimizer, saved["optimizer"], "optimizer state", cfg["resume"])
        load_state(scheduler, saved["scheduler"], "scheduler state", cfg["resume"])
        run.step, run.losses, run.train_time = saved["step"], list(saved["losses"]), saved["train_time_s"]
        run.last_checkpoint = cfg["resume"]
        if run.is_main:
            set_rng_state(saved["rng"])
    run.info = run_info(cfg, device, threads, world, model, diffusion, *data)
    if saved is not None and run.is_main:
        check_resumed_data(saved["run_info"], run.info, cfg["resume"])
    return run


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups. With weight decay, the norms' parameters (DyT's and ModulatedDyT's alpha,
    weight and bias; LayerNorm's affine) and the biases, every 1-D parameter, go in a group without it, as
    the DyT paper's timm recipes group them (decaying alpha toward 0 would flatten the tanh). Without
    weight decay, one group, as before (a checkpoint's optimizer state holds one)."""
    if weight_decay == 0:
        return [{"params": list(model.parameters()), "weight_decay": 0.0}]
    norms = set(dyt_parameter_names(model))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name in norms or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_data(cfg: dict[str, Any], rank: int, world: int) -> tuple[ImageSet, ImageSet]:
    """(train, held-out); rank 0 loads (and downloads) first so the others find MNIST on disk."""
    def load():
        return load_dataset(cfg["data"], cfg["data_dir"], cfg["image_size"], cfg["labels_file"])
    data = load() if rank == 0 else None
    if world > 1:
        dist.barrier()
    data = data or load()
    if cfg["batch_size"] > len(data[0]):
        raise UsageError(f"--batch-size {cfg['batch_size']} is larger than the {len(data[0])} training images "
                         f"of {data[0].source}")
    return data


def build(cfg: dict[str, Any], train_set: ImageSet, device: torch.device):
    """(model, diffusion process); a model configuration its constructor refuses is a usage error."""
    try:
        model = build_model(cfg["model"], cfg["preset"], cfg["norm"], in_channels=train_set.channels,
                            image_size=cfg["image_size"], **model_settings(cfg, cfg.get("resume") or cfg["out"]))
    except (ValueError, TypeError) as e:
        raise UsageError(f"--model-override {cfg['model_overrides']} on the {cfg['preset']} {cfg['model']} "
                         f"preset: {e}") from None
    model = model.to(device)
    return model, make_diffusion(cfg["model"], model, cfg["image_size"], cfg["loss_weighting"], cfg["snr_gamma"],
                                 cfg["prediction"])


def run_steps(run: Run, guard) -> float:
    """Train from run.step to cfg["steps"] (or the time limit, or a signal); returns the wall time."""
    from tqdm import tqdm
    cfg, train_set = run.cfg, run.data[0]
    objective: nn.Module = TrainingObjective(compile_model(run.model, cfg["compile"]), run.diffusion)
    if run.world > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)
    batches = StepBatches(len(train_set), cfg["batch_size"], run.world, run.rank, cfg["seed"])
    images = train_set.images.to(run.device)
    fixed_prompts = grid_prompts(64, train_set.class_names, cfg["seed"])
    if run.is_main:
        os.makedirs(cfg["out"], exist_ok=True)
        remove_orphan_temp_files(cfg["out"])
        print_header(run)
    bar = tqdm(total=cfg["steps"], initial=run.step, unit="step", dynamic_ncols=True,
               disable=not run.is_main or cfg["no_progress"], mininterval=1.0 if sys.stderr.isatty() else 30.0)
    wall_start = time.time()
    run.model.train()
    while run.step < cfg["steps"]:
        train_step(run, objective, batches, images, bar)
        over_time, signum = stop_requests(run, guard)
        if run.is_main:
            if cfg["checkpoint_every"] and run.step % cfg["checkpoint_every"] == 0 and run.step < cfg["steps"]:
                run.checkpoint()
            if cfg["sample_every"] and run.step % cfg["sample_every"] == 0 and run.step < cfg["steps"]:
                run.sample_grid(fixed_prompts)
        if signum:
            bar.close()
            stop_on_signal(run, signum)
        if over_time:
            if run.is_main:
                print(f"[train] --time-limit {cfg['time_limit']} min reached at step {run.step}", file=sys.stderr)
            break
    bar.close()
    return time.time() - wall_start


def train_step(run: Run, objective: nn.Module, batches: StepBatches, images: torch.Tensor, bar) -> None:
    """One optimizer step, its EMA update, and the progress display."""
    cfg, train_set, device = run.cfg, run.data[0], run.device
    t0 = time.perf_counter()
    idx = batches.indices(run.step)
    x0 = to_model_range(images[idx])
    g_cpu = torch.Generator().manual_seed(step_seed(cfg["seed"], run.step, run.rank))
    prompts = make_prompts(train_set.labels[idx.cpu()], train_set.class_names, g_cpu, cfg["cfg_dropout"])
    g = g_cpu if device.type == "cpu" else torch.Generator(device).manual_seed(step_seed(cfg["seed"], run.step,
                                                                                         run.rank))
    mark_step(cfg["compile"])
    with autocast(device, cfg["precision"]):
        loss = objective(x0, prompts, g)
    loss_value = loss.detach().float()
    if run.world > 1:  # every rank sees the mean loss, so every rank stops on the same step
        dist.all_reduce(loss_value)
        loss_value /= run.world
    loss_value = loss_value.item()
    if not math.isfinite(loss_value):
        bar.close()
        where = f"the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint else \
            "no checkpoint was written yet"
        raise RunFailed(f"the training loss is {loss_value} at step {run.step + 1}; stopping without "
                        f"saving ({where}). Try a lower --lr or --precision fp32.")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(run.model.parameters(), cfg["grad_clip"])
    run.optimizer.step()
    run.scheduler.step()
    run.ema.update_parameters(run.model)
    run.step += 1
    run.losses.append(loss_value)
    run.train_time += time.perf_counter() - t0
    if run.is_main:
        bar.update(1)
        recent = np.mean(run.losses[-50:])
        bar.set_postfix(loss=f"{recent:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.1e}", refresh=False)
        if cfg["no_progress"] and run.step % max(1, cfg["steps"] // 10) == 0:
            print(f"[train] step {run.step}/{cfg['steps']} loss {recent:.4f} {run.train_time:.0f}s", file=sys.stderr)


def stop_requests(run: Run, guard) -> tuple[bool, int | None]:
    """(time limit reached, signal received), the same on every rank: rank 0's clock decides the time
    limit, and a signal to any rank stops them all after this step."""
    cfg = run.cfg
    over_time = cfg["time_limit"] is not None and run.train_time >= 60 * cfg["time_limit"]
    signum = guard.received
    if run.world > 1:
        flags = torch.tensor([float(over_time and run.is_main), float(signum or 0)], device=run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        over_time, signum = bool(flags[0].item()), int(flags[1].item()) or None
    return over_time, signum


def stop_on_signal(run: Run, signum: int) -> None:
    """Checkpoint the step just finished, say where and how to resume, and end the run."""
    path = run.checkpoint() if run.is_main else None
    name = Interrupted(signum).signal_name
    message = (f"stopped by {name} after step {run.step}: checkpoint written to {path}" if path else
               f"rank {run.rank} stopped by {name} after step {run.step} (rank 0 wrote the checkpoint)")
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    raise Interrupted(signum, message, resume_from=path)


def print_header(run: Run) -> None:
    cfg, info, train_set = run.cfg, run.info, run.data[0]
    print(f"[train] {cfg['model']} norm={cfg['norm']} preset={cfg['preset']} "
          f"({info['parameters'] / 1e6:.2f}M parameters, overrides {cfg['model_overrides']}) on "
          f"{info['device']} x{run.world}, {info['threads_per_process']} threads/process; {len(train_set)} images "
          f"from {train_set.source}; steps {run.step}->{cfg['steps']}, batch {cfg['batch_size']}, lr {cfg['lr']}",
          file=sys.stderr)
