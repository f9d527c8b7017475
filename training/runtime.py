"""Where a run executes: device, DDP processes, CPU threads, per-step seeds, autocast, torch.compile."""
from __future__ import annotations

import os
import platform
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import UsageError

COMPILE_MODES = ("off", "default", "reduce-overhead")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
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


def set_threads(requested: int | None, local_world: int = 1) -> int:
    """CPU threads per process: ``requested``, else the available cores shared among this host's processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested or max(1, cores // max(1, local_world))
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    """torch, numpy and Python's global RNGs (model initialization draws from torch's)."""
    import random
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A well-mixed 63-bit seed per (seed, step, rank): each step's noise, timesteps and prompt
    choices depend on nothing else, which is what makes --resume exact."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def check_compile_mode(mode: str, device: torch.device) -> str:
    """``mode`` if it can run on ``device``: reduce-overhead captures CUDA graphs, which need CUDA."""
    if mode == "reduce-overhead" and device.type != "cuda":
        raise UsageError(f"--compile reduce-overhead replays the step as CUDA graphs, which need a CUDA device; "
                         f"this run is on {device.type} (use --compile default there)")
    return mode


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """The model the training step calls: itself (off), or torch.compile's default or reduce-overhead
    (CUDA graphs) mode. Parameters stay shared, so the optimizer and the EMA see the same tensors."""
    if mode == "off":
        return model
    return torch.compile(model) if mode == "default" else torch.compile(model, mode=mode)


def mark_step(mode: str) -> None:
    """Tell CUDA-graph trees that a new training step begins, so the previous step's graph outputs
    (the loss, the activations autograd saved) may be overwritten."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
