"""The two ways a run ends early, which the command turns into one line on stderr and an exit code.

UsageError   the input is wrong (a flag, a config file, a checkpoint, a data folder): exit code 2,
             the message names the input and what it accepts.
RunFailed    the input was fine but the run could not go on (the loss became non-finite): exit code 1.
"""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input, named in the message: "--lr must be a finite number > 0, got nan"."""


class RunFailed(RuntimeError):
    """A run that stopped on its own, saying why and what was kept."""
