"""Run control shared by the benchmark drivers: a time budget, SIGTERM turned into an exception so
that a run stopped by `timeout` still writes what it measured, and the torch.compile settings."""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Iterator

import torch


def choices(arg: str, allowed) -> list[str]:
    """A comma-separated command-line list, each item checked against `allowed`."""
    items = [a.strip() for a in arg.split(",") if a.strip()]
    bad = [a for a in items if a not in allowed]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; choose from {list(allowed)}")
    return items


class Stop(Exception):
    """Raised in the main thread when SIGTERM arrives."""


_stop_requested = False


def stop_requested() -> bool:
    """True once SIGTERM arrived: the Stop it raised may have been wrapped by the code it interrupted
    (torch.compile re-raises as InternalTorchDynamoError), so callers check this too."""
    return _stop_requested


class Budget:
    def __init__(self, seconds: float | None):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.left() <= 0

    def reason(self) -> str:
        return f"time budget of {self.seconds:g} s spent"


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    global _stop_requested
    _stop_requested = False

    def on_term(signum, frame):
        global _stop_requested
        _stop_requested = True
        raise Stop()

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (an embedding runner): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def compile_settings(modes: list[str]) -> tuple[dict, contextlib.ExitStack]:
    """The compiler settings this harness needs, as (what they are, for the results file; a context
    that applies them and restores the previous values, so an in-process caller is left untouched)."""
    import torch._functorch.config as functorch_config
    dynamo = torch._dynamo.config

    def first(*names):  # newer torch renamed cache_size_limit to recompile_limit (old name: an alias)
        return next((n for n in names if hasattr(dynamo, n)), None)

    # Every (shape, dtype) is a recompile of the same formula: lift the limit, and fail instead of
    # silently running eager when it is hit, which would mislabel eager numbers as compiled.
    wanted = {first("recompile_limit", "cache_size_limit"): 256,
              first("accumulated_recompile_limit", "accumulated_cache_size_limit"): 4096,
              first("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"): True}
    dyn = {k: v for k, v in wanted.items() if k is not None}
    fun = {}
    if "bwd" in modes and hasattr(functorch_config, "donated_buffer"):
        # Timing a backward alone replays it with retain_graph=True, which AOTAutograd refuses for a
        # backward that donates its saved buffers. Donation saves memory, not bandwidth; it is off for
        # the whole run so that the three modes time one compiled graph.
        fun["donated_buffer"] = False
    stack = contextlib.ExitStack()
    stack.enter_context(dynamo.patch(**dyn))
    if fun:
        stack.enter_context(functorch_config.patch(**fun))
    settings = {f"dynamo.{k}": v for k, v in dyn.items()}
    settings.update({f"functorch.{k}": v for k, v in fun.items()})
    return settings, stack
