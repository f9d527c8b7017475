"""Converted models inside the timm and transformers ecosystems: what their own tooling does with them.

timm: every norm class of timm.layers (converted to the formula it computes, or left alone and named),
features_only / forward_intermediates, NHWC (channels_last memory format) ConvNeXt on both backends,
ModelEmaV3, reset_classifier, load_checkpoint / resume_checkpoint. transformers: Trainer with the
documented decay override, sharded save_pretrained + load_pretrained_dyt, dtypes through
load_pretrained_dyt, resize_token_embeddings, a text-generation pipeline with a tokenizer built in code,
and the norms of T5, GPT-2, Gemma, Qwen2, Mistral, ViT, CLIP, Whisper and Mamba-2.

The oracle is library_models.hand_built_dyt (or dyt_formula for one module) in float64; a converted
fp32 output is held to the three-way rule (helpers.assert_close_3way): at most twice the error of the
same hand-built copy run in fp32, plus 64 fp32 eps of the largest value. Both runs do the same fp32 math
but for the tanh form and the order of a few ops, so the factor carries the check; the atol only covers
the naive run being luckier at a few roundings (8e-6 relative), far below what a wrong layout, affine or
alpha gives (1e-2 and up).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from dyt_kernels import DyT, conversion_report, convert_layernorm_to_dyt, dyt_parameter_names, load_pretrained_dyt, use_backend
from dyt_kernels.backend import INTERPRETER
from helpers import assert_close_3way
from library_models import model_atol, cast_inputs, dyt_formula, hand_built_dyt, main_output, randomize_norms_

timm = pytest.importorskip("timm")
tf = pytest.importorskip("transformers")

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETER, reason="the Triton backend on CPU tensors needs the interpreter"))]


def _convert_recording(model, **kwargs):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model = convert_layernorm_to_dyt(model, **kwargs)
    return model, "\n".join(str(w.message) for w in said)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _set_alphas_(model, start=0.4, step=0.1):
    """Distinct alphas, so a checkpoint or EMA that mixed two DyTs up, or kept the init, would show."""
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, DyT)):
            m.alpha.fill_(start + step * i)
    return model


def _alphas(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("alpha")}


# --------------------------------------------------------------------------------------------------
# timm's norm classes, one at a time: the DyT computes w * tanh(alpha x) + b over the dim the class
# normalizes (written here, not read from the converter), or the class is left alone and named.
# --------------------------------------------------------------------------------------------------

def _timm_norms():
    n, na = timm.layers.norm, timm.layers.norm_act
    C = 6
    return {  # name: (module, dim it normalizes if DyT can replace it, else None)
        "LayerNorm": (n.LayerNorm(C), -1), "LayerNormFp32": (n.LayerNormFp32(C), -1),
        "LayerNorm2d": (n.LayerNorm2d(C), 1), "LayerNorm2dFp32": (n.LayerNorm2dFp32(C), 1),
        "LayerNormExp2d": (n.LayerNormExp2d(C), 1),
        "RmsNorm": (n.RmsNorm(C), -1), "RmsNormFp32": (n.RmsNormFp32(C), -1),
        "RmsNorm2d": (n.RmsNorm2d(C), 1), "RmsNorm2dFp32": (n.RmsNorm2dFp32(C), 1),
        "LayerNormAct-no-act": (na.LayerNormAct(C, apply_act=False), -1),
        "LayerNormAct2d-no-act": (na.LayerNormAct2d(C, apply_act=False), 1),
        "LayerNormAct2dFp32-no-act": (na.LayerNormAct2dFp32(C, apply_act=False), 1),
        # x / std(x) (unbiased variance, not centred): neither LayerNorm nor RMSNorm
        "SimpleNorm": (n.SimpleNorm(C), None), "SimpleNorm2d": (n.SimpleNorm2d(C), None),
        "LayerNormAct-relu": (na.LayerNormAct(C), None), "GroupNorm1": (n.GroupNorm1(C), None),
    }


TIMM_NORMS = ["LayerNorm", "LayerNormFp32", "LayerNorm2d", "LayerNorm2dFp32", "LayerNormExp2d", "RmsNorm",
              "RmsNormFp32", "RmsNorm2d", "RmsNorm2dFp32", "LayerNormAct-no-act", "LayerNormAct2d-no-act",
              "LayerNormAct2dFp32-no-act", "SimpleNorm", "SimpleNorm2d", "LayerNormAct-relu", "GroupNorm1"]


def _check_single_norm(label, norm, dim, backend):
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.copy_((1.0 if name == "weight" else 0.0) + 0.3 * torch.randn_like(p))
    weight, bias = [getattr(norm, a, None) for a in ("weight", "bias")]
    weight, bias = [None if t is None else t.detach().clone() for t in (weight, bias)]
    model, said = _convert_recording(nn.Sequential(norm), include_rmsnorm=True)
    if dim is None:
        assert model[0] is norm, f"{label}: converted, but it is not a LayerNorm / RMSNorm"
        assert "0: " in said and type(norm).__name__ in said, f"{label}: left alone without a word: {said!r}"
        return
    dyt = model[0]
    assert isinstance(dyt, DyT) and dyt.channels_last == (dim == -1), label
    assert (dyt.bias is None) == (bias is None), label
    x = torch.randn(2, 6, 5, 5) if dim == 1 else torch.randn(2, 5, 6)
    if dim == 1:   # NHWC storage of the NCHW tensor too, as a channels_last ConvNeXt hands it over
        x = x.contiguous(memory_format=torch.channels_last)
    alpha = torch.tensor([0.5])
    ref = dyt_formula(x.double(), alpha.double(), weight.double(), None if bias is None else bias.double(), dim)
    naive = dyt_formula(x, alpha, weight, bias, dim)
    with use_backend(backend):
        out = model(x)
    assert_close_3way(label, out, ref, naive, model_atol(ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TIMM_NORMS)
def test_timm_norm_class_converts_to_its_formula_or_is_named(name, backend):
    if backend == "triton" and _timm_norms()[name][1] is None:
        pytest.skip("left alone: nothing runs on a backend")
    _check_single_norm(name, *_timm_norms()[name], backend)


@pytest.mark.parametrize("cls,apply_act", [("RmsNormAct", False), ("RmsNormAct2d", False),
                                           ("RmsNormAct", True), ("RmsNormAct2d", True)])
def test_timm_rmsnorm_with_act_children_is_converted_or_named(cls, apply_act):
    norm = getattr(timm.layers.norm_act, cls)(6, apply_act=apply_act)
    _check_single_norm(f"{cls}(apply_act={apply_act})", norm, None if apply_act else (1 if cls.endswith("2d") else -1),
                       "torch")


# --------------------------------------------------------------------------------------------------
# timm models: feature extraction, NHWC inputs, EMA, heads, timm's checkpoint helpers.
# --------------------------------------------------------------------------------------------------

def _vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=4, **kw)


def _convnext(**kw):
    return timm.create_model("convnext_atto", pretrained=False, dims=(16, 16, 16, 16), depths=(1, 1, 1, 1),
                             num_classes=4, **kw)


def _swin(**kw):
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                             window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=4, **kw)


TIMM_MODELS = {  # builder, input shape, norm class -> the dim it normalizes
    "vit": (_vit, (2, 3, 16, 16), lambda: {timm.layers.norm.LayerNorm: -1}),
    "convnext": (_convnext, (2, 3, 32, 32), lambda: {timm.layers.norm.LayerNorm2d: 1}),
    "swin": (_swin, (2, 3, 32, 32), lambda: {nn.LayerNorm: -1}),
}


def _timm_case(name, **kw):
    build, shape, dims = TIMM_MODELS[name]
    torch.manual_seed(0)
    model = randomize_norms_(build(**kw).eval(), dims())
    hand, hand64 = hand_built_dyt(model, dims()), hand_built_dyt(model, dims()).double()
    model, said = _convert_recording(model)
    assert not said, said
    assert not any(type(m) in dims() for m in model.modules()), "a norm survived"
    return model, hand, hand64, torch.randn(shape)


def _three_way_all(label, outs, naives, refs):
    outs, naives, refs = [list(t) if isinstance(t, (list, tuple)) else [t] for t in (outs, naives, refs)]
    assert len(outs) == len(refs) == len(naives) > 0, label
    for i, (o, n, r) in enumerate(zip(outs, naives, refs)):
        assert_close_3way(f"{label}[{i}]", o, r, n, model_atol(r))


@pytest.mark.parametrize("name", ["vit", "convnext", "swin"])
def test_timm_features_only_model_matches_float64(name):
    """features_only=True (FeatureListNet for ConvNeXt and Swin, FeatureGetterNet for ViT), then convert."""
    model, hand, hand64, x = _timm_case(name, features_only=True, out_indices=(0, 1))
    assert type(model).__name__ in ("FeatureListNet", "FeatureGetterNet")
    _three_way_all(f"{name} features", model(x), hand(x), hand64(x.double()))


@pytest.mark.parametrize("name", ["vit", "convnext", "swin"])
def test_timm_forward_intermediates_matches_float64(name):
    model, hand, hand64, x = _timm_case(name)
    run = lambda m, t: m.forward_intermediates(t, indices=2)  # noqa: E731  (final output, intermediates)
    (out, inter), (naive, naive_inter), (ref, ref_inter) = run(model, x), run(hand, x), run(hand64, x.double())
    _three_way_all(f"{name} final", out, naive, ref)
    _three_way_all(f"{name} intermediates", inter, naive_inter, ref_inter)


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_convnext_in_channels_last_memory_format(backend):
    """model.to(memory_format=torch.channels_last) and an NHWC-stored input: the channels-first DyTs
    read NCHW tensors whose channels are the innermost stride; forward and every gradient to float64."""
    model, hand, hand64, x = _timm_case("convnext")
    model = model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with use_backend(backend):
        out = model(xc)
        out.square().mean().backward()
    naive = hand(x)
    naive.square().mean().backward()
    ref = hand64(x.double())
    ref.square().mean().backward()
    assert_close_3way("convnext NHWC output", out, ref, naive, model_atol(ref))
    hand_p, ref_p = dict(hand.named_parameters()), dict(hand64.named_parameters())
    for n, p in model.named_parameters():
        if n.endswith(("alpha", "norm.weight", "norm.bias")):
            assert_close_3way(f"d {n}", p.grad, ref_p[n].grad, hand_p[n].grad, model_atol(ref_p[n].grad))


def test_timm_model_ema_v3_of_a_converted_model():
    """ModelEmaV3 deep-copies the converted model and lerps every parameter, alphas included."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = _set_alphas_(convert_layernorm_to_dyt(_vit()), start=0.5, step=0.0)
    ema = ModelEmaV3(model, decay=0.75)
    assert all(isinstance(ema.module.get_submodule(n), DyT) for n, m in model.named_modules() if isinstance(m, DyT))
    _set_alphas_(model, start=1.5, step=0.0)
    ema.update(model, step=1000)   # no warmup: decay 0.75
    for n, a in _alphas(ema.module).items():
        # 0.75 * 0.5 + 0.25 * 1.5 = 0.75, exact in fp32 (lerp of binary fractions)
        assert torch.equal(a, torch.full_like(a, 0.75)), n
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(ema.module(x)).all()


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_timm_reset_classifier_keeps_the_dyts(name):
    model, _, _, x = _timm_case(name)
    dyts = sum(isinstance(m, DyT) for m in model.modules())
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert sum(isinstance(m, DyT) for m in model.modules()) == dyts
    if name == "convnext":   # the head's LayerNorm2d (after pooling, (N, C, 1, 1)) is a channels-first DyT
        assert isinstance(model.head.norm, DyT) and not model.head.norm.channels_last


def test_timm_load_checkpoint_and_resume_with_a_converted_checkpoint(tmp_path):
    from timm.models import load_checkpoint, resume_checkpoint

    torch.manual_seed(0)
    src = _set_alphas_(convert_layernorm_to_dyt(_vit()))
    path = os.path.join(tmp_path, "checkpoint.pth.tar")
    dst = convert_layernorm_to_dyt(_vit())
    opt = torch.optim.AdamW(dst.parameters())
    torch.save({"state_dict": src.state_dict(), "state_dict_ema": src.state_dict(), "optimizer": opt.state_dict(),
                "epoch": 3}, path)
    load_checkpoint(dst, path, strict=True, use_ema=True)
    assert _alphas(dst).keys() == _alphas(src).keys()
    assert all(torch.equal(a, _alphas(src)[n]) for n, a in _alphas(dst).items())
    fresh = convert_layernorm_to_dyt(_vit())
    assert _quiet(resume_checkpoint, fresh, path, optimizer=torch.optim.AdamW(fresh.parameters())) == 3
    assert all(torch.equal(a, _alphas(src)[n]) for n, a in _alphas(fresh).items())
    # a LayerNorm model cannot take it strictly: timm's own loader names the alphas
    with pytest.raises(RuntimeError, match="norm1.alpha"):
        load_checkpoint(_vit(), path, strict=True)


# --------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------

def _gpt2(head=True):
    config = tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32, bos_token_id=2,
                           eos_token_id=2, pad_token_id=0)
    return (tf.GPT2LMHeadModel if head else tf.GPT2Model)(config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_two_steps_with_the_documented_decay_override(backend, tmp_path):
    torch.manual_seed(0)
    model = convert_layernorm_to_dyt(_gpt2())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    class DyTTrainer(tf.Trainer):   # dyt_parameter_names' docstring
        def get_decay_parameter_names(self, model):
            skip = set(dyt_parameter_names(model))
            return [n for n in super().get_decay_parameter_names(model) if n not in skip]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                learning_rate=1e-2, weight_decay=0.5, use_cpu=True, report_to=[],
                                save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True)
    trainer = DyTTrainer(model=model, args=args, train_dataset=Data())
    with use_backend(backend):
        _quiet(trainer.train)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in trainer.optimizer.param_groups}
    dyt_names = set(dyt_parameter_names(model))
    assert len(dyt_names) == 9 and dyt_names <= groups[0.0] and not dyt_names & groups[0.5]
    assert "transformer.h.0.attn.c_attn.weight" in groups[0.5]
    for n in dyt_names:   # two Adam steps of lr 1e-2 move every DyT parameter with a gradient
        assert not torch.equal(model.get_parameter(n), before[n]), n


def test_sharded_save_pretrained_round_trips_through_load_pretrained_dyt(tmp_path):
    torch.manual_seed(0)
    model = _set_alphas_(convert_layernorm_to_dyt(_gpt2())).eval()
    model.save_pretrained(tmp_path, max_shard_size="2KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = _quiet_hf(load_pretrained_dyt, tf.GPT2LMHeadModel, str(tmp_path))
    assert sum(isinstance(m, DyT) for m in loaded.modules()) == 3
    assert all(torch.equal(a, _alphas(model)[n]) for n, a in _alphas(loaded).items())
    ids = torch.randint(0, 50, (2, 5))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def _quiet_hf(fn, *args, **kwargs):
    """transformers' loading logs (its load report lists the alphas as unexpected) are not warnings."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


@pytest.mark.parametrize("saved,asked,want", [(torch.float32, torch.bfloat16, torch.bfloat16),
                                              (torch.float32, "auto", torch.float32),
                                              (torch.bfloat16, "auto", torch.bfloat16)])
def test_load_pretrained_dyt_dtypes(saved, asked, want, tmp_path):
    torch.manual_seed(0)
    model = _set_alphas_(convert_layernorm_to_dyt(_gpt2())).to(saved).eval()
    model.save_pretrained(tmp_path)
    loaded = _quiet_hf(load_pretrained_dyt, tf.GPT2LMHeadModel, str(tmp_path), dtype=asked)
    dyts = [m for m in loaded.modules() if isinstance(m, DyT)]
    assert len(dyts) == 3 and all(p.dtype == want for m in dyts for p in m.parameters())
    for n, a in _alphas(loaded).items():   # the saved alpha, rounded once to the dtype asked for
        assert torch.equal(a, _alphas(model)[n].to(want)), n
    assert loaded(torch.randint(0, 50, (1, 4))).logits.dtype == want


def test_resize_token_embeddings_after_conversion():
    torch.manual_seed(0)
    model = _set_alphas_(convert_layernorm_to_dyt(_gpt2())).eval()
    alphas = _alphas(model)
    model.resize_token_embeddings(60, mean_resizing=False)
    assert model(torch.randint(0, 60, (2, 5))).logits.shape == (2, 5, 60)
    assert sum(isinstance(m, DyT) for m in model.modules()) == 3
    assert all(torch.equal(a, alphas[n]) for n, a in _alphas(model).items())


def _word_level_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(47)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_generation_pipeline_with_a_converted_model(backend):
    tokenizer = _word_level_tokenizer()
    torch.manual_seed(0)
    model = randomize_norms_(_gpt2().eval(), {nn.LayerNorm})
    hand = hand_built_dyt(model, {nn.LayerNorm: -1})
    model = _set_alphas_(convert_layernorm_to_dyt(model), start=0.8)
    _set_alphas_hand_(hand, start=0.8)
    pipe = tf.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    with use_backend(backend):
        got = _quiet_hf(pipe, "w1 w2 w3", max_new_tokens=4, do_sample=False, return_tensors=True)
        text = _quiet_hf(pipe, "w1 w2 w3", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    want_ids = _quiet_hf(hand.generate, ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert want_ids.shape[1] == ids.shape[1] + 4
    # greedy tokens of the hand-built fp32 model (argmax over logits that agree to ~1e-6: a tie would need
    # two of 50 random logits within that)
    assert list(got[0]["generated_token_ids"]) == want_ids[0].tolist()
    assert text == "w1 w2 w3" + tokenizer.decode(want_ids[0, ids.shape[1]:])


def _set_alphas_hand_(hand, start=0.4, step=0.1):
    """hand_built_dyt's alphas, set as _set_alphas_ sets a converted model's (same module order)."""
    with torch.no_grad():
        for i, a in enumerate(p for n, p in hand.named_parameters() if n.endswith("alpha")):
            a.fill_(start + step * i)


def _ids():
    return {"input_ids": torch.randint(0, 50, (2, 6))}


def _pixels():
    return {"pixel_values": torch.randn(2, 3, 16, 16)}


_LM = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
           vocab_size=50)


def _hf_models():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.mamba2 import modeling_mamba2
    from transformers.models.mamba2.modeling_mamba2 import Mamba2RMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    whisper = tf.WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                               max_source_positions=8, max_target_positions=8, vocab_size=50, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    # the gated norm's class: MambaRMSNormGated up to transformers 5.24, Mamba2RMSNormGated from 5.25
    gated = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
    mamba2 = tf.Mamba2Config(hidden_size=16, state_size=4, num_hidden_layers=1, vocab_size=50, expand=2,
                             conv_kernel=2, num_heads=4, head_dim=8, n_groups=1)
    # name: (build, inputs, converted classes -> dim, classes left alone, expected conversion count)
    return {
        "t5": (lambda: tf.T5EncoderModel(tf.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                                     vocab_size=50)), _ids, {T5LayerNorm: -1}, (), 3),
        "gpt2": (lambda: _gpt2(head=False), _ids, {nn.LayerNorm: -1}, (), 3),
        "gemma": (lambda: tf.GemmaModel(tf.GemmaConfig(head_dim=8, **_LM)), _ids, {}, (GemmaRMSNorm,), 0),
        "qwen2": (lambda: tf.Qwen2Model(tf.Qwen2Config(**_LM)), _ids, {Qwen2RMSNorm: -1}, (), 3),
        "mistral": (lambda: tf.MistralModel(tf.MistralConfig(**_LM)), _ids, {MistralRMSNorm: -1}, (), 3),
        "vit": (lambda: tf.ViTModel(tf.ViTConfig(**vision)), _pixels, {nn.LayerNorm: -1}, (), 3),
        "clip_vision": (lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**vision)), _pixels, {nn.LayerNorm: -1}, (), 4),
        "whisper_encoder": (lambda: tf.WhisperModel(whisper).get_encoder(),
                            lambda: {"input_features": torch.randn(2, 8, 16)}, {nn.LayerNorm: -1}, (), 3),
        "mamba2": (lambda: tf.Mamba2Model(mamba2), _ids, {Mamba2RMSNorm: -1}, (gated,), 2),
    }


@pytest.mark.parametrize("name", ["t5", "gpt2", "gemma", "qwen2", "mistral", "vit", "clip_vision",
                                  "whisper_encoder", "mamba2"])
def test_transformers_architecture_norms_convert_right_or_are_named(name):
    build, inputs, dims, left, count = _hf_models()[name]
    torch.manual_seed(0)
    model = _quiet_hf(build).eval()
    randomize_norms_(model, set(dims) | set(left))
    hand, hand64 = hand_built_dyt(model, dims), hand_built_dyt(model, dims).double()
    model, said = _convert_recording(model, include_rmsnorm=True)
    dyts = [m for m in model.modules() if isinstance(m, DyT)]
    assert len(dyts) == count and not any(type(m) in dims for m in model.modules())
    for cls in left:   # left alone, every instance, each named in the warning
        kept = [n for n, m in model.named_modules() if type(m) is cls]
        assert kept and all(f"{n}: " in said for n in kept), said
    x = inputs()
    out, naive = main_output(_quiet_hf(model, **x)), main_output(hand(**x))
    ref = main_output(hand64(**cast_inputs(x, torch.float64)))
    assert_close_3way(f"{name} output", out, ref, naive, model_atol(ref))


def _vit_model():
    return tf.ViTModel(tf.ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=16, patch_size=8))


def _timm_wrapper():
    config = tf.TimmWrapperConfig(architecture="convnext_atto", num_labels=4,
                                  model_args={"dims": (16, 16, 16, 16), "depths": (1, 1, 1, 1)})
    return tf.TimmWrapperForImageClassification(config)


@pytest.mark.parametrize("name", [
    "vit",
    "timm_wrapper"])
def test_save_pretrained_then_load_pretrained_dyt_for_renamed_checkpoint_formats(name, tmp_path):
    """Models whose saved key names differ from their module names (transformers' conversion mapping):
    ViTModel, and timm's models inside transformers (TimmWrapperForImageClassification)."""
    build, cls = {"vit": (_vit_model, tf.ViTModel), "timm_wrapper": (_timm_wrapper,
                                                                      tf.TimmWrapperForImageClassification)}[name]
    torch.manual_seed(0)
    model = _set_alphas_(convert_layernorm_to_dyt(build())).eval()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        loaded = _quiet_hf(load_pretrained_dyt, cls, str(tmp_path)).eval()
    dropped = [str(w.message) for w in said if "DROPPED" in str(w.message)]
    assert not dropped, dropped
    assert sum(isinstance(m, DyT) for m in loaded.modules()) == sum(isinstance(m, DyT) for m in model.modules())
    assert _alphas(loaded).keys() == _alphas(model).keys()
    assert all(torch.equal(a, _alphas(model)[n]) for n, a in _alphas(loaded).items())
    x = torch.randn(2, 3, 16, 16) if name == "vit" else torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x)[0], model(x)[0])   # ViTModel: last_hidden_state; the classifier: logits


def test_conversion_report_lists_every_timm_and_hf_norm_it_leaves_alone():
    """One dry run over a mix: what stays is named, what converts is counted by class."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = nn.ModuleDict({"simple": timm.layers.norm.SimpleNorm(8), "gemma": GemmaRMSNorm(8),
                           "ln2d": timm.layers.norm.LayerNorm2d(8), "rms": timm.layers.norm.RmsNorm(8)})
    report = conversion_report(model, include_rmsnorm=True)
    assert set(report.left_alone) == {"simple", "gemma"}
    assert dict(report.converted) == {"timm.layers.norm.LayerNorm2d": 1, "timm.layers.norm.RmsNorm": 1}
