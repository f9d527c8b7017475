"""Tests for training/loop.py: a few real training steps of each model and norm, exact resume, what a
non-finite loss leaves, image folders, DDP on CPU, and the compiled step."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import train_mnist
from tiny_runs import ROOT, digit_folder, digits, read_losses, rgb_folder, run_train, tiny_flags  # noqa: F401
from training.checkpoint import load_checkpoint
from training.diffusion import DDPM
from training.errors import RunFailed, UsageError


@pytest.mark.parametrize("model", ["pixart", "flux"])
@pytest.mark.parametrize("norm", ["dyt", "layernorm"])
def test_few_steps_each_model_and_norm(tmp_path, model, norm, digit_folder):
    metrics = run_train(tmp_path, model, norm, digit_folder, "--steps", "3")
    out = tmp_path / "out"
    assert metrics["steps"] == 3 and metrics["model"] == model and metrics["norm"] == norm
    losses = read_losses(out)
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    for name in ("checkpoint.pt", "loss_curve.png", "metrics.json", "samples_0000003.png", "samples_0000003.txt"):
        assert (out / name).is_file(), name
    rows = (out / "samples_0000003.txt").read_text().splitlines()
    assert len(rows) == 8 and all(len(r.split()) == 8 for r in rows)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 3 and state["config"]["norm"] == norm
    if model == "pixart":  # the small recipe's DDPM predicts v, and the checkpoint says so
        assert state["run_info"]["diffusion"]["prediction"] == state["config"]["prediction"] == "v"
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # every file was renamed into place


def test_resume_continues_exactly(tmp_path, digit_folder):
    whole = tmp_path / "whole"
    run_train(whole, "flux", "dyt", digit_folder, "--steps", "4")
    part = tmp_path / "part"
    run_train(part, "flux", "dyt", digit_folder, "--steps", "2")
    train_mnist.run_command(["--resume", str(part / "out" / "checkpoint.pt"), "--steps", "4", "--eval-samples",
                             "0", "--data-dir", str(part / "cache"), "--no-progress", "--sampling-steps", "2",
                             "--data", digit_folder])
    expect, got = read_losses(whole / "out"), read_losses(part / "out")
    assert len(got) == 4
    assert got[2:] == expect[2:]  # bit-identical, not merely close
    assert got[:2] == expect[:2]


def test_resume_refuses_a_contradicting_flag_and_fewer_steps(tmp_path, digit_folder):
    run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "2")
    ckpt = str(tmp_path / "out" / "checkpoint.pt")
    with pytest.raises(UsageError, match="trained with lr=0.001, but this run asks for lr=0.5"):
        train_mnist.run_command(["--resume", ckpt, "--lr", "0.5", "--steps", "3", "--data", digit_folder,
                                 "--eval-samples", "0"])
    with pytest.raises(UsageError, match="--steps 1 is below the checkpoint's step 2"):
        train_mnist.run_command(["--resume", ckpt, "--steps", "1", "--data", digit_folder, "--eval-samples", "0"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digit_folder, monkeypatch):
    calls = {"n": 0}
    real_loss = DDPM.training_loss

    def loss_turning_nan(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss
    monkeypatch.setattr(DDPM, "training_loss", loss_turning_nan)
    with pytest.raises(RunFailed, match=r"loss is nan at step 4.*checkpoint\.pt"):
        run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "6")
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["step"] == 2


def test_non_finite_weights_are_never_checkpointed(tmp_path, digit_folder, monkeypatch):
    """A step can leave inf weights with a finite loss (the loss is computed before the update); the
    checkpoint written after it would carry them, and sampling from it gave black grids."""
    real_step = torch.optim.AdamW.step

    def step_to_inf(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step_to_inf)
    with pytest.raises(RunFailed, match="weights became non-finite by step 2"):
        run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "4")
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_three_channel_folder_trains(tmp_path):
    metrics = train_mnist.run_command(["--model", "pixart", "--data", rgb_folder(tmp_path), "--image-size", "16", "--steps",
                                       "2", "--batch-size", "4", "--out", str(tmp_path / "out"), "--eval-samples",
                                       "4", "--data-dir", str(tmp_path), "--sampling-steps", "2", "--no-progress",
                                       *tiny_flags("pixart")])
    assert metrics["in_channels"] == 3 and metrics["steps"] == 2 and metrics["class_names"] == ["cat", "dog"]


def test_compiled_step_trains_like_the_eager_one(tmp_path, digit_folder, monkeypatch):
    """--compile default wraps the model in torch.compile and trains through it. Inductor's C++ build
    takes over a minute on a cold 2-core CPU, so this test compiles with the aot_eager backend (the same
    tracing and autograd partitioning, no code generation); measured by hand with inductor, the same
    two steps gave bit-identical losses to eager ones."""
    real_compile, modes = torch.compile, []

    def compile_aot_eager(model, **kwargs):
        modes.append(kwargs.get("mode", "default"))
        return real_compile(model, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    run_train(tmp_path / "compiled", "flux", "dyt", digit_folder, "--steps", "2", "--compile", "default")
    run_train(tmp_path / "eager", "flux", "dyt", digit_folder, "--steps", "2")
    assert modes == ["default"]
    compiled, eager = read_losses(tmp_path / "compiled" / "out"), read_losses(tmp_path / "eager" / "out")
    # The same ATen math, traced and decomposed: equal up to fp32 rounding.
    assert compiled == pytest.approx(eager, rel=1e-5)
    state = load_checkpoint(tmp_path / "compiled" / "out" / "checkpoint.pt")
    assert not [k for k in state["model"] if "_orig_mod" in k]  # the plain model's keys: resumable uncompiled


def test_torchrun_two_processes_on_cpu(tmp_path, digit_folder):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_mnist.py"), "--model", "flux", "--data", digit_folder, "--steps", "2",
           "--batch-size", "8", "--out", str(out), "--data-dir", str(tmp_path / "cache"), "--eval-samples", "0",
           "--sampling-steps", "2", "--no-progress", *tiny_flags("flux")]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and state["config"]["world_size"] == 2
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    # Only rank 0 writes: no stray temp files from a second writer.
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


def test_resume_keeps_the_labels_file_and_says_when_the_data_differ(tmp_path, digit_folder, capsys):
    """--labels-file shapes the training data; before, a resumed run dropped it and trained on the
    folder's default labels.txt (here 10 classes instead of 5) without a word. Now it continues with
    the checkpoint's, refuses a contradicting one, and says when the data it loads differ from the ones
    the checkpoint was trained on (a labels file edited, or MNIST online where the run was offline)."""
    lines = open(os.path.join(digit_folder, "labels.txt")).read().splitlines()[1:]
    subset = tmp_path / "low_digits.csv"
    subset.write_text("\n".join(line for line in lines if int(line.split(",")[1]) < 5) + "\n")
    run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "2", "--labels-file", str(subset))
    ckpt = tmp_path / "out" / "checkpoint.pt"
    resume = ["--resume", str(ckpt), "--data", digit_folder, "--data-dir", str(tmp_path / "cache"), "--eval-samples",
              "0", "--no-progress", "--sampling-steps", "2"]
    other = tmp_path / "other.csv"
    other.write_text(subset.read_text())
    with pytest.raises(UsageError, match=r"trained with labels_file=.*low_digits.csv.*asks for labels_file=.*other"):
        train_mnist.run_command([*resume, "--steps", "3", "--labels-file", str(other)])
    train_mnist.run_command([*resume, "--steps", "3"])
    state = load_checkpoint(ckpt)
    assert state["step"] == 3 and state["run_info"]["class_names"] == ["0", "1", "2", "3", "4"]
    assert "differ" not in capsys.readouterr().err
    subset.write_text("\n".join(line for line in lines if int(line.split(",")[1]) < 4) + "\n")  # one label fewer
    train_mnist.run_command([*resume, "--steps", "4"])
    err = capsys.readouterr().err
    assert "[resume] the training data differ from the checkpoint's" in err and "class_names" in err, err


def test_resume_keeps_the_runs_checkpoint_and_sample_intervals(tmp_path, digit_folder):
    """A run given --sample-every 1 --checkpoint-every 1, resumed without them, used the preset's 500 / 250
    steps: no sample grid and no checkpoint until the end of the run."""
    run_train(tmp_path, "flux", "dyt", digit_folder, "--steps", "2", "--sample-every", "1", "--checkpoint-every", "1")
    out = tmp_path / "out"
    os.remove(out / "samples_0000001.png")
    train_mnist.run_command(["--resume", str(out / "checkpoint.pt"), "--steps", "4", "--data", digit_folder,
                             "--data-dir", str(tmp_path / "cache")])
    assert (out / "samples_0000003.png").is_file()
    state = load_checkpoint(out / "checkpoint.pt")
    assert (state["config"]["sample_every"], state["config"]["checkpoint_every"]) == (1, 1)
    assert state["config"]["eval_samples"] == 0 and state["config"]["sampling_steps"] == 2  # the run's, not 1000 / 50


@pytest.mark.parametrize("model", ["pixart", "flux"])
def test_resume_reproduces_every_state_bit_for_bit(tmp_path, digit_folder, model, monkeypatch):
    """7 steps straight against 3 steps + --resume to 7, the resume inside the LR warm-up, with periodic
    checkpoints and sample grids on the way (sampling must not disturb the training RNG): model, EMA,
    optimizer moments, scheduler and losses are bitwise equal (same ops in the same order on the same
    inputs, so there is no rounding to tolerate), and the learning rate each step ran with is AdamW's lr
    times min(1, step / warmup), as --warmup-steps says."""
    lrs = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    flags = ("--warmup-steps", "4", "--ema-decay", "0.9", "--sample-every", "2", "--cfg-dropout", "0.5")
    run_train(tmp_path / "whole", model, "dyt", digit_folder, "--steps", "7", *flags)
    straight, lrs[:] = list(lrs), []
    part = tmp_path / "part"
    run_train(part, model, "dyt", digit_folder, "--steps", "3", *flags)
    train_mnist.run_command(["--resume", str(part / "out" / "checkpoint.pt"), "--steps", "7", "--data", digit_folder])
    assert lrs == straight == pytest.approx([1e-3 * min(1, k / 4) for k in range(1, 8)], rel=1e-12)
    a = load_checkpoint(tmp_path / "whole" / "out" / "checkpoint.pt")
    b = load_checkpoint(part / "out" / "checkpoint.pt")
    assert a["step"] == b["step"] == 7 and a["losses"] == b["losses"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert [k for k in a[key] if not torch.equal(a[key][k], b[key][k])] == [], key
    assert a["scheduler"] == b["scheduler"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][m], sb[i][m]) for i in sa for m in sa[i])
