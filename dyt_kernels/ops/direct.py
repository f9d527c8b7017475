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
integers call that kernel's launcher directly, keyed by the current device.

The call is the JIT launcher's own last step, `compiled.run(grid0, grid1, grid2, stream, function,
packed_metadata, launch_metadata, enter_hook, exit_hook, *args)` (the same in Triton 3.6 and 3.8), with
the grid, function and metadata bound once and the stream read per call. While no launch hook is
registered (Triton's HookChains empty, as unless a profiler adds one) the metadata and hooks go as
None, which the C launcher skips: the JIT launcher would build a metadata dict and call two empty
chains per launch. In Triton 3.8 that launcher is itself Python (CudaLauncher.__call__) over the
driver's C launch function; where it has nothing to allocate, the runner calls the C function with
the launcher's fixed fields (c_launch_of). With a hook registered, or a Triton whose hooks are not
HookChains, the call goes through `compiled[grid]`, Triton's runner, which builds the metadata and
calls them.

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
    bits = 0
    for t in inputs:   # is_aligned, inlined
        bits |= t.data_ptr()
    if _state["on"] and not bits & 15:
        device = _current_device()
        key = device if integers is None else (device, integers)
        runner = cache.get(key)
        if runner is not None:
            try:
                runner(device, args, consts)
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
            cache[key] = runner_of(compiled, grid)
        return
    kernel.run(*args, *consts, grid=grid, warmup=False, **options)


def _hook_chain_type():
    try:
        from triton.knobs import HookChain, runtime
    except ImportError:   # a Triton without HookChains: every direct launch goes through Triton's runner
        return None, None
    return HookChain, runtime


_HookChain, _runtime = _hook_chain_type()


def _stream_function():
    """The active driver's current-stream query (torch's raw stream getter on CUDA)."""
    from triton.runtime import driver
    return driver.active.get_current_stream


def runner_of(compiled, grid: tuple):
    """A direct launcher for `compiled`: runner(device, args, consts) launches it on the current stream."""
    grid = tuple(grid) + (1,) * (3 - len(grid))   # Triton's runner reads grid[0..2] as given
    full = compiled[grid]                          # also loads the module (CompiledKernel._init_handles)
    if _HookChain is None:
        return lambda device, args, consts: full(*args, *consts)
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    stream_of = _stream_function()
    g0, g1, g2 = grid
    chain, runtime = _HookChain, _runtime
    c_launch = c_launch_of(run)
    if c_launch is not None:
        launch, cooperative, pdl, annotations, signature = c_launch

        def runner(device, args, consts):
            enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
            if type(enter) is chain and type(leave) is chain and not enter.calls and not leave.calls:
                launch(g0, g1, g2, stream_of(device), function, cooperative, pdl, metadata, None, None, None,
                       None, None, annotations, signature, (*args, *consts))
            else:
                full(*args, *consts)
        return runner

    def runner(device, args, consts):
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if type(enter) is chain and type(leave) is chain and not enter.calls and not leave.calls:
            run(g0, g1, g2, stream_of(device), function, metadata, None, None, None, *args, *consts)
        else:
            full(*args, *consts)
    return runner


# Triton releases whose CudaLauncher.__call__ is the Python wrapper c_launch_of reads through.
C_LAUNCH_VERSIONS = ("3.8.",)


def c_launch_of(run) -> tuple | None:
    """(launch, cooperative, pdl, annotations, signature) where `run`, a compiled kernel's launcher, is
    Triton 3.8's CudaLauncher with nothing to do but call the driver's C launch function, else None.

    That launcher's __call__ is Python: it allocates the global and profile scratch a kernel asks for
    (none here: these kernels use neither), adds a sanitizer's state where one is on, then calls the
    C function with its own fixed fields. Where scratch sizes are 0, no sanitizer is on and the C
    function is unwrapped (no tensor descriptors), the call it makes is exactly
    launch(g0, g1, g2, stream, function, cooperative, pdl, metadata, None, None, None, None, None,
    annotations, signature, args) (Triton 3.8 nvidia/driver.py): ~0.7 µs of Python per launch saved.
    Other Triton releases (3.6 compiles a C launcher per kernel, already direct) keep `run`.
    tests/test_direct.py checks on the stub driver that both calls hand the C function the same
    arguments."""
    import triton
    from triton.runtime import driver
    cls = type(run)
    if (not triton.__version__.startswith(C_LAUNCH_VERSIONS) or cls.__name__ != "CudaLauncher"
            or cls.__module__ != "triton.backends.nvidia.driver"):
        return None
    try:
        unwrapped = run.launch is driver.active.utils.launch
        plain = (run.global_scratch_size == 0 and run.profile_scratch_size == 0 and not run.gsan_enabled)
        fields = (run.launch, run.launch_cooperative_grid, run.launch_pdl, run.arg_annotations,
                  run.kernel_signature)
    except AttributeError:
        return None
    return fields if unwrapped and plain else None


def is_aligned(*tensors) -> bool:
    """Whether every tensor's data pointer is 16-byte aligned (what Triton specializes pointers on)."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits & 15 == 0
