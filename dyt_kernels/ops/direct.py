"""Direct launches: the compiled kernel of a cached launch configuration, called without Triton's JIT
launcher.

`kernel.run(...)` (what `kernel[grid](...)` calls) binds every argument, works out its specialization
(each pointer's 16-byte alignment, each integer's divisibility), hashes that into a cache key and
looks the compiled kernel up, on every call: several µs of Python per launch, which at the seed's
shapes is more than the kernel's GPU time. A cached launch configuration fixes the kernel's
constexprs, options and argument dtypes, so what can still change its specialization is the
pointers' alignment and the integer arguments. Where the configuration fixes the integers too (the
validated-signature paths of dyt and every finishing launch) only alignment is left; elsewhere the
runner is kept per tuple of integer values. The first launch goes through the JIT launcher, which
returns the CompiledKernel; while the pointers stay 16-byte aligned, later launches with the same
integers call that kernel's own launcher (`compiled[grid]`, Triton's runner: the same stream, launch
hooks and argument protocol as the JIT launcher's last step), keyed by the current device.

Fail-safe: any exception from a direct launch (a Triton whose launcher protocol differs) turns
direct launches off for the process with one warning and repeats the launch through the JIT
launcher; a launcher rejects a wrong argument list before it launches anything, and every kernel
launched this way overwrites its outputs (no accumulation), so even a repeat is harmless.
DYT_KERNELS_DIRECT_LAUNCH=0 (read at import) turns them off. Never under the interpreter.
"""
from __future__ import annotations

import os
import warnings

import torch

from ..backend import INTERPRETER

MAX_RUNNERS = 64   # per launch configuration
ENABLED = not INTERPRETER and os.environ.get("DYT_KERNELS_DIRECT_LAUNCH", "1") not in ("0", "")
_state = {"on": ENABLED}


def enabled() -> bool:
    return _state["on"]


def set_enabled(on: bool) -> bool:
    """Turn direct launches on or off (tests compare both paths); returns the previous setting."""
    previous, _state["on"] = _state["on"], bool(on)
    return previous


# The device Triton's launcher compiles and launches for (its driver asks torch.cuda.current_device);
# the raw query skips the lazy-init check, CUDA being initialized by the JIT launch that came first.
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def launch(kernel, grid: tuple, consts: tuple, options: dict, cache: dict, args: tuple, inputs: tuple = (),
           integers: tuple | None = None) -> None:
    """Launch `kernel` on `args` (its runtime arguments; `consts` its constexprs, in order).

    `cache` is the launch configuration's own dict of runners; `inputs` are the pointer arguments
    that can differ in alignment between calls of this configuration (fresh allocations are always
    aligned); `integers` are the integer arguments when the configuration does not fix them: a
    runner then serves only calls with exactly these values (the JIT launcher specializes on them).
    Calls where an input is not 16-byte aligned, or that come while direct launches are off, take
    the JIT launcher."""
    if _state["on"] and is_aligned(*inputs):
        device = _current_device()
        key = device if integers is None else (device, integers)
        runner = cache.get(key)
        if runner is not None:
            try:
                runner(*args, *consts)
                return
            except Exception as e:  # noqa: BLE001 - any failure: off for good, then the JIT launcher
                _state["on"] = False
                cache.clear()
                warnings.warn(f"dyt_kernels: direct kernel launches are off for this process ({type(e).__name__}: "
                              f"{e}); launches go through Triton's JIT launcher", RuntimeWarning, stacklevel=3)
        compiled = kernel.run(*args, *consts, grid=grid, warmup=False, **options)
        if compiled is not None and _state["on"] and hasattr(compiled, "__getitem__"):
            if len(cache) >= MAX_RUNNERS:   # integers that change every call (strides): stay bounded
                cache.clear()
            # Triton's runner reads grid[0], grid[1], grid[2] as given (the JIT launcher pads them)
            cache[key] = compiled[tuple(grid) + (1,) * (3 - len(grid))]
        return
    kernel.run(*args, *consts, grid=grid, warmup=False, **options)


def is_aligned(*tensors) -> bool:
    """Whether every tensor's data pointer is 16-byte aligned (what Triton specializes pointers on)."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits & 15 == 0
