"""Tests for training/recipes.py: every network has its diffusion process and samplers; the recipes."""
from __future__ import annotations

import pytest

import models
from models import build_model
from training.diffusion import DDPM, RectifiedFlow
from training.recipes import MODELS, RECIPES, SAMPLERS, check_sampler, make_diffusion, recipe_value


def test_every_network_has_a_training_spec():
    assert MODELS.keys() == models.MODELS.keys()
    assert (MODELS["pixart"].default_sampler, MODELS["flux"].default_sampler) == ("ddim", "euler")
    assert set(SAMPLERS) == {"ddim", "ddpm", "euler"}


@pytest.mark.parametrize("name, kind", [("pixart", DDPM), ("flux", RectifiedFlow)])
def test_make_diffusion_follows_the_registry(name, kind):
    model = build_model(name, "small", hidden_size=32, num_heads=2, patch_size=8)
    process = make_diffusion(name, model, 32, "min_snr", 3.0, "v")
    assert isinstance(process, kind)
    if kind is DDPM:
        assert (process.loss_weighting, process.snr_gamma, process.prediction) == ("min_snr", 3.0, "v")
    else:
        assert process.image_seq_len == (32 // 8) ** 2  # the time shift follows the token count


def test_check_sampler():
    assert check_sampler("pixart", "ddpm") == "ddpm"
    with pytest.raises(ValueError, match="'euler' does not fit model 'pixart', which samples with ddim or ddpm"):
        check_sampler("pixart", "euler")


def test_recipe_values_per_model():
    assert recipe_value("small", "steps", "flux") == 1500 and recipe_value("small", "batch_size", "flux") == 128
    assert recipe_value("small", "model_overrides", "flux")["qk_alpha_init"] == 4.0
    for recipe in RECIPES.values():
        assert set(recipe["model_overrides"]) == set(MODELS)
