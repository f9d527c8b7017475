"""load_dyt_state_dict and load_pretrained_dyt with alphas that are not DyT's, and non-strict loads.

An ``alpha`` key belongs to a DyT only where the model has no other home for it: a Snake activation or a
ReZero gate holds a parameter named alpha too, which loads as any other tensor. Under strict=False torch
returns the missing and unexpected keys; load_dyt_state_dict returns the model, so it names them in a warning.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dyt_kernels import DyT, convert_layernorm_to_dyt, load_dyt_state_dict, load_pretrained_dyt
from dyt_kernels.modules import DyTCheckpointWarning


class Snake(nn.Module):
    """x + sin(alpha x)^2 / alpha, with a per-channel parameter named alpha (not a norm)."""

    def __init__(self, n: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x + torch.sin(self.alpha * x) ** 2 / self.alpha


def _build():
    return nn.Sequential(nn.Linear(8, 8), Snake(8), nn.LayerNorm(8))


def _checkpoint():
    source = convert_layernorm_to_dyt(_build())
    with torch.no_grad():
        source[1].alpha.fill_(3.0)
        source[2].alpha.fill_(0.25)
    return source.state_dict()


def test_an_alpha_that_is_not_a_norms_loads_without_a_dropped_warning():
    """Before: '1 DyT alpha(s) ... DROPPED: 1.alpha' for the Snake's alpha, which had loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_dyt_state_dict(_build(), _checkpoint())
    assert isinstance(model[2], DyT) and not isinstance(model[1], DyT)
    assert torch.equal(model[1].alpha.detach(), torch.full((8,), 3.0))
    assert torch.equal(model[2].alpha.detach(), torch.tensor([0.25]))


def test_an_alpha_with_no_home_still_warns_dropped():
    state = _checkpoint()
    state["gone.alpha"] = torch.tensor([0.5])
    with pytest.warns(DyTCheckpointWarning, match=r"1 DyT alpha\(s\).*DROPPED: gone\.alpha") as caught:
        load_dyt_state_dict(_build(), state, strict=False)
    assert len(caught) == 1, "said once, not again among the unexpected keys"


def test_non_strict_load_names_missing_and_unexpected_keys():
    """torch's load_state_dict(strict=False) returns them; load_dyt_state_dict returns the model, and
    used to drop them on the floor."""
    state = _checkpoint()
    del state["0.bias"]
    state["head.weight"] = torch.zeros(2)
    with pytest.warns(DyTCheckpointWarning, match=r"1 key\(s\) \(0\.bias\) missing and 1 key\(s\) \(head\.weight\) unexpected"):
        load_dyt_state_dict(_build(), state, strict=False)


def test_non_strict_load_of_a_complete_state_dict_says_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dyt_state_dict(_build(), _checkpoint(), strict=False)


def test_pretrained_alpha_of_a_non_norm_is_not_called_dropped(tmp_path):
    transformers = pytest.importorskip("transformers")

    class Config(transformers.PretrainedConfig):
        model_type = "snake-test"

    class Model(transformers.PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.net = _build()
            self.post_init()

    source = Model(Config())
    convert_layernorm_to_dyt(source)
    with torch.no_grad():
        source.net[1].alpha.fill_(3.0)
        source.net[2].alpha.fill_(0.25)
    source.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DyTCheckpointWarning)
        model = load_pretrained_dyt(Model, str(tmp_path))
    assert isinstance(model.net[2], DyT)
    assert torch.equal(model.net[1].alpha.detach(), torch.full((8,), 3.0))
    assert torch.equal(model.net[2].alpha.detach(), torch.tensor([0.25]))
