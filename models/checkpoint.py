"""Training checkpoints: written atomically, read without running code.

A checkpoint is a plain dict of tensors, dicts, lists, str, int, float and bool, so it loads with
``torch.load(weights_only=True)``: opening one never executes code from the file. RNG states that
are not tensors natively (numpy's, Python's) are stored as int64 tensors plus plain ints/floats.

Writing goes through a temporary file in the same directory, fsync, then ``os.replace``: a crash or
a full disk mid-write leaves the previous checkpoint intact, never a half-written one under the
final name.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

FORMAT = "dyt_kernels.train_mnist"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, truncated, or not written by train_mnist."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically write ``state`` (plus format tags) to ``path``.

    >>> import tempfile, os, torch
    >>> p = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> save_checkpoint({"step": 3, "model": {"w": torch.ones(2)}}, p)
    >>> load_checkpoint(p)["step"]
    3
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; never runs code from the file.

    Raises CheckpointError naming the path when the file is missing, truncated, corrupt, holds
    objects other than plain data, or is a valid torch file that train_mnist did not write.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        # Any failure to read a user's file means the same to them: truncated zips raise RuntimeError
        # ("PytorchStreamReader failed"), pickled objects UnpicklingError ("Weights only load failed"),
        # and non-zip bytes whatever the legacy unpickler trips on (EOFError, KeyError, ...).
        raise CheckpointError(f"checkpoint {path!r} is not readable (truncated, corrupt, or not a plain-data "
                              f"torch checkpoint): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path!r} was not written by train_mnist "
                              f"(expected format {FORMAT!r}, found {found!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has version {state.get('version')!r}; "
                              f"this code reads version {VERSION}")
    return state


def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python RNG states, as weights_only-safe data."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        # Python's Mersenne Twister state is 625 ints below 2**32: they fit in int64 exactly.
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
