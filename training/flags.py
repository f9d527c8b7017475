"""The commands' flags: what each accepts, checked where it is parsed, from the command line or --config.

Every value is checked by argparse (a type below, or choices) as it is read, so a bad one ends the
command before any work with one line naming the flag and the accepted range:

    PROG train: error: argument --grad-clip: must be a number > 0 (inf: no clipping), got '-1'

A --config YAML file is turned into the same flags (``config_argv``) and parsed by the same parser,
so its values get the same checks; flags on the command line win over it. Defaults are kept apart
from argparse (its parsers have argument_default=SUPPRESS), so the flags a user set are exactly the
parsed ones: a resumed run needs that to tell a contradicting flag from a default.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable

from .errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError (the command prints one line and exits 2)."""

    def error(self, message: str):
        raise UsageError(message)


# ------------------------------------------------------------------------------------ value types

def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum]."""
    accepted = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be an integer {accepted}, got {text!r}")
        return value
    return parse


def number(low: float | None = None, high: float | None = None, *, above: bool = False,
           inf_means: str | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number >= low (> low with above) and <= high; with inf_means, also
    +inf, whose meaning the message states."""
    parts = ["> %g" % low if above else ">= %g" % low] if low is not None else []
    parts += ["<= %g" % high] if high is not None else []
    accepted = ("a finite number" if inf_means is None else "a number") + (" " + " and ".join(parts) if parts else "")
    if low is not None and high is not None and not above:
        accepted = f"a number in [{low:g}, {high:g}]"
    if inf_means:
        accepted += f" (inf: {inf_means})"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) or (inf_means is not None and value == math.inf)
        ok = ok and (low is None or (value > low if above else value >= low)) and (high is None or value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}")
        return value
    return parse


def existing_file(text: str) -> str:
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def directory_to_write(text: str) -> str:
    """A directory that exists or can be created: not an existing file, not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got ''")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a directory")
    return text


def data_source(text: str) -> str:
    if text != "mnist" and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"must be 'mnist' or a folder of images with a labels file, got {text!r}")
    return text


def model_override(text: str) -> tuple[str, Any]:
    """KEY=VALUE; the value is read as a Python literal (192, 4.0, None, [8, 12, 12]) or else kept as text."""
    import ast
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE (e.g. hidden_size=192), got {text!r}")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()
    return key.strip(), parsed


SEED = integer(0, 2 ** 32 - 1)  # numpy's global seed takes 32 bits
SAMPLING_STEPS = integer(1, 1000)  # DDPM has 1000 steps to respace; Euler gains nothing past that
GUIDANCE = number(0.0)  # 0: unconditional, 1: no guidance


# ------------------------------------------------------------------------------------ commands

class Command:
    """One subcommand's parser and its flags' defaults."""

    def __init__(self, parser: Parser) -> None:
        self.parser = parser
        self.defaults: dict[str, Any] = {}
        self.actions: dict[str, argparse.Action] = {}
        self.required: dict[str, str] = {}
        self.repeatable: set[str] = set()

    def add(self, *names: str, default: Any = None, help: str = "", required: bool = False, **kwargs) -> None:
        shown = "" if default is None or default is False or default == [] else f" (default: {default})"
        help_text = (help + shown + (" (required)" if required else "")).replace("%", "%%")
        action = self.parser.add_argument(*names, help=help_text, **kwargs)
        self.defaults[action.dest] = default
        self.actions[action.dest] = action
        if required:
            self.required[action.dest] = names[0]
        if kwargs.get("action") == "append":
            self.repeatable.add(action.dest)

    def parse(self, argv: list[str]) -> tuple[dict[str, Any], set[str]]:
        """(every flag's value, the flags the user set), --config's values included."""
        given = vars(self.parser.parse_args(argv))
        if "config" in given:
            from_file = config_argv(given["config"], self)
            try:
                self.parser.parse_args(from_file)
            except UsageError as e:
                raise UsageError(f"--config {given['config']}: {e}") from None
            given = vars(self.parser.parse_args(from_file + argv))
        missing = [flag for dest, flag in self.required.items() if dest not in given]
        if missing:
            raise UsageError(f"{', '.join(missing)} is required")
        return {**self.defaults, **given}, set(given) - {"config"}


def config_argv(path: str, command: Command) -> list[str]:
    """The flags a --config YAML mapping stands for (keys are flag names, dashes or underscores;
    model_overrides is a mapping of KEY: VALUE)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if values is None:
        return []
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    argv: list[str] = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest == "model_overrides":
            if not isinstance(value, dict):
                raise UsageError(f"--config {path}: model_overrides must be a mapping of KEY: VALUE")
            argv += [item for k, v in value.items() for item in ("--model-override", f"{k}={v!r}")]
            continue
        action = command.actions.get(dest)
        if action is None or dest == "config":
            valid = sorted(d for d in command.actions if d != "config") + ["model_overrides"]
            raise UsageError(f"--config {path}: unknown key {key!r}; valid keys: {valid}")
        argv += _flag_words(action, value, path, dest in command.repeatable)
    return argv


def _flag_words(action: argparse.Action, value: Any, path: str, repeatable: bool) -> list[str]:
    flag = action.option_strings[0]
    if value is None:
        return []
    if action.nargs == 0 or (action.nargs == "?" and isinstance(value, bool)):  # on/off flags
        if not isinstance(value, bool):
            raise UsageError(f"--config {path}: {flag} is on or off (true or false), got {value!r}")
        return [flag] if value else []
    if repeatable and isinstance(value, list):
        return [word for item in value for word in (flag, str(item))]
    if isinstance(value, (list, dict)):
        raise UsageError(f"--config {path}: {flag} takes one value, got {value!r}")
    return [flag, str(value)]
