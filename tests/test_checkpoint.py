"""Tests for training/checkpoint.py: damaged, truncated, foreign, incomplete and non-finite checkpoints are
refused naming the file; writes are atomic; temp files of killed writers are cleaned up."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

import train_mnist
from tiny_runs import digit_folder, digits, run_train  # noqa: F401 (fixtures)
from training.checkpoint import (CheckpointError, check_finite_weights, checksum, load_checkpoint,
                                 remove_orphan_temp_files, save_checkpoint)
from training.errors import UsageError


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digit_folder):
    """A real checkpoint of a one-step PixArt-alpha run."""
    tmp = tmp_path_factory.mktemp("trained")
    run_train(tmp, "pixart", "layernorm", digit_folder, "--steps", "1")
    return tmp / "out" / "checkpoint.pt"


def test_truncated_checkpoint_gives_a_clear_error(tmp_path, trained, digit_folder):
    cut = tmp_path / "cut.pt"
    data = trained.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*not readable"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="cut.pt"):
        train_mnist.run_command(["--resume", str(cut), "--data", digit_folder])
    with pytest.raises(CheckpointError, match="cut.pt"):
        train_mnist.run_command(["sample", "--checkpoint", str(cut)])


def test_flipped_bytes_are_caught_by_the_checksum(tmp_path, trained):
    """4 KB of flipped bytes inside the weights loaded and sampled without complaint before checksums:
    torch's zip reader checks no CRC."""
    data = bytearray(trained.read_bytes())
    ema_tensor = data.find(b"data/") + 20_000  # well inside the tensor records, past the pickle
    damaged = tmp_path / "damaged.pt"
    data[ema_tensor:ema_tensor + 4096] = bytes(b ^ 0xFF for b in data[ema_tensor:ema_tensor + 4096])
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged.pt.*is damaged: its contents do not match the checksum"):
        load_checkpoint(damaged)
    with pytest.raises(CheckpointError, match="damaged.pt.*damaged"):
        train_mnist.run_command(["sample", "--checkpoint", str(damaged), "--num-samples", "2"])


def test_checksum_covers_values_keys_dtypes_and_shapes():
    base = {"step": 3, "w": torch.arange(4.0)}
    assert checksum(base) == checksum({"step": 3, "w": torch.arange(4.0)})
    for other in ({"step": 4, "w": torch.arange(4.0)}, {"step": 3, "v": torch.arange(4.0)},
                  {"step": 3, "w": torch.arange(4.0).double()}, {"step": 3, "w": torch.arange(4.0).view(2, 2)},
                  {"step": 3, "w": torch.arange(4.0) + 1e-7}, {"step": 3.0, "w": torch.arange(4.0)}):
        assert checksum(other) != checksum(base), other


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(3)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt.*not a training checkpoint"):
        load_checkpoint(plain)
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": CheckpointError("code would run here")}, pickled)  # not plain data
    with pytest.raises(CheckpointError, match="pickled.pt"):
        load_checkpoint(pickled)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="missing.pt.*does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path)
    tagged = tmp_path / "tagged.pt"  # the right tags, no checksum
    torch.save({"format": "dyt_kernels.training", "version": 2}, tagged)
    with pytest.raises(CheckpointError, match="tagged.pt.*damaged.*has none"):
        load_checkpoint(tagged)
    assert issubclass(CheckpointError, UsageError)  # bad input: exit code 2


def test_right_tags_but_missing_keys_name_them(tmp_path):
    path = tmp_path / "empty.pt"
    save_checkpoint({}, path)
    with pytest.raises(CheckpointError, match=r"empty.pt.*lacks \['config', 'run_info'"):
        train_mnist.run_command(["sample", "--checkpoint", str(path)])


def test_version_1_checkpoints_load_unverified_with_a_notice(tmp_path, capsys):
    old = tmp_path / "old.pt"
    torch.save({"format": "dyt_kernels.train_mnist", "version": 1, "step": 7}, old)
    assert load_checkpoint(old)["step"] == 7
    assert "before checkpoints carried a checksum" in capsys.readouterr().err


def test_non_finite_weights_are_refused(tmp_path, trained):
    state = load_checkpoint(trained)
    state["ema"] = {k: (v.fill_(float("nan")) if v.is_floating_point() else v) for k, v in state["ema"].items()}
    nan_path = tmp_path / "nan.pt"
    save_checkpoint(state, nan_path)  # a valid file (checksum and all) holding NaN weights
    with pytest.raises(CheckpointError, match="nan.pt.*ema weights hold non-finite values"):
        train_mnist.run_command(["sample", "--checkpoint", str(nan_path), "--num-samples", "2"])
    check_finite_weights(state["model"], "model weights", nan_path)  # the raw weights are fine


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 2
    assert os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd's file through /proc")
def test_save_syncs_the_file_then_the_directory_after_the_rename(tmp_path, monkeypatch):
    """The file's bytes are synced before the rename, and the directory after it: until the directory
    entry is on disk, a power loss can bring back the previous checkpoint although the new one was synced."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[1][1] == str(path) and events[2][1] == str(tmp_path)


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process id that has just exited
    orphan = tmp_path / f".tmp-{host}-{dead}-abc123_x.pt"
    orphan.write_bytes(b"\0" * 1000)
    live = tmp_path / f".tmp-{host}-{os.getppid()}-abc123_y.pt"  # our parent is alive
    live.write_bytes(b"\0")
    elsewhere = tmp_path / f".tmp-otherhost-{dead}-abc123_z.pt"  # may be written over a shared disk
    elsewhere.write_bytes(b"\0")
    assert remove_orphan_temp_files(tmp_path) == [str(orphan)]
    assert live.exists() and elsewhere.exists() and not orphan.exists()
    # The next checkpoint written into the directory does the same.
    orphan.write_bytes(b"\0")
    save_checkpoint({"step": 1}, tmp_path / "ckpt.pt")
    assert not orphan.exists()
