"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's or `timeout`'s stop): end a run with a message, never a traceback.

Two modes, one handler:

    immediate   (set-up, sampling, evaluation) the signal raises Interrupted where the program is;
                nothing is half-written, since checkpoints and images are written atomically or not at all
    deferred    (the training steps) the signal is noted and the current step finishes; the loop then
                writes a checkpoint of that step and raises Interrupted. A second signal does not wait.

The command turns Interrupted into its message on stderr and the exit code 128 + the signal number
(130 for SIGINT, 143 for SIGTERM), the shell's convention for a process ended by a signal.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run ended by a signal; the message says what was kept, ``resume_from`` the checkpoint to go on from."""

    def __init__(self, signum: int, message: str = "", resume_from: str | None = None) -> None:
        self.signum, self.resume_from = signum, resume_from
        self.signal_name = signal.Signals(signum).name
        super().__init__(message or f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalGuard:
    """The handler's state: which signal arrived (if any) and whether the loop asked to finish its step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = False

    def handle(self, signum: int, frame) -> None:
        if self.deferring and self.received is None:
            self.received = signum  # the training loop checks this after the step
            return
        second = self.deferring
        self.received = signum
        name = signal.Signals(signum).name
        raise Interrupted(signum, f"stopped by a second {name} during a step: the step was not saved, the last "
                                  f"checkpoint written stays" if second else f"interrupted by {name}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator["SignalGuard"]:
        """Within this block a first signal only sets ``received``."""
        self.deferring = True
        try:
            yield self
        finally:
            self.deferring = False


@contextlib.contextmanager
def handle_signals() -> Iterator[SignalGuard]:
    """Install the handler for SIGINT and SIGTERM (main thread only; elsewhere signals are left alone).

    >>> with handle_signals() as guard:
    ...     guard.received is None
    True
    """
    guard = SignalGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {s: signal.signal(s, guard.handle) for s in SIGNALS}
    try:
        yield guard
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
