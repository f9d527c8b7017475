"""Tiny random models from timm, diffusers, transformers and torch, with inputs, for the converter's tests.

Each case says which norm classes it holds and which dim each normalizes (the test's own statement of
the truth, independent of the converter's probe), so a hand-built DyT copy can serve as the oracle.
Sizes are minimal (hidden 16-32, 1-2 layers) to keep CI fast on two cores.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

from helpers import FP32_EPS, max_abs


@dataclass
class Case:
    build: Callable[[], nn.Module]          # a fresh model (seeded by the caller)
    inputs: Callable[[], dict]              # keyword inputs for its forward
    channel_dims: dict                      # norm class -> dim it normalizes (-1 last, 1 NCHW channels)
    converted: dict                         # expected report.converted (class label -> count)
    include_rmsnorm: bool = False
    hf: bool = False                        # has save_pretrained / from_pretrained
    fused: dict = field(default_factory=dict)   # expected report.fused with fuse_modulation=True


def main_output(out):
    """The tensor a case's loss is taken from: the model output, or its sample / last hidden state."""
    for name in ("sample", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0] if isinstance(out, (tuple, list)) else out


def loss_and_grads(fn, inputs: dict, params_of: nn.Module):
    """(output, {name: gradient}) of mean(output^2), the gradients of params_of's parameters."""
    params_of.zero_grad(set_to_none=True)
    out = main_output(fn(**inputs))
    out.square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in params_of.named_parameters() if p.grad is not None}


def model_atol(ref64: torch.Tensor) -> float:
    """The three-way rule's atol for a whole model's fp32 output or gradient against float64. The tested and
    the naive fp32 runs do the same fp32 math but for the tanh form and the order of a few ops, so their
    errors against float64 are alike and the 2x factor carries the check; atol only covers the naive run
    being luckier at a few roundings: 64 fp32 eps of the largest value (8e-6 relative), far below what a
    wrong layout, affine or alpha gives (1e-2 and up)."""
    return 64 * FP32_EPS * max_abs(ref64)


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def _timm():
    return pytest.importorskip("timm")


def _diffusers():
    return pytest.importorskip("diffusers")


def _transformers():
    return pytest.importorskip("transformers")


def vit():
    return _timm().create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                                embed_dim=32, depth=1, num_heads=2, num_classes=4)


def convnext():
    # Stem patch 4 on 64x64 images: the first stage's maps are 16 wide with 16 channels, the case where
    # a channels-last DyT on an NCHW tensor runs without a shape error and is silently wrong.
    return _timm().create_model("convnext_atto", pretrained=False, dims=(16, 16, 16, 16), depths=(1, 1, 1, 1),
                                num_classes=4)


def pixart():
    return _diffusers().PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2, norm_type="ada_norm_single")


def flux():
    return _diffusers().FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4))


def dit():
    return _diffusers().DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10)


def sd3():
    return _diffusers().SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        qk_norm="rms_norm", dual_attention_layers=(0,))


def llama():
    tf = _transformers()
    return tf.LlamaModel(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=50))


def bert():
    tf = _transformers()
    return tf.BertModel(tf.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=50, max_position_embeddings=32))


def encoder():
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(32), enable_nested_tensor=False)


def _classes(*paths: str) -> dict:
    """'module:Class' -> Class, imported only when a case runs (its library may be missing)."""
    import importlib

    out = {}
    for path, dim in paths:
        module, name = path.split(":")
        out[getattr(importlib.import_module(module), name)] = dim
    return out


def _image(c=4, size=8):
    return lambda: {"hidden_states": torch.randn(2, c, size, size)}


CASES = {
    "timm_vit": Case(vit, lambda: {"x": torch.randn(2, 3, 16, 16)},
                     lambda: _classes(("timm.layers.norm:LayerNorm", -1)), {"timm.layers.norm.LayerNorm": 3}),
    "timm_convnext": Case(convnext, lambda: {"x": torch.randn(2, 3, 64, 64)},
                          lambda: _classes(("timm.layers.norm:LayerNorm2d", 1)), {"timm.layers.norm.LayerNorm2d": 9}),
    "pixart": Case(pixart, lambda: {**_image()(), "encoder_hidden_states": torch.randn(2, 5, 12),
                                    "timestep": torch.tensor([3, 700]),
                                    "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
                   lambda: _classes(("torch.nn:LayerNorm", -1)), {"LayerNorm": 3}, hf=True,
                   fused={"BasicTransformerBlock": 1}),
    "flux": Case(flux, lambda: {"hidden_states": torch.randn(2, 6, 4), "encoder_hidden_states": torch.randn(2, 3, 12),
                                "pooled_projections": torch.randn(2, 12), "timestep": torch.tensor([0.2, 0.9]),
                                "img_ids": torch.randn(6, 3), "txt_ids": torch.zeros(3, 3)},
                 lambda: _classes(("torch.nn:LayerNorm", -1), ("torch.nn:RMSNorm", -1)),
                 {"LayerNorm": 6, "RMSNorm": 6}, include_rmsnorm=True, hf=True,
                 fused={"AdaLayerNormContinuous": 1, "AdaLayerNormZero": 2, "AdaLayerNormZeroSingle": 1}),
    "dit": Case(dit, lambda: {**_image()(), "timestep": torch.tensor([3, 700]), "class_labels": torch.tensor([1, 7])},
                lambda: _classes(("torch.nn:LayerNorm", -1)), {"LayerNorm": 3}, hf=True,
                fused={"AdaLayerNormZero": 1, "BasicTransformerBlock": 1}),
    "sd3": Case(sd3, lambda: {**_image()(), "encoder_hidden_states": torch.randn(2, 5, 12),
                              "pooled_projections": torch.randn(2, 12), "timestep": torch.tensor([3.0, 700.0])},
                lambda: _classes(("torch.nn:LayerNorm", -1), ("diffusers.models.normalization:RMSNorm", -1)),
                {"LayerNorm": 8, "diffusers.models.normalization.RMSNorm": 10}, include_rmsnorm=True, hf=True,
                fused={"AdaLayerNormContinuous": 2, "AdaLayerNormZero": 2, "SD35AdaLayerNormZeroX": 1}),
    "llama": Case(llama, lambda: {"input_ids": torch.randint(0, 50, (2, 7))},
                  lambda: _classes(("transformers.models.llama.modeling_llama:LlamaRMSNorm", -1)),
                  {"transformers.models.llama.modeling_llama.LlamaRMSNorm": 3}, include_rmsnorm=True, hf=True),
    "bert": Case(bert, lambda: {"input_ids": torch.randint(0, 50, (2, 7)),
                                "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])},
                 lambda: _classes(("torch.nn:LayerNorm", -1)), {"LayerNorm": 3}, hf=True),
    "torch_encoder": Case(encoder, lambda: {"src": torch.randn(2, 7, 32)},
                          lambda: _classes(("torch.nn:LayerNorm", -1)), {"LayerNorm": 5}),
}


def dyt_formula(x, alpha, weight, bias, channel_dim=-1):
    """w * tanh(alpha * x) + b written out in plain PyTorch (float64 when given float64)."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    ch = lambda p: p if p.numel() == 1 else p.reshape(shape)  # noqa: E731
    y = torch.tanh(ch(alpha) * x)
    if weight is not None:
        y = y * ch(weight)
    if bias is not None:
        y = y + ch(bias)
    return y


def hand_built_dyt(model: nn.Module, channel_dims: dict, alpha_init_value: float = 0.5) -> nn.Module:
    """A copy of `model` whose norms (those of the classes in channel_dims, matched exactly) compute DyT by
    hand: each gets an `alpha` Parameter and a forward of w * tanh(alpha * x) + b over the dim channel_dims
    gives, with its own (copied) affine values. Parameter names then match the converted model's, so
    gradients compare by name."""
    hand = copy.deepcopy(model)
    for m in hand.modules():
        if type(m) not in channel_dims:
            continue
        dim = channel_dims[type(m)]
        p = next(iter(m.parameters()), None)
        m.register_parameter("alpha", nn.Parameter(torch.full(
            (1,), alpha_init_value, device=p.device if p is not None else None,
            dtype=p.dtype if p is not None else None)))

        def forward(x, m=m, dim=dim):
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if dim == 1:
                return dyt_formula(x, m.alpha, weight, bias, channel_dim=1)
            k = weight.dim() if weight is not None else len(getattr(m, "normalized_shape", (0,)))
            flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
            y = dyt_formula(x.reshape(*x.shape[:x.dim() - k], -1), m.alpha, flat(weight), flat(bias))
            return y.reshape(x.shape)

        m.forward = forward
    return hand


def randomize_(module: nn.Module, scale: float = 0.5) -> nn.Module:
    """Nonzero random values in every parameter (norm weights around 1), so copying shows."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0
            p.copy_(base + scale * torch.randn_like(p))
    return module


def randomize_norms_(model: nn.Module, classes, scale: float = 0.2) -> nn.Module:
    """Random affine values (weights around 1) in the norms, so copying them shows."""
    with torch.no_grad():
        for m in model.modules():
            if type(m) in classes:
                for name, p in m.named_parameters(recurse=False):
                    p.copy_((1.0 if name == "weight" else 0.0) + scale * torch.randn_like(p))
    return model
