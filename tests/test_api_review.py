"""Findings of the public module/backend API review whose fix lies outside the files it could change."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from dyt_kernels import DyTCheckpointWarning, ModulatedDyT, load_dyt_state_dict


def test_load_dyt_state_dict_does_not_call_a_modulated_dyt_alpha_dropped():
    """load_dyt_state_dict into a model that holds a ModulatedDyT (the project's models with
    norm="dyt"): its alpha loads, and no warning says it was dropped."""
    model = nn.Sequential(nn.Linear(8, 8), ModulatedDyT(8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.alpha"].fill_(0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DyTCheckpointWarning)
        load_dyt_state_dict(model, state)
    assert torch.equal(model[1].alpha, torch.full((1,), 0.9))
