"""Converted library models with their own gradient-checkpointing switch on, on the Triton backend.

timm's set_grad_checkpointing, diffusers' enable_gradient_checkpointing and transformers'
gradient_checkpointing_enable (activation_checkpointing_enable in recent releases, which can also
offload what each block saves to the host) rerun each block's forward inside backward (reentrant or
not, as each library chooses), with our kernels and, for diffusers, the fused adaLN forwards inside. The gradients
must be those of the same model without checkpointing: the recompute runs the same kernels on the same
inputs, so they agree to the bit, and a recompute that read a stale launch plan, a cached buffer or a
wrong saved tensor would show at once. A selective-checkpoint policy around the whole model is checked
the same way.
"""
from __future__ import annotations

import copy
import functools
import inspect
import warnings

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dyt_kernels import DyT, convert_layernorm_to_dyt, use_backend
from dyt_kernels.backend import INTERPRETER
from library_models import CASES, main_output, randomize_norms_

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="runs the kernels on CPU tensors through the Triton "
                                "interpreter (with a GPU the Triton backend refuses CPU tensors)")

FUSED = {"pixart", "dit", "flux"}


def _enable(name, model, offload=False):
    if name.startswith("timm"):
        model.set_grad_checkpointing(True)
    elif name in FUSED:
        model.enable_gradient_checkpointing()
    elif hasattr(model, "activation_checkpointing_enable"):   # the new name; the old one warns
        kwargs = {"offload": True} if offload else {}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": name == "bert"},
                                              **kwargs)
    else:
        assert not offload
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": name == "bert"})


def _model(name):
    case = CASES[name]
    torch.manual_seed(0)
    model = randomize_norms_(case.build(), case.channel_dims())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        convert_layernorm_to_dyt(model, include_rmsnorm=case.include_rmsnorm, fuse_modulation=name in FUSED)
    with torch.no_grad():   # distinct alphas, so a recompute that mixed up two DyTs would show
        for i, m in enumerate(m for m in model.modules() if isinstance(m, DyT)):
            m.alpha.fill_(0.4 + 0.1 * i)
    torch.manual_seed(1)
    return model.train(), case.inputs()


def _grads(model, inputs, run=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)   # the same random draws in each run (DiT's class-label dropout in train mode)
    with use_backend("triton"):
        out = main_output(run(**inputs) if run else model(**inputs))
        out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n


@pytest.mark.parametrize("name", ["timm_vit", "pixart", "dit", "flux", "llama", "bert"])
def test_library_gradient_checkpointing_gives_the_same_gradients(name):
    model, inputs = _model(name)
    if name == "bert":   # (dropout off: the recompute must see the same values)
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    plain = _grads(model, inputs)
    checkpointed = copy.deepcopy(model)
    _enable(name, checkpointed)
    _same(plain, _grads(checkpointed, inputs))


def test_transformers_offloaded_checkpointing_gives_the_same_gradients():
    """transformers' activation_checkpointing_enable(offload=True) runs each checkpointed block under
    save_on_cpu: saved-tensor hooks around the checkpoint, so our Functions' forwards run with hooks
    active (no backward slot: autograd._backward_slot) and the recompute under them. On a CPU the hooks
    keep the tensors themselves; on a GPU they copy them to the host and back dense, which
    test_saved_hooks checks on a CPU with hooks that do the same (clone, relayout)."""
    from transformers import PreTrainedModel
    if "offload" not in inspect.signature(getattr(PreTrainedModel, "activation_checkpointing_enable",
                                                  lambda self: None)).parameters:
        pytest.skip("this transformers has no activation offloading (activation_checkpointing_enable)")
    model, inputs = _model("llama")
    plain = _grads(model, inputs)
    checkpointed = copy.deepcopy(model)
    _enable("llama", checkpointed, offload=True)
    _same(plain, _grads(checkpointed, inputs))


@pytest.mark.parametrize("decision", [CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE])
def test_selective_checkpoint_of_a_fused_model(decision):
    model, inputs = _model("dit")
    context = functools.partial(create_selective_checkpoint_contexts, lambda ctx, op, *a, **k: decision)
    run = lambda **kw: checkpoint(model, use_reentrant=False, context_fn=context, **kw)  # noqa: E731
    # Under the checkpoint's dispatch mode the ops go through their custom ops, which launch the same
    # kernels (on a CPU too, under the interpreter: ops/library.py's _kernels): the same bits.
    _same(_grads(model, inputs), _grads(model, inputs, run))
