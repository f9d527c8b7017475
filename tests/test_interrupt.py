"""Tests for training/interrupt.py: SIGTERM / SIGINT during training write a checkpoint of the step just
finished, say how to resume, and the resumed run continues bit for bit; no traceback, exit 128 + signal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import train_mnist
from tiny_runs import ROOT, digit_folder, digits, read_losses, run_train, tiny_flags  # noqa: F401 (fixtures)
from training.checkpoint import load_checkpoint
from training.diffusion import RectifiedFlow
from training.interrupt import Interrupted, handle_signals


def test_first_signal_is_deferred_a_second_one_is_not():
    before = signal.getsignal(signal.SIGTERM)
    with handle_signals() as guard:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.received == signal.SIGTERM  # noted; the step goes on
            with pytest.raises(Interrupted, match="second SIGINT") as second:
                os.kill(os.getpid(), signal.SIGINT)
        assert second.value.exit_code == 130
        with pytest.raises(Interrupted, match="interrupted by SIGTERM") as outside:
            os.kill(os.getpid(), signal.SIGTERM)  # outside the steps: at once
        assert outside.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(tmp_path, digit_folder, monkeypatch):
    whole = tmp_path / "whole"
    run_train(whole, "flux", "dyt", digit_folder, "--steps", "6")

    calls = {"n": 0}
    real_loss = RectifiedFlow.training_loss

    def loss_then_sigterm(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # SIGTERM arrives in the middle of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, *args, **kwargs)
    part = tmp_path / "part"
    with monkeypatch.context() as m:
        m.setattr(RectifiedFlow, "training_loss", loss_then_sigterm)
        with pytest.raises(Interrupted, match=r"SIGTERM after step 3: checkpoint written to .*checkpoint\.pt") as stopped:
            run_train(part, "flux", "dyt", digit_folder, "--steps", "6")
    ckpt = part / "out" / "checkpoint.pt"
    assert stopped.value.exit_code == 143 and stopped.value.resume_from == str(ckpt)
    # The step in progress finished and was saved (the last periodic checkpoint was step 2).
    assert load_checkpoint(ckpt)["step"] == 3
    assert not (part / "out" / "metrics.json").exists()  # no evaluation of an unfinished run
    train_mnist.run_command(["--resume", str(ckpt), "--data", digit_folder, "--data-dir", str(part / "cache"),
                             "--eval-samples", "0", "--sampling-steps", "2", "--no-progress"])
    assert read_losses(part / "out") == read_losses(whole / "out")  # bit-identical, all 6 steps


def test_ctrl_c_in_a_real_process_exits_130_with_a_resume_line(tmp_path, digit_folder):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "train_mnist.py"), "--model", "flux", "--data", digit_folder,
           "--steps", "100000", "--batch-size", "8", "--out", str(out), "--data-dir", str(tmp_path / "cache"),
           "--eval-samples", "0", "--checkpoint-every", "0", "--sample-every", "0", "--no-progress",
           *tiny_flags("flux")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("[train] flux"):  # the header: the steps start now
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGINT after step" in last and f"--resume {out / 'checkpoint.pt'}" in last
    step = int(last.split("after step ")[1].split(":")[0])
    assert step > 0 and load_checkpoint(out / "checkpoint.pt")["step"] == step


def test_a_signal_during_the_final_save_keeps_the_last_step(tmp_path, digit_folder, monkeypatch):
    """The final checkpoint used to be written after the steps' signal deferral had ended: a SIGTERM
    during it interrupted the write, and the run lost every step since the last periodic checkpoint
    (here step 3 of 3, checkpoint at 2; on the small recipe up to 249 steps), with no resume line. Now
    that write finishes, and the run stops there with the resume line, before sampling and evaluating."""
    import training.loop
    real_save = training.loop.save_checkpoint

    def save_with_sigterm(state, path):
        if state["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(state, path)
    monkeypatch.setattr(training.loop, "save_checkpoint", save_with_sigterm)
    with pytest.raises(Interrupted, match=r"SIGTERM after step 3: checkpoint written to .*checkpoint\.pt") as stopped:
        with handle_signals():  # as train_mnist.main: outside the steps a signal raises Interrupted at once
            run_train(tmp_path, "flux", "dyt", digit_folder, "--steps", "3")
    ckpt = tmp_path / "out" / "checkpoint.pt"
    assert stopped.value.exit_code == 143 and stopped.value.resume_from == str(ckpt)
    assert load_checkpoint(ckpt)["step"] == 3
    assert not (tmp_path / "out" / "metrics.json").exists()
