"""Timers: median milliseconds per call of a closure, on CUDA or CPU.

CUDA, large problems   triton.testing.do_bench: CUDA events around each call, the L2 cache flushed
                       before each one, median of the timed calls.
CUDA, small problems   CUDA-graph replay. Below ~64 MiB a call takes a few microseconds, about what
                       launching its kernels from Python costs, so do_bench would time the launches.
                       A graph of many unrolled calls is replayed instead. Graph replay cannot flush
                       L2 between calls, so the calls rotate over k independent input sets that
                       together span twice the L2: each call finds its inputs evicted, as in a model.
CPU                    time.perf_counter around each call, median (the smoke run; numbers there only
                       prove the harness works).

Everything a graph replays runs on one side stream, created by the caller, that also ran the
forward whose backward is being timed: autograd runs a backward op on its forward op's stream, so a
forward issued on the default stream would put the backward outside the capture.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Fn = Callable[[], object]


@dataclass
class TimerConfig:
    warmup_ms: float = 10.0
    rep_ms: float = 40.0
    graph_below_bytes: int = 64 << 20   # forward traffic under this: CUDA-graph replay
    graph_max_calls: int = 256          # unrolled calls per graph, whatever rep_ms asks for
    graph_replays: int = 10
    max_rotation: int = 16
    cpu_warmup: int = 2
    cpu_reps: int = 7


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where every op is done when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or (50 << 20))


def use_graph(device: torch.device, nbytes: int, cfg: TimerConfig) -> bool:
    return device.type == "cuda" and nbytes < cfg.graph_below_bytes


def rotation(device: torch.device, nbytes: int, cfg: TimerConfig) -> int:
    """How many independent input sets the graph timer cycles through (1 for the other timers)."""
    if not use_graph(device, nbytes, cfg):
        return 1
    return max(1, min(cfg.max_rotation, math.ceil(2 * l2_bytes(device) / max(nbytes, 1))))


def _summary(samples: Sequence[float]) -> tuple[float, float, float]:
    """(p20, median, p80): the median is the number; the spread says how far to trust a difference."""
    xs = sorted(samples)
    at = lambda q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]  # noqa: E731
    return at(0.2), statistics.median(xs), at(0.8)


def time_cpu(fn: Fn, grads: Sequence[torch.Tensor], cfg: TimerConfig) -> tuple[float, float, float]:
    for _ in range(cfg.cpu_warmup):
        clear_grads(grads)
        fn()
    samples = []
    for _ in range(cfg.cpu_reps):
        clear_grads(grads)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _summary(samples)


def time_do_bench(fn: Fn, grads: Sequence[torch.Tensor], cfg: TimerConfig) -> tuple[float, float, float]:
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, grad_to_none=list(grads),
                                quantiles=[0.2, 0.5, 0.8])
    return float(q[0]), float(q[1]), float(q[2])


def time_cuda_graph(fns: Sequence[Fn], grads: Sequence[torch.Tensor], cfg: TimerConfig,
                    stream: torch.cuda.Stream) -> tuple[float, float, float]:
    """ms per call over graph replays (p20, median, p80); fns are one closure per input set, run on
    `stream`. Grads are cleared before each captured call so the graph writes them, never adds."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(3):
            for f in fns:
                clear_grads(grads)
                f()
        end.record(stream)
        end.synchronize()
        per_call = max(start.elapsed_time(end) / (3 * len(fns)), 1e-4)
        rounds = max(1, min(cfg.graph_max_calls // len(fns), int(cfg.rep_ms / (per_call * len(fns)))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(rounds):
                for f in fns:
                    clear_grads(grads)
                    f()
        graph.replay()
        samples = []
        for _ in range(cfg.graph_replays):
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            samples.append(start.elapsed_time(end) / (rounds * len(fns)))
    del graph
    return _summary(samples)


def time_calls(fns: Sequence[Fn], grads: Sequence[torch.Tensor], device: torch.device, cfg: TimerConfig,
               graph: bool = False, stream: torch.cuda.Stream | None = None) -> tuple[tuple[float, float, float], str]:
    """((p20, median, p80) ms per call, timer name). fns: one closure per input set; graph replay
    (CUDA only) rotates over all of them, the other timers use the first."""
    if device.type != "cuda":
        return time_cpu(fns[0], grads, cfg), "perf_counter"
    if graph:
        return time_cuda_graph(fns, grads, cfg, stream), f"cuda_graph(rotate={len(fns)})"
    return time_do_bench(fns[0], grads, cfg), "do_bench"
