"""Tests for training/prompts.py: training prompts (numeral or word, dropped for guidance) and a user's list."""
from __future__ import annotations

import pytest
import torch

from training.prompts import PromptError, make_prompts, parse_prompt, parse_prompt_list

DIGITS = [str(d) for d in range(10)]


def test_prompts_numeral_or_word_and_dropped():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2000) % 10
    prompts = make_prompts(labels, DIGITS, g, drop_prob=0.2)
    dropped = sum(p == "" for p in prompts) / len(prompts)
    words = sum(p.isalpha() for p in prompts if p) / sum(bool(p) for p in prompts)
    assert 0.17 < dropped < 0.23 and 0.45 < words < 0.55
    assert all(parse_prompt(p, DIGITS) == int(label) for p, label in zip(prompts, labels) if p)


@pytest.mark.parametrize("text, expected", [
    ("2 seven 0", ["2", "seven", "0"]),
    ("2, Seven ,0", ["2", "Seven", "0"]),
    ("", [""]), ("   ", [""]), ("3,,4", ["3", "", "4"]),
])
def test_user_prompts_split_by_spaces_or_commas(text, expected):
    assert parse_prompt_list(text, DIGITS) == expected


def test_user_prompts_naming_no_label_are_refused():
    with pytest.raises(PromptError, match=r"'eleven', 'handwritten' name\(s\) no label"):
        parse_prompt_list("3 eleven handwritten", DIGITS)
    assert parse_prompt_list("cat, Dog", ["cat", "dog"]) == ["cat", "Dog"]
    with pytest.raises(PromptError, match="it knows cat, dog"):
        parse_prompt_list("7", ["cat", "dog"])
