"""Tests for training/evaluate.py: the metrics a finished run writes, and the `eval` command."""
from __future__ import annotations

import json
import os

import pytest

import train_mnist
from training.errors import UsageError
from tiny_runs import digit_folder, digits, run_train  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One --data-dir for the module: the eval classifier is trained once and then loaded from its cache."""
    return str(tmp_path_factory.mktemp("classifier_cache"))


def test_eval_reports_accuracy_and_fid(tmp_path, digit_folder, cache):
    metrics = run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "2", "--eval-samples", "20",
                        "--data-dir", cache)
    for key in ("cond_acc_guided", "cond_acc_unguided", "fid_guided", "fid_unguided", "classifier_heldout_accuracy"):
        assert key in metrics, key
    assert 0.0 <= metrics["cond_acc_guided"] <= 1.0 and metrics["fid_guided"] > 0
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["cond_acc_guided"] == metrics["cond_acc_guided"] and on_disk["eval_samples"] == 20
    assert os.path.isfile(metrics["classifier_path"])  # cached for the next run

    # The eval command on the same checkpoint, with the same settings, measures the same numbers.
    again = train_mnist.run_command(["eval", "--checkpoint", str(tmp_path / "out" / "checkpoint.pt"),
                                     "--eval-samples", "20", "--sampling-steps", "2", "--data-dir", cache,
                                     "--out", str(tmp_path / "again")])
    for key in ("cond_acc_guided", "cond_acc_unguided", "fid_guided", "fid_unguided", "per_class_acc_guided",
                "diffusion", "steps", "final_loss_mean_last_100"):
        assert again[key] == metrics[key], key
    assert "wall_time_s" not in again  # nothing was trained
    assert (tmp_path / "again" / "metrics.json").is_file() and (tmp_path / "again" / "eval_guided.png").is_file()


def test_fewer_samples_than_labels_give_null_not_nan(tmp_path, digit_folder, cache):
    """Labels without a sample had a NaN accuracy, which json.dump writes as an invalid NaN token."""
    run_train(tmp_path, "flux", "dyt", digit_folder, "--steps", "1", "--eval-samples", "4", "--data-dir", cache)
    text = (tmp_path / "out" / "metrics.json").read_text()
    assert "NaN" not in text
    per_class = json.loads(text)["per_class_acc_guided"]
    assert per_class[4:] == [None] * 6 and all(isinstance(v, float) for v in per_class[:4])


def test_eval_command_takes_the_checkpoints_sampler_and_refuses_a_wrong_one(tmp_path, digit_folder, cache):
    run_train(tmp_path, "pixart", "layernorm", digit_folder, "--steps", "1", "--sampler", "ddpm")
    ckpt = str(tmp_path / "out" / "checkpoint.pt")
    metrics = train_mnist.run_command(["eval", "--checkpoint", ckpt, "--eval-samples", "2", "--sampling-steps", "2",
                                       "--data-dir", cache])
    assert metrics["sampler"] == "ddpm"
    with pytest.raises(UsageError, match="--sampler: sampler 'euler' does not fit model 'pixart'"):
        train_mnist.run_command(["eval", "--checkpoint", ckpt, "--sampler", "euler"])
