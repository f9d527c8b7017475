"""Adversarial review of fuse_modulation (integrations/diffusers.py) and the norm recognizer (recognize.py).

Each test is an input that once gave a result different from the unfused conversion (or from what the
module computes), found by comparing fused and unfused forwards of tiny diffusers models in float64 on
the torch backend, or by probing norm classes the converter recognizes. docs/bad_inputs.md has a row
for each.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from dyt_kernels import DyT, convert_layernorm_to_dyt, use_backend
from library_models import CASES, main_output


def _fused_and_unfused(name: str):
    """A converted float64 model with random alphas and its fused copy."""
    pytest.importorskip("diffusers")
    from dyt_kernels.integrations.diffusers import fuse_modulation

    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        convert_layernorm_to_dyt(model, include_rmsnorm=case.include_rmsnorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DyT):
                m.alpha.uniform_(0.3, 1.5)
    model = model.double()
    fused = copy.deepcopy(model)
    assert fuse_modulation(fused)
    return model, fused


def _run_both(model, fused, inputs):
    inputs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    with use_backend("torch"), torch.no_grad():
        return main_output(model(**inputs)), main_output(fused(**inputs))


# --------------------------------------------------------------------------------------------------
# fuse_modulation
# --------------------------------------------------------------------------------------------------

def _image(batch=2):
    return torch.randn(batch, 4, 8, 8)


# A conditioning of batch one next to a batch of samples: diffusers broadcasts (1, D)[:, None] over
# the batch; dyt_modulate takes (B, D), (B, 1, D) or (B, L, D) only.
BATCH_ONE_CONDITIONING = {
    "dit": lambda: {"hidden_states": _image(), "timestep": torch.tensor([3]), "class_labels": torch.tensor([1])},
    "flux": lambda: {"hidden_states": torch.randn(2, 6, 4), "encoder_hidden_states": torch.randn(2, 3, 12),
                     "pooled_projections": torch.randn(1, 12), "timestep": torch.tensor([0.2]),
                     "img_ids": torch.randn(6, 3), "txt_ids": torch.zeros(3, 3)},
    "sd3": lambda: {"hidden_states": _image(), "encoder_hidden_states": torch.randn(2, 5, 12),
                    "pooled_projections": torch.randn(1, 12), "timestep": torch.tensor([3.0])},
}


@pytest.mark.parametrize("name", list(BATCH_ONE_CONDITIONING))
def test_fused_forward_broadcasts_a_conditioning_of_batch_one(name):
    model, fused = _fused_and_unfused(name)
    torch.manual_seed(1)
    out, out_fused = _run_both(model, fused, BATCH_ONE_CONDITIONING[name]())
    assert out.shape[0] == 2
    torch.testing.assert_close(out_fused, out, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# The recognizer
# --------------------------------------------------------------------------------------------------

class GatedRMSNorm(torch.nn.Module):
    """Mamba-2's gated RMSNorm (transformers' Mamba2RMSNormGated, Zamba2RMSNormGated, ... with one
    group): RMSNorm of x * silu(gate); with gate=None, a plain RMSNorm."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states, gate=None):
        if gate is not None:
            hidden_states = hidden_states * torch.nn.functional.silu(gate)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


def _gated_norms():
    yield GatedRMSNorm(16)
    try:
        from transformers.models.zamba2.modeling_zamba2 import Zamba2RMSNormGated
    except ImportError:
        return
    yield Zamba2RMSNormGated(16, group_size=16)


@pytest.mark.parametrize("norm", list(_gated_norms()), ids=lambda n: type(n).__name__)
def test_a_norm_whose_forward_takes_a_gate_is_left_alone(norm):
    """Probed with one input, a gated norm is a plain RMSNorm; the model calls it with the gate, which a
    DyT cannot take (every forward raised TypeError after converting a Zamba2 or FalconH1 model)."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = norm

        def forward(self, x, gate):
            return self.norm(x, gate)

    block = Block()
    x, gate = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    want = block(x, gate)
    with pytest.warns(UserWarning, match="gate"):
        convert_layernorm_to_dyt(block, include_rmsnorm=True)
    assert block.norm is norm
    torch.testing.assert_close(block(x, gate), want, rtol=0, atol=0)


class OffsetLayerNorm(torch.nn.Module):
    """A LayerNorm whose shift is a parameter named `offset` (zero at init), not `bias`."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.offset = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, (self.dim,), self.weight, None, self.eps) + self.offset


class SquaredGainRMSNorm(torch.nn.Module):
    """An RMSNorm scaled by weight ** 2 (one at init, where it equals weight)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight ** 2


class ZeroInitRMSNorm(SquaredGainRMSNorm):
    """A plain RMSNorm whose weight starts at zero (its output is zero, as a LayerNorm's would be)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__(dim, eps)
        torch.nn.init.zeros_(self.weight)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _perturbed(module):
    module = copy.deepcopy(module)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("cls,converts", [(OffsetLayerNorm, False), (SquaredGainRMSNorm, False),
                                          (ZeroInitRMSNorm, True)])
def test_recognition_does_not_depend_on_the_parameters_current_values(cls, converts):
    """At init, an offset of zero or a gain of one hides what a norm computes: OffsetLayerNorm became a
    DyT without its offset (a learnable shift gone from the model, silently), SquaredGainRMSNorm a DyT
    scaled by weight instead of weight ** 2, and a zero-initialized RMSNorm was left alone as ambiguous.
    The verdict must be the one the same module gets once its parameters have moved."""
    from dyt_kernels import conversion_report

    torch.manual_seed(0)
    norm = cls(16)
    report = conversion_report(torch.nn.Sequential(norm), include_rmsnorm=True)
    moved = conversion_report(torch.nn.Sequential(_perturbed(norm)), include_rmsnorm=True)
    assert bool(report.converted) == bool(moved.converted) == converts, (report, moved)
    if converts:   # the DyT holds the module's own weight, zeros
        model = convert_layernorm_to_dyt(torch.nn.Sequential(norm), include_rmsnorm=True)
        assert isinstance(model[0], DyT) and torch.equal(model[0].weight, torch.zeros(16))


@pytest.mark.parametrize("skip_ff", [True, False], ids=["whole-block", "attention-only"])
def test_fused_block_works_with_diffusers_hooks_that_look_blocks_up_by_class(skip_ff):
    """diffusers' LayerSkip (skip-layer guidance), FirstBlockCache and MagCache hooks find a block's
    metadata by its exact class: the fused BasicTransformerBlock raised "Model class ... not
    registered". It runs, with the unfused conversion's result; an unpickled fused model too."""
    pytest.importorskip("diffusers")
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    inputs = {"hidden_states": _image(), "encoder_hidden_states": torch.randn(2, 5, 12),
              "timestep": torch.tensor([3, 700]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    model, fused = _fused_and_unfused("pixart")
    unpickled = copy.deepcopy(fused)   # through __reduce_ex__ / __setstate__, as pickle does
    want = None
    for m in (model, fused, unpickled):
        apply_layer_skip(m, LayerSkipConfig(indices=[0], fqn="transformer_blocks", skip_attention=True,
                                            skip_ff=skip_ff))
        out = _run_both(m, m, inputs)[0]
        if want is None:
            want = out
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_an_unpickled_fused_block_registers_itself_with_diffusers_hooks(monkeypatch):
    pytest.importorskip("diffusers")
    from diffusers.hooks._helpers import TransformerBlockRegistry

    from dyt_kernels.integrations.diffusers import FusedBasicTransformerBlock

    _, fused = _fused_and_unfused("pixart")
    monkeypatch.delitem(TransformerBlockRegistry._registry, FusedBasicTransformerBlock, raising=False)
    copy.deepcopy(fused)   # a new process that unpickles a fused model has not called fuse_modulation
    assert TransformerBlockRegistry.get(FusedBasicTransformerBlock).return_hidden_states_index == 0


class DropoutLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm with dropout on its output (timm's LayerNormAct(apply_act=False, drop_layer=...))."""

    def __init__(self, dim):
        super().__init__(dim)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(super().forward(x))


def _dropout_norms():
    yield DropoutLayerNorm(16)
    try:
        import functools

        from timm.layers import LayerNormAct, LayerNormAct2d
    except ImportError:
        return
    drop = functools.partial(torch.nn.Dropout, 0.5)
    yield LayerNormAct(16, apply_act=False, drop_layer=drop)
    yield LayerNormAct2d(16, apply_act=False, drop_layer=drop)


@pytest.mark.parametrize("norm", list(_dropout_norms()), ids=lambda n: type(n).__name__)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_recognition_does_not_depend_on_train_or_eval_mode(norm, mode):
    """In eval mode a norm's dropout is the identity: the norm became a DyT, and training the converted
    model (from_pretrained models come in eval mode) went on without that dropout, silently. Converted
    in train mode, the same norm was left alone. The verdict must hold in both modes."""
    from dyt_kernels import conversion_report

    model = torch.nn.Sequential(copy.deepcopy(norm)).train(mode == "train")
    rng = torch.get_rng_state()
    report = conversion_report(model)
    assert not report.converted and list(report.left_alone) == ["0"], report
    assert model[0].training == (mode == "train")   # the probe leaves the module's mode alone
    assert torch.equal(torch.get_rng_state(), rng)   # and the global RNG, which the dropout draws from


def _hook_forward_hook(norm, seen):
    def hook(module, args, output):
        seen.append(1)
        return output * 2
    return norm.register_forward_hook(hook)


def _hook_wrapped_forward(norm, seen):
    """A forward replaced on the instance, as accelerate's offload hooks and diffusers' HookRegistry do."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Double(ModelHook):
        def post_forward(self, module, output):
            seen.append(1)
            return output * 2

    HookRegistry.check_if_exists_or_initialize(norm).register_hook(Double(), "double")


@pytest.mark.parametrize("name", ["pixart", "dit", "flux", "sd3"])
@pytest.mark.parametrize("install", [_hook_forward_hook, _hook_wrapped_forward], ids=["forward-hook", "wrapped-forward"])
def test_fused_forward_runs_what_calling_the_norm_runs(name, install):
    """A hook on a DyT (a feature-capture or steering hook; accelerate's and diffusers' offloading, which
    bring its parameters to the device in its forward) never ran: the fused forwards read the DyT's
    parameters without calling it. The output silently lacked what the hook does, and offloaded
    parameters stayed on the offload device. A norm with hooks takes the unfused path."""
    model, fused = _fused_and_unfused(name)
    counts = []
    for m in (model, fused):
        seen = []
        for norm in m.modules():
            if isinstance(norm, DyT):
                install(norm, seen)
        torch.manual_seed(1)
        out = _run_both(m, m, CASES[name].inputs())[0]
        counts.append(len(seen))
        if m is model:
            want = out
    assert counts[0] == counts[1] > 0
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
