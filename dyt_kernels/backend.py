"""Backend choice: Triton kernels or plain PyTorch (reference.py), decided once per call in functional.py.

"auto"   Triton for CUDA tensors, PyTorch for everything else (the default).
"triton" Triton always; CPU tensors are accepted only under TRITON_INTERPRET=1, which is how the
         test suite runs the kernels on machines without a GPU.
"torch"  plain PyTorch everywhere (a parity baseline, or a way around a suspected kernel bug).

The default comes from the environment variable DYT_KERNELS_BACKEND (set to "" it counts as unset,
as TRITON_INTERPRET="" does); `use_backend` overrides it for a block. The override is a ContextVar:
asyncio tasks created inside the block see it, a thread started inside it does not (a new thread
starts from an empty context, so it reads DYT_KERNELS_BACKEND, else "auto"; nn.DataParallel's replica
threads and thread pools are such threads). Run the thread's work in `contextvars.copy_context().run`,
or enter use_backend in the thread.

Under torch.compile the choice is read when the graph is traced; where torch's dynamo traces
`ContextVar.get` (it guards on the value: a graph traced under one backend is retraced under another)
that is all. Older dynamo cannot trace it (a graph break, which fullgraph=True refuses), so there the
value is read once at trace time as a constant: a graph compiled under one backend keeps it until
`torch._dynamo.reset()`.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")

# Triton reads TRITON_INTERPRET when @triton.jit decorates the kernels, i.e. when dyt_kernels is
# imported; read it at the same moment, so the two can never disagree.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("dyt_backend", default=None)

# DYT_KERNELS_BACKEND is read on every call (a changed environment takes effect at once), so it is read
# the cheap way: os.environ.get costs ~0.7 us when the variable is unset (a KeyError raised and caught
# inside the mapping), a lookup in the dict behind os.environ ~20 ns. Where that dict is missing (not
# CPython's os module) the public mapping is used.
_ENV_NAME = "DYT_KERNELS_BACKEND"
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV_NAME) if _ENV_DATA is not None else None


# Whether dynamo traces ContextVar.get (with a guard on its value): torch releases from mid-2026 on.
_DYNAMO_TRACES_CONTEXTVARS = hasattr(getattr(getattr(torch, "_dynamo", None), "source", None), "ContextVarGetSource")


def _env_backend() -> str | None:
    if _ENV_DATA is None:
        return os.environ.get(_ENV_NAME)
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def _check_name(name: object, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name  # type: ignore[return-value]


def get_backend() -> str:
    """The backend in force: use_backend's if inside one, else DYT_KERNELS_BACKEND, else "auto"."""
    name = _override.get()
    if name is not None:
        return name
    env = _env_backend()
    return "auto" if not env else _check_name(env, _ENV_NAME)


def _override_at_trace_time() -> str | None:
    return _override.get()


if not _DYNAMO_TRACES_CONTEXTVARS:
    _override_at_trace_time = torch._dynamo.assume_constant_result(_override_at_trace_time)


def traced_backend() -> str:
    """get_backend for code under torch.compile (see the module's docstring)."""
    name = _override_at_trace_time()
    if name is not None:
        return name
    env = _env_backend()
    return "auto" if not env else _check_name(env, _ENV_NAME)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with the given backend.

    >>> import torch, dyt_kernels
    >>> with dyt_kernels.use_backend("torch"):
    ...     y = dyt_kernels.dyt(torch.randn(2, 8), torch.tensor([0.5]))
    """
    token = _override.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


def use_triton(x: torch.Tensor, name: str | None = None) -> bool:
    """Whether an op on tensor x runs the Triton kernels (True) or the PyTorch reference (False) under
    backend `name` (default: the one in force)."""
    if name is None:
        name = get_backend()
    if name == "torch" or x.dtype == torch.float64:
        # float64 is the oracle's dtype: the kernels compute in fp32, so fp64 stays in PyTorch.
        return False
    if x.is_cuda:   # (x.device.type builds a device object: ~6x the cost)
        return True
    device = x.device.type
    if name == "triton":
        if device == "cpu" and INTERPRETER:
            return True
        if device == "meta":
            return False
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"dyt_kernels is imported; got a tensor on {x.device}"
        )
    return False
