"""Weight decay and DyT's parameters: which names dyt_parameter_names gives, Hugging Face Trainer's decay
grouping with and without the documented override, and the training loop's AdamW groups."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dyt_kernels import DyT, ModulatedDyT, convert_layernorm_to_dyt, dyt_parameter_names
from library_models import CASES
from training.loop import param_groups


def _held(model):
    return {n for n, p in model.named_parameters()
            if any(p is q for m in model.modules() if isinstance(m, (DyT, ModulatedDyT)) for q in m.parameters())}


def test_dyt_parameter_names_on_a_converted_model():
    torch.manual_seed(0)
    model = convert_layernorm_to_dyt(CASES["bert"].build())
    names = dyt_parameter_names(model)
    assert names and set(names) == _held(model)
    assert {"embeddings.LayerNorm.alpha", "encoder.layer.0.output.LayerNorm.weight"} <= set(names)
    assert not any(n.endswith("query.weight") for n in names)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dyt_parameter_names([nn.Linear(2, 2)])


def test_trainer_decays_dyt_parameters_unless_told_not_to():
    """transformers' Trainer skips nn.LayerNorm instances and a few name patterns only: after conversion
    it would decay a GPT-2-style model's ln_1 / ln_f alpha and weight. The override in
    dyt_parameter_names' docstring leaves every DyT parameter undecayed and keeps the matrices."""
    transformers = pytest.importorskip("transformers")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_f = nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8)

    model = convert_layernorm_to_dyt(Block())
    decayed = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert {"ln_1.alpha", "ln_1.weight", "ln_f.alpha"} <= decayed     # why the override is needed
    skip = set(dyt_parameter_names(model))
    kept = {n for n in decayed if n not in skip}
    assert kept == {"attn.weight"}


def test_training_loop_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), DyT(8), nn.Linear(8, 8), ModulatedDyT(8, elementwise_affine=True))
    (one,) = param_groups(model, 0.0)
    assert one["weight_decay"] == 0.0 and len(one["params"]) == len(list(model.parameters()))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # AdamW then leaves alpha where the gradient alone moves it: with a zero gradient, unchanged
    opt = torch.optim.AdamW(param_groups(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = model[1].alpha.detach().clone(), model[0].weight.detach().clone()
    opt.step()
    assert torch.equal(model[1].alpha, before[0]) and not torch.equal(model[0].weight, before[1])
