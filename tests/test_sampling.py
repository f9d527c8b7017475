"""Tests for training/sampling.py: generate, and the `sample` command (grid, prompts, the checkpoint's
prediction, prompts it refuses or samples unconditionally)."""
from __future__ import annotations

import os

import pytest
import torch

import train_mnist
from models import build_model
from tiny_runs import TINY, digit_folder, digits, randomized, run_train  # noqa: F401 (fixtures)
from training.checkpoint import load_checkpoint
from training.diffusion import DDPM
from training.errors import RunFailed, UsageError
from training.recipes import make_diffusion
from training.sampling import ema_weights, generate


@pytest.fixture(scope="module")
def flux_checkpoint(tmp_path_factory, digit_folder):
    tmp = tmp_path_factory.mktemp("flux_ckpt")
    run_train(tmp, "flux", "layernorm", digit_folder, "--steps", "1")
    return tmp / "out" / "checkpoint.pt"


def sample(checkpoint, tmp_path, *flags):
    return train_mnist.run_command(["sample", "--checkpoint", str(checkpoint), "--sampling-steps", "2",
                                    "--out", str(tmp_path / "s"), *flags])


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_generate_count_and_range(name):
    model = randomized(build_model(name, "small", "layernorm", **TINY[name]))
    diffusion = make_diffusion(name, model, 32)
    sampler = "ddim" if name == "pixart" else "euler"
    images = generate(model, diffusion, ["1", "two", "3", "", "9"], guidance=4.0, steps=3, sampler=sampler,
                      in_channels=1, image_size=32, device=torch.device("cpu"), seed=0, batch=2)
    assert images.shape == (5, 1, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert images.std() > 0


def test_generate_refuses_non_finite_images():
    """NaN images used to reach the PNG writer, which saved them as an all-black grid (exit code 0)."""
    model = randomized(build_model("flux", "small", "layernorm", **TINY["flux"]))
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(RunFailed, match="non-finite"):
        generate(model, make_diffusion("flux", model, 32), ["1"], guidance=4.0, steps=2, sampler="euler",
                 in_channels=1, image_size=32, device=torch.device("cpu"), seed=0)


def test_sample_command_writes_grid_and_prompts(tmp_path, flux_checkpoint):
    result = sample(flux_checkpoint, tmp_path, "--prompts", "2 seven 0", "--num-samples", "6")
    assert result["images"].shape == (6, 1, 32, 32)
    assert result["prompts"] == ["2", "seven", "0", "2", "seven", "0"]
    assert os.path.isfile(result["path"])
    assert open(os.path.splitext(result["path"])[0] + ".txt").read().split() == result["prompts"]


def test_sample_command_uses_the_checkpoints_prediction(tmp_path, digit_folder):
    run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "1", "--prediction", "v")
    ckpt = tmp_path / "out" / "checkpoint.pt"
    result = sample(ckpt, tmp_path, "--prompts", "3", "--num-samples", "2", "--seed", "5")
    state = load_checkpoint(ckpt)
    model = build_model("pixart", state["config"]["preset"], "dyt", **state["config"]["model_overrides"])
    model.load_state_dict(ema_weights(state["ema"]))
    for prediction, same in (("v", True), ("eps", False)):
        images = generate(model, DDPM(prediction=prediction), ["3", "3"], guidance=4.0, steps=2, sampler="ddim",
                          in_channels=1, image_size=32, device=torch.device("cpu"), seed=5)
        assert torch.equal(images, result["images"]) == same, prediction


@pytest.mark.parametrize("prompts", ["", "   ", ","])
def test_empty_prompts_sample_unconditionally_and_say_so(tmp_path, flux_checkpoint, capsys, prompts):
    """"" used to fall back to random digits, and "   " raised ZeroDivisionError."""
    result = sample(flux_checkpoint, tmp_path, "--prompts", prompts, "--num-samples", "3", "--seed", "1")
    assert result["prompts"] == ["", "", ""]
    assert "samples without a condition (every image)" in capsys.readouterr().err
    unconditional = sample(flux_checkpoint, tmp_path, "--prompts", "", "--num-samples", "3", "--seed", "1",
                           "--guidance", "1")
    assert torch.equal(result["images"], unconditional["images"])  # guidance has nothing to act on


def test_prompts_the_model_does_not_know_are_refused_by_name(tmp_path, flux_checkpoint):
    with pytest.raises(UsageError, match=r"--prompts: 'eleven', 'cat' name\(s\) no label .* 0-9 as numerals or "
                                         r"words \(zero \.\.\. nine\)"):
        sample(flux_checkpoint, tmp_path, "--prompts", "3 eleven cat")
    assert not (tmp_path / "s").exists()  # refused before any work


def test_sampler_must_fit_the_checkpoints_model(tmp_path, flux_checkpoint):
    with pytest.raises(UsageError, match="--sampler: sampler 'ddim' does not fit model 'flux'.*euler"):
        sample(flux_checkpoint, tmp_path, "--sampler", "ddim")


def test_a_checkpoint_is_rebuilt_as_trained_after_its_preset_changes(tmp_path, digit_folder, monkeypatch, capsys):
    """A preset edited after a checkpoint was written (here FLUX small's rope_theta, which changes no
    tensor shape, so the weights would load without complaint): sampling and resuming build the model
    the checkpoint recorded, and say the preset has changed. Before, they built the preset's current
    model and computed with the old weights in it, silently. A checkpoint from before the settings were
    recorded builds from the current preset, as it always did."""
    from models import FLUX_PRESETS
    from training.sampling import model_from_checkpoint
    run_train(tmp_path, "flux", "dyt", digit_folder, "--steps", "2")
    path = str(tmp_path / "out" / "checkpoint.pt")
    trained = FLUX_PRESETS["small"]["rope_theta"]
    state = load_checkpoint(path)
    assert state["config"]["model_settings"]["rope_theta"] == trained
    monkeypatch.setitem(FLUX_PRESETS["small"], "rope_theta", trained / 20)
    capsys.readouterr()
    model, _ = model_from_checkpoint(state, path, "ema", torch.device("cpu"))
    assert model.rope_theta == trained
    err = capsys.readouterr().err
    assert "preset has changed" in err and f"rope_theta {trained!r} -> {trained / 20!r}" in err
    legacy = {**state, "config": {k: v for k, v in state["config"].items() if k != "model_settings"}}
    assert model_from_checkpoint(legacy, path, "ema", torch.device("cpu"))[0].rope_theta == trained / 20
    run_train(tmp_path, "flux", "dyt", digit_folder, "--steps", "3", "--resume", path)
    assert "preset has changed" in capsys.readouterr().err
    assert load_checkpoint(path)["config"]["model_settings"]["rope_theta"] == trained
