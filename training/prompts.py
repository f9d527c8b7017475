"""Prompts: one label per image, a digit as numeral or word ("7" / "seven"), other labels by name.

Training draws them per batch (``make_prompts``, with classifier-free guidance's dropped prompts);
sampling reads a user's list (``parse_prompt_list``), which must name labels the model was trained on:
the tiny text encoder has seen nothing else, so any other word would be a silent guess.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.text import DIGIT_WORDS

from .errors import UsageError


class PromptError(UsageError):
    """Prompts that name no label the model was trained on."""


def is_digit_classes(class_names: list[str]) -> bool:
    return list(class_names) == [str(d) for d in range(len(class_names))] and len(class_names) <= 10


def label_prompt(label: int, class_names: list[str], use_word: bool) -> str:
    """The prompt for one label: a digit as numeral or word ("7" / "seven"), other labels as their name."""
    if is_digit_classes(class_names):
        return DIGIT_WORDS[label] if use_word else str(label)
    return class_names[label]


def make_prompts(labels: Tensor, class_names: list[str], generator: torch.Generator | None = None,
                 drop_prob: float = 0.0) -> list[str]:
    """Prompts for a batch of labels: numeral or word 50/50, and ``drop_prob`` of them "" (the
    unconditional prompt that classifier-free guidance learns from).

    >>> make_prompts(torch.tensor([3, 3]), [str(d) for d in range(10)], torch.Generator().manual_seed(0))
    ['3', 'three']
    """
    n = labels.shape[0]
    u = torch.rand(n, 2, generator=generator)
    return ["" if u[i, 0] < drop_prob else label_prompt(int(labels[i]), class_names, bool(u[i, 1] < 0.5))
            for i in range(n)]


def grid_prompts(n: int, class_names: list[str], seed: int) -> list[str]:
    """``n`` random labels' prompts, fixed by ``seed``: the sample grids' prompts."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(class_names), (n,), generator=g)
    return make_prompts(labels, class_names, g)


def parse_prompt(prompt: str, class_names: list[str]) -> int | None:
    """The label a prompt names (numeral, word or class name), or None when it names none."""
    p = prompt.strip().lower()
    if is_digit_classes(class_names) and p in DIGIT_WORDS[:len(class_names)]:
        return DIGIT_WORDS.index(p)
    lowered = [c.lower() for c in class_names]
    return lowered.index(p) if p in lowered else None


def known_labels(class_names: list[str]) -> str:
    """What a prompt may say, in words: '0-9 as numerals or words (zero ... nine)' or the class names."""
    if is_digit_classes(class_names):
        last = len(class_names) - 1
        return f"0-{last} as numerals or words ({DIGIT_WORDS[0]} ... {DIGIT_WORDS[last]})"
    return ", ".join(class_names)


def parse_prompt_list(text: str, class_names: list[str]) -> list[str]:
    """A user's prompts: separated by commas when there is one, else by spaces; "" (an empty entry,
    or an empty or blank text) is the unconditional prompt. Raises PromptError naming every entry that
    names no label of ``class_names``.

    >>> parse_prompt_list("2 seven 0", [str(d) for d in range(10)])
    ['2', 'seven', '0']
    >>> parse_prompt_list("", [str(d) for d in range(10)])
    ['']
    """
    if not text.strip():
        return [""]
    entries = [p.strip() for p in (text.split(",") if "," in text else text.split())]
    unknown = [p for p in entries if p and parse_prompt(p, class_names) is None]
    if unknown:
        raise PromptError(f"{', '.join(repr(p) for p in unknown)} name(s) no label this model was trained on; "
                          f"it knows {known_labels(class_names)}, or \"\" for no condition")
    return entries
