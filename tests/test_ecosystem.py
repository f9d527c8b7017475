"""Converted (and fused) diffusers models inside the diffusers / peft / accelerate ecosystem.

Pipelines end to end with classifier-free guidance, accelerate's offloading and device maps, diffusers'
cache / offload hooks and gradient checkpointing, peft's LoRA and modules_to_save. Each is compared with
the unfused conversion (the fused forwards compute the same fp32 ops in the same order on the torch
backend, so the comparison is to the bit: README "fuse_modulation") and, where an oracle fits, with the
LayerNorm model whose norms compute DyT by hand in float64 (library_models.hand_built_dyt).

Tolerance against float64: helpers.assert_close_3way with factor 2 over the plain fp32 run (the hand-built
DyT in fp32, the same fp32 math as the converted model but for op order) plus 64 fp32 eps of the largest
value, as tests/test_convert.py derives it (a wrong alpha, affine or layout is off by 1e-2 and up).
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import dyt_kernels.integrations.diffusers as dd
from dyt_kernels import DyT, convert_layernorm_to_dyt, load_pretrained_dyt, use_backend
from dyt_kernels.backend import INTERPRETER
from helpers import FP32_EPS, assert_close_3way, max_abs
from library_models import model_atol, CASES, hand_built_dyt, main_output, randomize_norms_

diffusers = pytest.importorskip("diffusers")

ALPHA = 0.7   # not DyT's default 0.5, so an alpha that is not loaded shows


@pytest.fixture
def fused_calls(monkeypatch):
    """A list that grows by one per dyt_modulate call from a fused diffusers forward."""
    calls = []
    real = dd.dyt_modulate

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dd, "dyt_modulate", spy)
    return calls


def _quiet_convert(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return convert_layernorm_to_dyt(model, alpha_init_value=ALPHA, **kwargs)


def _dit_for_pipeline():
    # DiTPipeline's null class for guidance is 1000: the label table needs 1000 classes.
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)


def _pixart(num_layers=1):
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2, norm_type="ada_norm_single")


def _variants(name, build=None):
    """(hand fp32, hand float64, unfused, fused): a LayerNorm model with random norm affines, its hand-built
    DyT twins, and its conversions (alpha ALPHA everywhere)."""
    case = CASES[name]
    torch.manual_seed(0)
    classes = case.channel_dims()
    base = randomize_norms_((build or case.build)(), classes).eval()
    hand = hand_built_dyt(base, classes, alpha_init_value=ALPHA)
    unfused = _quiet_convert(copy.deepcopy(base), include_rmsnorm=case.include_rmsnorm)
    fused = _quiet_convert(copy.deepcopy(base), include_rmsnorm=case.include_rmsnorm, fuse_modulation=True)
    return hand, copy.deepcopy(hand).double(), unfused, fused


def _vae(latent_channels=4, dtype=torch.float32):
    torch.manual_seed(5)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
        use_quant_conv=latent_channels == 4, use_post_quant_conv=latent_channels == 4).eval()
    return vae if dtype == torch.float32 else vae.to(dtype)


def _run_pipeline(name, transformer, output_type):
    """A few denoising steps with classifier-free guidance (the transformer sees the doubled batch)."""
    dtype = transformer.dtype
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(2)
    if name == "dit":
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=_vae(dtype=dtype), scheduler=diffusers.DDIMScheduler())
        return pipe(class_labels=[1, 3], guidance_scale=4.0, num_inference_steps=3, generator=gen,
                    output_type=output_type).images
    if name == "pixart":
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(dtype=dtype),
                                             transformer=transformer,
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
        embeds, negative = torch.randn(2, 5, 12, dtype=dtype), torch.randn(2, 5, 12, dtype=dtype)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        return pipe(prompt=None, negative_prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative,
                    prompt_attention_mask=mask, negative_prompt_attention_mask=torch.ones(2, 5, dtype=torch.long),
                    guidance_scale=4.0, num_inference_steps=3, generator=gen, height=16, width=16,
                    use_resolution_binning=False, output_type=output_type).images
    # FLUX: true CFG (a separate negative pass), two images per prompt; latents packed 2x2 into 4 channels.
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                  vae=_vae(latent_channels=1, dtype=dtype), text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    embeds = {k: torch.randn(*shape, dtype=dtype) for k, shape in (
        ("prompt_embeds", (1, 3, 12)), ("pooled_prompt_embeds", (1, 12)),
        ("negative_prompt_embeds", (1, 3, 12)), ("negative_pooled_prompt_embeds", (1, 12)))}
    return pipe(**embeds, true_cfg_scale=3.0, num_inference_steps=3, height=16, width=16, generator=gen,
                num_images_per_prompt=2, output_type=output_type).images


# --------------------------------------------------------------------------------------------------
# 1. Pipelines end to end
# --------------------------------------------------------------------------------------------------

# DiTPipeline has no "latent" output: it always decodes.
PIPELINE_CASES = [("dit", "pt"), ("pixart", "pt"), ("pixart", "latent"), ("flux", "latent")]


@pytest.mark.parametrize("name,output_type", PIPELINE_CASES)
def test_pipeline_with_guidance_fused_equals_unfused_and_float64(name, output_type, fused_calls):
    build = _dit_for_pipeline if name == "dit" else None
    hand, hand64, unfused, fused = _variants(name, build)
    with torch.no_grad():
        out_unfused = _run_pipeline(name, unfused, output_type)
        fused_calls.clear()
        out_fused = _run_pipeline(name, fused, output_type)
        assert len(fused_calls) > 0   # the fused forwards ran, not the fallback
        naive = _run_pipeline(name, hand, output_type)
        ref = _run_pipeline(name, hand64, output_type)
    assert out_fused.dtype == torch.float32 and out_fused.shape[0] == 2
    if output_type == "pt":
        assert out_fused.shape[1] == 3 and out_fused.min() >= 0 and out_fused.max() <= 1
    torch.testing.assert_close(out_fused, out_unfused, rtol=0, atol=0)
    assert_close_3way(f"{name} pipeline", out_fused, ref, naive, model_atol(ref))


@pytest.mark.skipif(not INTERPRETER, reason="the Triton kernels on CPU tensors need the interpreter")
def test_dit_pipeline_on_the_triton_backend_matches_float64(fused_calls):
    """The kernels' fp32 tanh form is within 2 fp32 eps of tanh (helpers.TANH_F32_ABS_ERR), an error of the
    size of the fp32 roundings the 3-way bound already carries."""
    hand, hand64, _, fused = _variants("dit", _dit_for_pipeline)
    with torch.no_grad(), use_backend("triton"):
        out = _run_pipeline("dit", fused, "pt")
    assert len(fused_calls) > 0
    with torch.no_grad():
        naive, ref = _run_pipeline("dit", hand, "pt"), _run_pipeline("dit", hand64, "pt")
    assert_close_3way("dit pipeline, triton", out, ref, naive, model_atol(ref))


# --------------------------------------------------------------------------------------------------
# 2. accelerate
# --------------------------------------------------------------------------------------------------

def _inputs(name):
    torch.manual_seed(1)
    return CASES[name].inputs()


def _forward(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def _disk_map(model, accelerate):
    """A device map that sends half of the model to disk (the CPU is the main device here)."""
    size = accelerate.utils.compute_module_sizes(model)[""]
    return accelerate.infer_auto_device_map(model, max_memory={"cpu": size // 2, "disk": 10 ** 9},
                                            no_split_module_classes=model._no_split_modules)


@pytest.mark.parametrize("name", ["pixart", "dit"])
@pytest.mark.parametrize("how", ["cpu_offload", "dispatch_with_disk"])
def test_accelerate_offloaded_fused_model_equals_unfused(name, how, tmp_path):
    """accelerate replaces every parametrized module's forward with one that loads its weights: the DyTs
    take the unfused path, and the result is the unfused conversion's."""
    accelerate = pytest.importorskip("accelerate")
    _, _, unfused, fused = _variants(name)
    inputs = _inputs(name)
    want = _forward(unfused, inputs)
    if how == "cpu_offload":
        accelerate.cpu_offload(fused, execution_device="cpu")
    else:
        accelerate.dispatch_model(fused, device_map=_disk_map(fused, accelerate), offload_dir=str(tmp_path),
                                  main_device="cpu")
    assert any(p.device.type == "meta" for p in fused.parameters())   # really offloaded
    torch.testing.assert_close(_forward(fused, inputs), want, rtol=0, atol=0)


def test_infer_auto_device_map_keeps_a_fused_block_whole():
    accelerate = pytest.importorskip("accelerate")
    _, _, unfused, fused = _variants("pixart")
    want, got = _disk_map(unfused, accelerate), _disk_map(fused, accelerate)
    assert not any(k.startswith("transformer_blocks.0.") for k in want)   # the unfused block stays whole
    assert got == want


@pytest.mark.parametrize("name", ["pixart", "dit"])
@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto"], ids=["cpu", "auto"])
def test_init_empty_weights_then_load_checkpoint_and_dispatch(name, device_map, tmp_path, fused_calls):
    """Deferred init: build under init_empty_weights, convert (fused) on meta, then let accelerate load the
    converted model's safetensors. The alphas load, and the fused path runs."""
    accelerate = pytest.importorskip("accelerate")
    _, _, unfused, fused = _variants(name)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, DyT):
                m.alpha.uniform_(0.3, 1.5)
    inputs = _inputs(name)
    want = _forward(fused, inputs)
    fused.save_pretrained(tmp_path)
    with accelerate.init_empty_weights():
        empty = CASES[name].build()
    _quiet_convert(empty, fuse_modulation=True)
    assert all(p.device.type == "meta" for p in empty.parameters())
    model = accelerate.load_checkpoint_and_dispatch(
        empty, os.path.join(tmp_path, "diffusion_pytorch_model.safetensors"), device_map=device_map,
        no_split_module_classes=empty._no_split_modules).eval()
    fused_calls.clear()
    torch.testing.assert_close(_forward(model, inputs), want, rtol=0, atol=0)
    assert len(fused_calls) == 2


def _offload_then_convert(name, accelerate, tmp_path, how):
    hand, _, _, _ = _variants(name)
    torch.manual_seed(0)
    base = randomize_norms_(CASES[name].build(), CASES[name].channel_dims()).eval()
    if how == "cpu_offload":
        accelerate.cpu_offload(base, execution_device="cpu")
    else:
        accelerate.dispatch_model(base, device_map=_disk_map(base, accelerate), offload_dir=str(tmp_path),
                                  main_device="cpu")
    return hand, base


@pytest.mark.parametrize("name", ["pixart", "dit"])
@pytest.mark.parametrize("how", ["cpu_offload", "dispatch_with_disk"])
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_converting_an_accelerate_offloaded_model_is_refused_or_right(name, how, fuse, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    hand, model = _offload_then_convert(name, accelerate, tmp_path, how)
    inputs = _inputs(name)
    want = _forward(hand, inputs)
    try:
        _quiet_convert(model, fuse_modulation=fuse)
    except ValueError as err:   # refused by name: fine
        assert "offload" in str(err) or "dispatch" in str(err), err
        return
    torch.testing.assert_close(_forward(model, inputs), want, rtol=0, atol=model_atol(want))


@pytest.mark.parametrize("name", ["pixart", "dit"])
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_load_pretrained_dyt_with_an_offloading_device_map(name, fuse, tmp_path):
    pytest.importorskip("accelerate")
    _, _, unfused, _ = _variants(name)
    with torch.no_grad():
        for m in unfused.modules():
            if isinstance(m, DyT):
                m.alpha.uniform_(0.3, 1.5)
    inputs = _inputs(name)
    want = _forward(unfused, inputs)
    unfused.save_pretrained(tmp_path / "model")
    device_map = {n: "disk" if n == "transformer_blocks" else "cpu" for n, _ in unfused.named_children()}
    device_map.update({n: "cpu" for n, _ in unfused.named_parameters(recurse=False)})
    kwargs = dict(device_map=device_map, offload_folder=str(tmp_path / "offload"))
    # The LayerNorm model itself loads and runs with this map (diffusers' own path works).
    plain = type(unfused).from_pretrained(tmp_path / "model", **kwargs).eval()
    assert _forward(plain, inputs).isfinite().all()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_pretrained_dyt(type(unfused), str(tmp_path / "model"), fuse_modulation=fuse, **kwargs).eval()
    except ValueError as err:   # refused by name: fine
        assert "device_map" in str(err), err
        return
    torch.testing.assert_close(_forward(model, inputs), want, rtol=0, atol=0)


def _remove_accelerate_hooks(model):
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)


def _remove_diffusers_hooks(model):
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            for hook in list(registry.hooks):
                registry.remove_hook(hook, recurse=False)


@pytest.mark.parametrize("how", ["accelerate", "diffusers"])
def test_fused_path_runs_again_once_offload_hooks_are_removed(how, fused_calls):
    pytest.importorskip("accelerate")
    from diffusers.hooks.group_offloading import apply_group_offloading

    _, _, unfused, fused = _variants("pixart")
    inputs = _inputs("pixart")
    want = _forward(unfused, inputs)
    if how == "accelerate":
        import accelerate

        accelerate.cpu_offload(fused, execution_device="cpu")
        _remove_accelerate_hooks(fused)
    else:
        apply_group_offloading(fused, onload_device="cpu", offload_type="leaf_level")
        _remove_diffusers_hooks(fused)
    fused_calls.clear()
    torch.testing.assert_close(_forward(fused, inputs), want, rtol=0, atol=0)
    assert len(fused_calls) == 2


# --------------------------------------------------------------------------------------------------
# 3. diffusers hooks and gradient checkpointing
# --------------------------------------------------------------------------------------------------

class _Clock:
    t = None


def _cfg_loop(model, steps=4):
    """A DDIM loop with classifier-free guidance on a PixArt transformer, under a cache context (what a
    pipeline with CacheMixin sets), with the current timestep published for the hooks."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    scheduler = diffusers.DDIMScheduler()
    scheduler.set_timesteps(steps)
    torch.manual_seed(2)
    x, text = torch.randn(1, 4, 8, 8), torch.randn(2, 5, 12)
    with torch.no_grad():
        for t in scheduler.timesteps:
            _Clock.t = int(t)
            _set_cache_context(model, CacheContext("cfg"))
            out = model(torch.cat([x, x]), encoder_hidden_states=text, timestep=t.expand(2),
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            uncond, cond = out[:, :4].chunk(2)
            x = scheduler.step(uncond + 4 * (cond - uncond), t, x).prev_sample
    return x


def _first_block_cache(model):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.5))


def _pyramid_attention_broadcast(model):
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1000),
        current_timestep_callback=lambda: _Clock.t))


def _faster_cache(model):
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    apply_faster_cache(model, FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: _Clock.t, tensor_format="BCHW", is_guidance_distilled=False,
        attention_weight_callback=lambda _: 0.5))


def _group_offload(offload_type):
    def apply(model):
        from diffusers.hooks.group_offloading import apply_group_offloading

        kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        apply_group_offloading(model, onload_device="cpu", offload_type=offload_type, **kwargs)
    return apply


# hook, whether it changes the result (caches skip work), whether the fused path still runs under it
DIFFUSERS_HOOKS = {
    "first_block_cache": (_first_block_cache, True, True),
    "pyramid_attention_broadcast": (_pyramid_attention_broadcast, True, True),
    "faster_cache": (_faster_cache, True, True),
    "group_offload_block": (_group_offload("block_level"), False, True),
    "group_offload_leaf": (_group_offload("leaf_level"), False, False),   # hooks on the DyTs: unfused path
}


@pytest.mark.parametrize("hook", list(DIFFUSERS_HOOKS))
def test_diffusers_hooks_on_a_fused_pixart(hook, fused_calls):
    apply, changes, fuses = DIFFUSERS_HOOKS[hook]
    build = lambda: _pixart(num_layers=2)  # noqa: E731  (FirstBlockCache needs a head and a tail block)
    _, _, unfused, fused = _variants("pixart", build)
    plain = _cfg_loop(copy.deepcopy(unfused))
    apply(unfused)
    apply(fused)
    want = _cfg_loop(unfused)
    fused_calls.clear()
    got = _cfg_loop(fused)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (len(fused_calls) > 0) == fuses
    assert (not torch.equal(want, plain)) == changes   # the hook did take effect


@pytest.mark.parametrize("name", ["pixart", "dit"])
def test_gradient_checkpointing_trains_a_fused_model_like_the_unfused(name, fused_calls):
    """enable_gradient_checkpointing runs the fused blocks under torch.utils.checkpoint (the forward twice);
    two SGD steps give the unfused conversion's parameters, to fp32 rounding of the gradients."""
    _, _, unfused, fused = _variants(name)
    inputs = _inputs(name)
    results = []
    for model in (unfused, fused):
        model.train().enable_gradient_checkpointing()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            torch.manual_seed(9)   # DiT's label dropout draws in train mode
            main_output(model(**inputs)).square().mean().backward()
            opt.step()
        results.append(dict(model.named_parameters()))
    assert len(fused_calls) == 2 * 2 * 2   # two steps, forward and recompute, two fused modules
    assert results[0].keys() == results[1].keys()
    for n, p in results[1].items():
        q = results[0][n]
        torch.testing.assert_close(p, q, rtol=0, atol=64 * FP32_EPS * max(1.0, max_abs(q)), msg=n)


def test_set_attention_backend_on_a_fused_model(fused_calls):
    _, _, unfused, fused = _variants("pixart")
    inputs = _inputs("pixart")
    want = _forward(unfused, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused.set_attention_backend("native")
    torch.testing.assert_close(_forward(fused, inputs), want, rtol=0, atol=0)
    assert len(fused_calls) == 2


# --------------------------------------------------------------------------------------------------
# 4. peft
# --------------------------------------------------------------------------------------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "linear"]
# modules_to_save: a DyT the fused block reads (it becomes peft's wrapper: that block takes the unfused
# path), and DiT's AdaLayerNormZero (the wrapper's copy is the fused class and still fuses).
MODULES_TO_SAVE = {("pixart", "dyt"): ["transformer_blocks.0.norm2"],
                   ("dit", "dyt"): ["transformer_blocks.0.norm3"],
                   ("dit", "adanorm"): ["transformer_blocks.0.norm1"]}


def _lora(model, modules_to_save):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS,
                                                  init_lora_weights=False, modules_to_save=modules_to_save))
    with torch.no_grad():   # the saved copies move away from the originals, so using the wrong one shows
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    return peft_model


@pytest.mark.parametrize("name,save", [("pixart", None), ("pixart", "dyt"), ("dit", None), ("dit", "dyt"),
                                       ("dit", "adanorm")])
def test_peft_lora_train_step_and_merge(name, save, fused_calls):
    pytest.importorskip("peft")
    _, _, unfused, fused = _variants(name)
    inputs = _inputs(name)
    modules_to_save = MODULES_TO_SAVE.get((name, save))
    runs = []
    for model in (unfused, fused):
        peft_model = _lora(model, modules_to_save)
        opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
        fused_calls.clear()
        main_output(peft_model(**inputs)).square().mean().backward()
        calls = len(fused_calls)
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
        opt.step()
        before_merge = _forward(peft_model, inputs)
        merged = peft_model.merge_and_unload()
        fused_calls.clear()
        runs.append((calls, grads, before_merge, _forward(merged, inputs), len(fused_calls), merged))
    (_, g0, b0, m0, _, merged0), (calls, g1, b1, m1, merged_calls, merged1) = runs
    # A wrapped DyT: its module takes the unfused path (PixArt's block: 0 calls; DiT's block, whose
    # fused AdaLayerNormZero still fuses: 1); a wrapped AdaLayerNormZero's copy is the fused class: 2.
    assert calls == {None: 2, "dyt": 0 if name == "pixart" else 1, "adanorm": 2}[save]
    assert merged_calls == 2   # merge_and_unload puts the trained modules back: fully fused again
    assert g0.keys() == g1.keys() and any("lora_A" in n for n in g0)
    assert (modules_to_save is None) or any("modules_to_save" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0, msg=n)
    torch.testing.assert_close(b1, b0, rtol=0, atol=0)
    torch.testing.assert_close(m1, m0, rtol=0, atol=0)
    # Merging folds B @ A into the weights: fp32 rounding of one matmul per layer.
    torch.testing.assert_close(m1, b1, rtol=0, atol=model_atol(b1) + 1e-6)
    assert type(merged1.transformer_blocks[0]) is dd.FusedBasicTransformerBlock
    assert type(merged0.transformer_blocks[0]).__name__ == "BasicTransformerBlock"


def test_peft_lora_targeting_a_dyt_is_refused_by_peft():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    _, _, _, fused = _variants("dit")
    with pytest.raises(ValueError, match="DyT.*is not supported"):
        get_peft_model(fused, LoraConfig(target_modules=["norm3"]))


def test_peft_adapter_with_a_saved_dyt_round_trips(tmp_path, fused_calls):
    """save_pretrained of a LoRA adapter whose modules_to_save is a DyT, loaded onto a freshly loaded fused
    model (load_pretrained_dyt): the trained DyT copy and the LoRA weights come back."""
    pytest.importorskip("peft")
    from peft import PeftModel

    _, _, _, fused = _variants("pixart")
    fused.save_pretrained(tmp_path / "base")
    peft_model = _lora(fused, MODULES_TO_SAVE[("pixart", "dyt")])
    inputs = _inputs("pixart")
    want = _forward(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_pretrained_dyt(type(fused), str(tmp_path / "base"), fuse_modulation=True).eval()
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    # What comes back is every tensor, bit for bit; the forward then agrees to fp32 rounding only: the
    # CPU's sgemm picks its kernel by a buffer's address (seen: one nn.Linear, equal weights and input,
    # 1 ulp apart as the weight sat at another offset), and the loaded model's buffers are new ones.
    saved, back = peft_model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    for k in saved:
        assert torch.equal(saved[k], back[k]) and saved[k].dtype == back[k].dtype, k
    torch.testing.assert_close(_forward(loaded, inputs), want, rtol=0, atol=model_atol(want))
    wrapped = loaded.base_model.model.transformer_blocks[0].norm2
    assert isinstance(wrapped.original_module, DyT)
    with loaded.disable_adapter():   # the base model, fused again
        fused_calls.clear()
        torch.testing.assert_close(_forward(loaded, inputs), _forward(base, inputs), rtol=0, atol=0)


def test_diffusers_add_adapter_save_and_load_lora_adapter(tmp_path, fused_calls):
    """diffusers' own LoRA API (PeftAdapterMixin: FLUX has it, PixArt and DiT do not), LoRA on the attention
    projections and on the AdaLayerNorm* linears of a fused FLUX."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    _, _, unfused, fused = _variants("flux")
    fresh = copy.deepcopy(fused)
    inputs = _inputs("flux")
    outs = []
    for model in (unfused, fused):
        torch.manual_seed(3)
        model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
        outs.append(_forward(model, inputs))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    fused.save_lora_adapter(tmp_path)
    fresh.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", prefix=None,
                            adapter_name="default")
    fused_calls.clear()
    torch.testing.assert_close(_forward(fresh, inputs), outs[1], rtol=0, atol=0)
    assert len(fused_calls) == 4   # FLUX: two AdaLayerNormZero, one ...ZeroSingle, one ...Continuous
