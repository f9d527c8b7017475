"""Training checkpoints: written atomically, verified by a checksum, read without running code.

A checkpoint is a plain dict of tensors, dicts, lists, str, int, float and bool, so it loads with
``torch.load(weights_only=True)``: opening one never executes code from the file. RNG states that
are not tensors natively (numpy's, Python's) are stored as int64 tensors plus plain ints/floats.

Writing goes through a temporary file in the same directory, fsync, ``os.replace``, then an fsync of
the directory so the rename is on disk too: a crash or a full disk mid-write leaves the previous
checkpoint intact, never a half-written one under the final name. A process killed mid-write (SIGKILL, power loss) leaves its temporary file behind; the
temporary name carries the writer's host and process id, so the next write into that directory
removes the files whose writer is gone, and never one that a live process is still writing.

The file carries a SHA-256 of everything in it (every tensor's dtype, shape and bytes, every plain
value, with its key path). torch's zip container checks no CRC when reading, so flipped bytes in a
tensor used to load without complaint; now ``load_checkpoint`` refuses the file and names it.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import sys
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .errors import UsageError

FORMAT = "dyt_kernels.training"
VERSION = 2
# Version 1 (tagged with the old training script's name) had no checksum: read unverified, with a notice.
UNVERIFIED_FORMATS = {("dyt_kernels.train_mnist", 1)}
TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"^\.tmp-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.pt$")


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used: missing, damaged, incomplete, or not a training checkpoint."""


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        yield f"{path}:{type(obj).__name__}[{len(obj)}]", None
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}/{i}")
    else:
        yield path, obj


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 hex digest of a plain-data state: key paths, tensor dtypes, shapes and bytes, plain values.

    >>> checksum({"w": torch.ones(2)}) == checksum({"w": torch.ones(2)}) != checksum({"w": torch.zeros(2)})
    True
    """
    h = hashlib.sha256()
    for path, leaf in _leaves(state):
        h.update(path.encode())
        if isinstance(leaf, torch.Tensor):
            flat = leaf.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{flat.dtype}{tuple(leaf.shape)}".encode())
            h.update(flat.view(torch.uint8).numpy())
        else:
            h.update(f"{type(leaf).__name__}:{leaf!r}".encode())
    return h.hexdigest()


def remove_orphan_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete this host's temporary checkpoint files whose writing process no longer exists.

    Returns the removed paths. A file from another host, from this process, or from a live process
    stays: it may still be being written.
    """
    directory = os.fspath(directory)
    host, removed = socket.gethostname(), []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_NAME.match(name)
        if not match or match["host"] != host or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        path = os.path.join(directory, name)
        try:
            size = os.path.getsize(path)
            os.unlink(path)
        except OSError:
            continue  # already gone, or not ours to delete
        removed.append(path)
        print(f"[checkpoint] removed {path!r} ({size / 1e6:.1f} MB), left by an interrupted write of "
              f"process {match['pid']}", file=sys.stderr)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically write ``state`` (plus format tags and its checksum) to ``path``.

    >>> import tempfile, os, torch
    >>> p = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> save_checkpoint({"step": 3, "model": {"w": torch.ones(2)}}, p)
    >>> load_checkpoint(p)["step"]
    3
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_orphan_temp_files(directory)
    payload = {"format": FORMAT, "version": VERSION, **state}
    payload["checksum"] = {"sha256": checksum(payload)}
    prefix = f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".pt", dir=directory)
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
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable: until the directory entry reaches the disk, a power loss can
    bring back the previous checkpoint (or none) although the new file's bytes were synced. POSIX
    only; where a directory cannot be opened or synced (Windows, some network filesystems) the rename
    is as durable as that filesystem makes it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    required: Sequence[str] = ()) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; never runs code from the file.

    Raises CheckpointError naming the path when the file is missing or a directory, truncated,
    damaged (its checksum does not match), holds objects other than plain data, was not written by
    ``save_checkpoint``, or lacks one of the ``required`` keys.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
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
    _verify(state, path)
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}: it is not a complete training checkpoint")
    return state


def _verify(state: Any, path: str) -> None:
    tag = (state.get("format"), state.get("version")) if isinstance(state, dict) else None
    if tag in UNVERIFIED_FORMATS:
        print(f"[checkpoint] {path!r} was written before checkpoints carried a checksum: loaded unverified",
              file=sys.stderr)
        return
    if tag is None or tag[0] != FORMAT:
        found = tag[0] if tag else type(state).__name__
        raise CheckpointError(f"checkpoint {path!r} is not a training checkpoint of this project "
                              f"(expected format {FORMAT!r}, found {found!r})")
    if tag[1] != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has version {tag[1]!r}; this code reads version {VERSION}")
    stored = state.pop("checksum", None)
    if not isinstance(stored, dict) or stored.get("sha256") != checksum(state):
        raise CheckpointError(f"checkpoint {path!r} is damaged: its contents do not match the checksum written "
                              f"with it" + ("" if isinstance(stored, dict) else " (it has none)"))


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_weights(tensors: dict[str, torch.Tensor], what: str, path: str | os.PathLike) -> None:
    """Refuse weights with NaN or inf: a model built from them samples black images or NaN losses."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: the {what} hold non-finite values (NaN or inf) in "
                              f"{len(bad)} tensor(s), e.g. {bad[:3]}; use an earlier checkpoint")


def load_state(target: Any, state: dict[str, Any], what: str, path: str | os.PathLike) -> None:
    """``target.load_state_dict(state)`` (a module, optimizer or scheduler), with a state that does not
    fit it (the model its config builds has other keys or shapes: models/ changed since the checkpoint was
    written, or its config was edited) refused as a CheckpointError naming the file, not a traceback."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip().rstrip(".") for line in str(e).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3] if len(lines) > 1 else lines)
        if len(lines) > 3:
            detail += f"; ... ({len(lines) - 3} more)"
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: the {what} do not fit the model its config builds "
                              f"({detail}); it was written by another version of models/ or its config was "
                              f"edited") from None


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
