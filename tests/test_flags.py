"""Tests for training/flags.py: the value types' ranges and messages, --config files turned into flags,
and which flags count as given."""
from __future__ import annotations

import argparse
import math

import pytest

from training.errors import UsageError
from training.flags import config_argv, integer, model_override, number
from training.parsers import build_parser


def test_integer_range_and_message():
    parse = integer(1)
    assert parse("7") == 7
    for bad in ("0", "-5", "1.5", "ten", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be an integer >= 1, got {bad!r}"):
            parse(bad)
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 9\], got '10'"):
        integer(0, 9)("10")


def test_number_accepts_inf_only_where_it_means_something():
    assert number(0, above=True, inf_means="no clipping")("inf") == math.inf
    with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number > 0, got 'inf'"):
        number(0, above=True)("inf")
    for bad in ("nan", "-inf", "0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number > 0 \(inf: no clipping\)"):
            number(0, above=True, inf_means="no clipping")(bad)
    assert number(0, 1)("1") == 1.0 and number(0, 1)("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number in \[0, 1\], got '1.5'"):
        number(0, 1)("1.5")


def test_model_override_values_are_python_literals():
    assert model_override("hidden_size=192") == ("hidden_size", 192)
    assert model_override(" rope_axes = [8, 12, 12] ") == ("rope_axes", [8, 12, 12])
    assert model_override("qk_norm=rmsnorm") == ("qk_norm", "rmsnorm")
    with pytest.raises(argparse.ArgumentTypeError, match="takes KEY=VALUE"):
        model_override("=3")


def parse_train(argv):
    _, commands = build_parser("train_mnist.py")
    return commands["train"].parse(argv)


def test_config_values_are_defaults_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nbatch-size: 16\nno_progress: true\ncompile: true\n"
                   "model_overrides:\n  hidden_size: 64\n  qk_norm: rmsnorm\n")
    values, given = parse_train(["--config", str(cfg), "--batch-size", "32", "--model", "flux"])
    assert values["lr"] == 1e-3 and values["batch_size"] == 32 and values["no_progress"] is True
    assert values["compile"] == "default"  # `compile: true` meant torch.compile's default mode
    assert dict(values["model_override"]) == {"hidden_size": 64, "qk_norm": "rmsnorm"}
    # What the file sets counts as given (a resumed run refuses a contradicting value from a file too);
    # defaults do not.
    assert {"lr", "batch_size", "no_progress", "compile", "model_override", "model"} == given
    assert values["seed"] == 0 and values["steps"] is None


def test_an_empty_config_changes_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# nothing yet\n")
    values, given = parse_train(["--config", str(cfg)])
    assert given == set() and {**values, "config": None} == parse_train([])[0]


def test_config_argv_names_the_file(tmp_path):
    _, commands = build_parser("train_mnist.py")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_overrides: [1, 2]\n")
    with pytest.raises(UsageError, match=f"--config {cfg}: model_overrides must be a mapping"):
        config_argv(str(cfg), commands["train"])
    cfg.write_text("steps: [1, 2]\n")
    with pytest.raises(UsageError, match="--steps takes one value"):
        config_argv(str(cfg), commands["train"])
    cfg.write_text("config: other.yaml\n")
    with pytest.raises(UsageError, match="unknown key 'config'"):
        config_argv(str(cfg), commands["train"])
