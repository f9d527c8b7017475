"""Tests for training/config.py: the recipe fills what the flags leave open, and a resumed run takes the
checkpoint's trajectory."""
from __future__ import annotations

import pytest
import torch

from training.config import merge_resume_config, resolve_train_config
from training.errors import UsageError
from training.parsers import build_parser
from training.recipes import RECIPES


def resolve(argv, device="cpu"):
    _, commands = build_parser("train_mnist.py")
    values, given = commands["train"].parse(argv)
    return resolve_train_config(values, torch.device(device), 1), given


@pytest.mark.parametrize("model", ["pixart", "flux"])
def test_recipe_values_follow_the_model_and_flags_win(model):
    cfg, _ = resolve(["--model", model, "--preset", "small"])
    recipe = RECIPES["small"]
    for key in ("steps", "lr", "loss_weighting"):
        want = recipe[key][model] if isinstance(recipe[key], dict) else recipe[key]
        assert cfg[key] == want, key
    assert cfg["model_overrides"] == recipe["model_overrides"][model]
    assert cfg["sampler"] == {"pixart": "ddim", "flux": "euler"}[model]
    cfg, _ = resolve(["--model", model, "--preset", "small", "--lr", "0.5", "--steps", "7",
                      "--model-override", "patch_size=4"])
    assert cfg["lr"] == 0.5 and cfg["steps"] == 7 and cfg["model_overrides"]["patch_size"] == 4


def test_auto_preset_and_precision_follow_the_device():
    cfg, _ = resolve([])
    assert (cfg["preset"], cfg["precision"], cfg["out"]) == ("small", "fp32", "runs/pixart-dyt-small")


def test_resume_takes_the_checkpoints_trajectory_and_model_defaults():
    saved, given = resolve(["--model", "flux", "--lr", "0.01", "--steps", "9"])
    saved = {k: v for k, v in saved.items() if k != "prediction"}  # a checkpoint from before --prediction
    cfg, given = resolve(["--resume", __file__])
    merged = merge_resume_config(cfg, saved, given, "ckpt.pt")
    assert (merged["model"], merged["lr"], merged["steps"], merged["sampler"]) == ("flux", 0.01, 9, "euler")
    assert merged["prediction"] == "eps"  # what runs before the flag trained
    cfg, given = resolve(["--resume", __file__, "--norm", "layernorm"])
    with pytest.raises(UsageError, match="trained with norm='dyt', but this run asks for norm='layernorm'"):
        merge_resume_config(cfg, saved, given, "ckpt.pt")


def test_resume_keeps_the_runs_own_settings_unless_given():
    """A resumed run used to take its checkpoint, sample-grid and evaluation settings from the defaults:
    a run given --checkpoint-every 7 went on checkpointing every 250 steps (the preset's), so the next
    interruption lost up to 249 steps, and its final metrics were measured with the default guidance,
    sampling steps and sample count instead of the run's. Flags given to the resume still win."""
    settings = {"checkpoint_every": 7, "sample_every": 3, "eval_samples": 0, "guidance": 2.0, "sampling_steps": 9,
                "num_threads": 1, "data_dir": "elsewhere", "no_progress": True}
    saved, _ = resolve(["--model", "flux", "--checkpoint-every", "7", "--sample-every", "3", "--eval-samples", "0",
                        "--guidance", "2", "--sampling-steps", "9", "--num-threads", "1", "--data-dir", "elsewhere",
                        "--no-progress"])
    cfg, given = resolve(["--resume", __file__])
    merged = merge_resume_config(cfg, saved, given, "ckpt.pt")
    assert {key: merged[key] for key in settings} == settings
    cfg, given = resolve(["--resume", __file__, "--guidance", "5", "--checkpoint-every", "0"])
    merged = merge_resume_config(cfg, saved, given, "ckpt.pt")
    assert (merged["guidance"], merged["checkpoint_every"], merged["sample_every"]) == (5.0, 0, 3)
