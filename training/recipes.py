"""How each model is trained: its diffusion process and samplers (the registry), and the recipes.

The networks in models/ know nothing of diffusion; this registry pairs each with the process it is
trained by (PixArt-alpha: DDPM; FLUX: rectified flow) and the samplers that process offers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .diffusion import DDPM, RectifiedFlow

Process = DDPM | RectifiedFlow


def _ddpm(image_seq_len: int, loss_weighting: str, snr_gamma: float, prediction: str) -> DDPM:
    return DDPM(loss_weighting=loss_weighting, snr_gamma=snr_gamma, prediction=prediction)


def _rectified_flow(image_seq_len: int, loss_weighting: str, snr_gamma: float, prediction: str) -> RectifiedFlow:
    # Rectified flow has one target (the velocity) and one weighting; its time shift follows the token count.
    return RectifiedFlow(image_seq_len)


@dataclass(frozen=True)
class ModelSpec:
    """A network's training side: ``process(image_seq_len, loss_weighting, snr_gamma, prediction)``
    builds its diffusion process; ``samplers`` are that process's samplers, the default first."""
    process: Callable[[int, str, float, str], Process]
    samplers: tuple[str, ...]

    @property
    def default_sampler(self) -> str:
        return self.samplers[0]


MODELS: dict[str, ModelSpec] = {
    "pixart": ModelSpec(_ddpm, DDPM.SAMPLERS),
    "flux": ModelSpec(_rectified_flow, RectifiedFlow.SAMPLERS),
}
SAMPLERS = tuple(dict.fromkeys(s for spec in MODELS.values() for s in spec.samplers))


def make_diffusion(model_name: str, model: nn.Module, image_size: int, loss_weighting: str = "simple",
                   snr_gamma: float = 5.0, prediction: str = "eps") -> Process:
    """The diffusion process ``model`` (a built ``model_name``) trains and samples with at ``image_size``.

    >>> from models import build_model
    >>> make_diffusion("flux", build_model("flux", "small"), 32).config()["kind"]
    'rectified_flow'
    """
    image_seq_len = (image_size // model.patch_size) ** 2
    return MODELS[model_name].process(image_seq_len, loss_weighting, snr_gamma, prediction)


def check_sampler(model_name: str, sampler: str) -> str:
    """``sampler`` if ``model_name``'s process offers it; a ValueError naming both otherwise."""
    samplers = MODELS[model_name].samplers
    if sampler not in samplers:
        raise ValueError(f"sampler {sampler!r} does not fit model {model_name!r}, which samples with "
                         f"{' or '.join(samplers)}")
    return sampler


# What --preset sets when a flag is not given. "seed" is the seed's GPU recipe (batch 1024, bf16 on
# CUDA, 20k steps PixArt-alpha / 10k FLUX, Adam lr 2e-4, eps-prediction). "small" is the 2-core-CPU
# recipe: under 10 minutes of training to >= 95% guided conditional accuracy (README "Results").
# A value is one for both models, or a {model: value} dict.
RECIPES: dict[str, dict[str, Any]] = {
    "seed": {
        "steps": {"pixart": 20_000, "flux": 10_000}, "batch_size": 1024, "lr": 2e-4, "warmup_steps": 1000,
        "ema_decay": 0.9995, "sample_every": 1000, "checkpoint_every": 1000, "loss_weighting": "simple",
        "prediction": "eps",
        "model_overrides": {"pixart": {}, "flux": {}},
    },
    "small": {
        # Tuned on the 2-core CPU (README "How the small recipe was tuned"): patch 8 (16 tokens) and
        # batch 128 for both; PixArt-alpha's DDPM predicts v (eps reached 12%), at lr 3e-3 with min-SNR.
        # FLUX's QK-norm DyTs start at RMSNorm's output scale (alpha0 4, weight0 2; at alpha0 0.5 the attention
        # logits start with a spread of 0.006, not 1, and DyT FLUX trailed LayerNorm); an RMSNorm ignores both.
        "steps": {"pixart": 2000, "flux": 1500}, "batch_size": 128, "lr": {"pixart": 3e-3, "flux": 2e-3},
        "warmup_steps": 100, "ema_decay": 0.995, "sample_every": 500, "checkpoint_every": 250,
        "loss_weighting": {"pixart": "min_snr", "flux": "simple"}, "prediction": "v",
        "model_overrides": {"pixart": {"patch_size": 8},
                            "flux": {"patch_size": 8, "qk_alpha_init": 4.0, "qk_weight_init": 2.0}},
    },
}


def recipe_value(preset: str, key: str, model_name: str) -> Any:
    value = RECIPES[preset][key]
    return value[model_name] if isinstance(value, dict) else value
