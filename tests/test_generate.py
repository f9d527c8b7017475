"""A converted transformers decoder generating with its KV cache: prompts of (B, L, D), then one token at a
time, (B, 1, D) per step, through the signature cache, on both backends, with a left-padded batch.

fp32: the greedy tokens and every step's logits of the hand-built DyT model (library_models.hand_built_dyt,
the formula in plain PyTorch). bf16: both backends pick the same tokens.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dyt_kernels import DyT, convert_layernorm_to_dyt, use_backend
from dyt_kernels.backend import INTERPRETER
from helpers import FP32_EPS, max_abs
from library_models import hand_built_dyt, randomize_norms_

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="runs the kernels on CPU tensors through the interpreter")


def _models():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, vocab_size=50)).eval()
    classes = {tf.models.llama.modeling_llama.LlamaRMSNorm: -1}
    randomize_norms_(model, classes)
    hand = hand_built_dyt(model, classes)
    convert_layernorm_to_dyt(model, include_rmsnorm=True)
    ours = [m for m in model.modules() if isinstance(m, DyT)]
    theirs = [m for m in hand.modules() if isinstance(getattr(m, "alpha", None), torch.nn.Parameter)]
    assert len(ours) == len(theirs) == 5
    with torch.no_grad():   # distinct alphas: a step that read another norm's would show
        for i, (m, h) in enumerate(zip(ours, theirs)):
            m.alpha.fill_(0.3 + 0.2 * i)
            h.alpha.fill_(0.3 + 0.2 * i)
    return model, hand


def _generate(model, backend):
    torch.manual_seed(1)
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])   # left padding
    with use_backend(backend):
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def test_greedy_generation_with_a_kv_cache():
    model, hand = _models()
    want = _generate(hand, "torch")
    for backend in ("triton", "torch"):
        got = _generate(model, backend)
        assert torch.equal(got.sequences, want.sequences), backend
        for step, (g, w) in enumerate(zip(got.logits, want.logits)):
            # the same fp32 math but for the tanh form (within 2 fp32 eps) and op order, carried through two
            # layers: 64 fp32 eps of the largest logit is far above that and far below a wrong alpha's effect
            torch.testing.assert_close(g, w, rtol=0, atol=64 * FP32_EPS * max_abs(w), msg=f"{backend} step {step}")
    bf16 = copy.deepcopy(model).bfloat16()
    assert torch.equal(_generate(bf16, "triton").sequences, _generate(bf16, "torch").sequences)
