"""Export, serialization and model-building review: torch.export round trips through a fresh process,
ONNX, TorchScript, pickling and copying, deferred (meta-device) initialization, AOTInductor.

On CPU the compiled routes are forced the way a CUDA tensor takes them (test_dynamic_shapes._force: the
custom ops compute with reference.py there). "kernels" below is use_backend("triton") with the Triton
interpreter: the eager path a CUDA tensor takes by default.

Tolerances: every model here is fp32 with O(1) activations. Pointwise DyT / adaLN outputs are a few
(<= 6) fp32 roundings of values below ~10 in magnitude: 6 * 2^-24 * 10 ~ 4e-6, so 1e-5 (TOL). Whole models
(Linear sums over <= 64 terms, attention) are held to float64 three-way: the error against float64 may
be at most twice eager fp32's own error plus 1e-6 (a few ulps of O(1) outputs, for op reordering).
"""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import library_models as LM
from dyt_kernels import DyT, ModulatedDyT, convert_layernorm_to_dyt, load_dyt_state_dict, use_backend
from float64_checks import dyt_formula, modulate_formula
from test_dynamic_shapes import _force

TOL = dict(atol=1e-5, rtol=1e-5)
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


class _Small(nn.Module):
    """Every op and layout the custom ops take: DyT, adaLN with a gated residual, channels-first DyT
    with a per-channel alpha."""

    def __init__(self, D=8, C=4):
        super().__init__()
        self.norm = DyT(D)
        self.mod = ModulatedDyT(D, elementwise_affine=True)
        self.conv_norm = DyT(C, channels_last=False, alpha_per_channel=True)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn_like(p))

    def forward(self, x, shift, scale, res, gate, img):
        h, r = self.mod(self.norm(x), shift, scale, residual=res, gate=gate)
        return h + r, self.conv_norm(img)


def _small_args(B=2, L=3, D=8, C=4):
    return (torch.randn(B, L, D), torch.randn(B, D), torch.randn(B, D), torch.randn(B, L, D), torch.randn(B, D),
            torch.randn(B, C, 3, 5))


def _small_float64(m: _Small, args):
    x, shift, scale, res, gate, img = (a.double() for a in args)
    p = {k: v.detach().double() for k, v in m.named_parameters()}
    n = dyt_formula(x, p["norm.alpha"], p["norm.weight"], p["norm.bias"])
    h, r = modulate_formula(n, p["mod.alpha"], shift, scale, p["mod.weight"], p["mod.bias"], res, gate)
    img_out = dyt_formula(img, p["conv_norm.alpha"], p["conv_norm.weight"], p["conv_norm.bias"], channels_last=False)
    return h + r, img_out


def _fresh_python(code: str, timeout: int = 240) -> tuple[str, str]:
    """Run `code` in a new interpreter (nothing of this process's imports or registrations); its
    stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=TESTS)
    assert done.returncode == 0, f"fresh process failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout, done.stderr


class _Main(nn.Module):
    """A library model whose forward takes keyword inputs and returns its main output tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return LM.main_output(self.model(**inputs))


def _converted(name: str, fuse: bool) -> tuple[nn.Module, dict]:
    case = LM.CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_layernorm_to_dyt(model, include_rmsnorm=case.include_rmsnorm, fuse_modulation=fuse)
    LM.randomize_(model, 0.2)
    return model, case.inputs()


def _three_way(got: torch.Tensor, model: nn.Module, inputs: dict) -> None:
    """got within 2x eager fp32's error against float64, plus 1e-6 (module docstring)."""
    with torch.no_grad(), use_backend("torch"):
        eager = LM.main_output(model(**inputs))
        m64 = copy.deepcopy(model).double()
        want = LM.main_output(m64(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                     for k, v in inputs.items()}))
    eager_err = (eager.double() - want).abs().max().item()
    err = (got.detach().double() - want).abs().max().item()
    assert err <= 2 * eager_err + 1e-6, f"max|got - float64| = {err:.3e}, eager fp32's {eager_err:.3e}"


# --------------------------------------------------------------------------------------------------
# torch.export: save, then load and run in a fresh process
# --------------------------------------------------------------------------------------------------

def test_exported_programs_load_and_run_in_a_fresh_process(tmp_path, monkeypatch):
    """torch.export (strict and not, and after run_decompositions) of DyT / ModulatedDyT / channels-first
    DyT, a converted timm ViT and a converted diffusers DiT with its modulation fused, on the plain-ops
    route and the custom-op route, saved with torch.export.save. A fresh process loads each: a program
    with the custom ops needs `import dyt_kernels` first (torch refuses it, logging a SerializeError
    that names the op and says to import it), a
    plain-ops one does not; then each runs to float64 (the small model) or to the eager model's
    float64 error (the library models)."""
    torch.manual_seed(0)
    small, args = _Small().eval(), _small_args()
    files = {}
    for route in ("torch", "opaque"):
        backend = _force(route, monkeypatch)
        for strict in (False, True):
            with use_backend(backend):
                ep = torch.export.export(small, args, strict=strict)
            custom = {str(n.target) for n in ep.graph.nodes if "dyt_kernels" in str(n.target)}
            assert bool(custom) == (route == "opaque"), custom
            for decomposed in (False, True):
                prog = ep.run_decompositions() if decomposed else ep
                for got, want in zip(prog.module()(*args), _small_float64(small, args)):
                    torch.testing.assert_close(got.double(), want, **TOL)
                path = str(tmp_path / f"small-{route}-{strict}-{decomposed}.pt2")
                torch.export.save(prog, path)
                files[path] = route == "opaque"
    torch.save({"args": args, "want": _small_float64(small, args)}, tmp_path / "small.pt")

    library = {}
    for name, fuse, route, strict in [("timm_vit", False, "opaque", False), ("dit", True, "opaque", True),
                                      ("dit", True, "torch", False)]:
        backend = _force(route, monkeypatch)
        model, inputs = _converted(name, fuse)
        with use_backend(backend):
            ep = torch.export.export(_Main(model), (), inputs, strict=strict)
        got = ep.module()(**inputs)
        _three_way(got, model, inputs)
        path = str(tmp_path / f"{name}-{route}-{strict}.pt2")
        torch.export.save(ep, path)
        library[path] = (route == "opaque", inputs, got.detach())
    torch.save({p: (inp, got) for p, (_, inp, got) in library.items()}, tmp_path / "library.pt")

    out, err = _fresh_python(f"""
        import sys, torch
        needs = {dict(files, **{p: v[0] for p, v in library.items()})!r}
        loaded = {{}}
        for path, custom in needs.items():           # before dyt_kernels is imported
            try:
                loaded[path] = torch.export.load(path)
                print("loaded-without-import", path, custom)
            except Exception as e:
                assert custom, (path, e)
                print("refused-without-import", path)
        import dyt_kernels  # noqa: F401
        small = torch.load({str(tmp_path / "small.pt")!r})
        library = torch.load({str(tmp_path / "library.pt")!r}, weights_only=False)
        for path in needs:
            ep = loaded.get(path) or torch.export.load(path)
            if path in library:
                inputs, want = library[path]
                err = (ep.module()(**inputs) - want).abs().max().item()
                assert err <= 1e-6, (path, err)     # the same program on the same inputs
            else:
                for got, want in zip(ep.module()(*small["args"]), small["want"]):
                    torch.testing.assert_close(got.double(), want, atol={TOL['atol']}, rtol={TOL['rtol']})
            print("ran", path)
    """)
    for path, custom in {**files, **{p: v[0] for p, v in library.items()}}.items():
        assert f"ran {path}" in out
        assert (f"loaded-without-import {path}" in out) == (not custom), out
        assert (f"refused-without-import {path}" in out) == custom, out
    # torch's RuntimeError says "check the warnings above"; the logged SerializeError names the op
    assert "torch.ops.dyt_kernels.dyt_fwd.default" in err and "import the custom op" in err


def test_whole_converted_models_pickle_and_load_in_a_fresh_process(tmp_path):
    """torch.save of whole converted models (a fused PixArt-alpha, a timm ConvNeXt with channels-first
    DyTs, a DiT), then torch.load(weights_only=False) in a fresh process without importing dyt_kernels
    by hand: the same outputs to the bit. copy.deepcopy and pickle round trips too."""
    saved = {}
    for name, fuse in [("pixart", True), ("timm_convnext", False), ("dit", True)]:
        model, inputs = _converted(name, fuse)
        with torch.no_grad():
            want = LM.main_output(model(**inputs))
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            with torch.no_grad():
                assert torch.equal(LM.main_output(clone(**inputs)), want), name
        path = str(tmp_path / f"{name}.pt")
        torch.save({"model": model, "inputs": inputs, "want": want}, path)
        saved[path] = name
    out, _ = _fresh_python(f"""
        import torch
        from library_models import main_output
        for path in {list(saved)!r}:
            d = torch.load(path, weights_only=False)
            with torch.no_grad():
                assert torch.equal(main_output(d["model"](**d["inputs"])), d["want"]), path
            print("same", path)
    """)
    assert all(f"same {p}" in out for p in saved), out


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------

def _onnx_run(path, args):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(path)
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})


@pytest.mark.parametrize("route", ["torch", "fused", "opaque"])
def test_onnx_dynamo_export_matches_float64(route, tmp_path, monkeypatch):
    """torch.onnx.export(dynamo=True) of DyT, ModulatedDyT and a channels-first DyT; onnxruntime's
    outputs to float64. The default routes (plain ops on CPU, the fused route a CUDA tensor takes)
    export; under use_backend("triton") (DYT_KERNELS_BACKEND=triton) the graph holds the custom ops."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    backend = _force(route, monkeypatch)
    torch.manual_seed(0)
    small, args = _Small().eval(), _small_args()
    path = str(tmp_path / "small.onnx")
    with use_backend(backend), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(small, args, path, dynamo=True, verbose=False)
    for got, want in zip(_onnx_run(path, args), _small_float64(small, args)):
        torch.testing.assert_close(torch.from_numpy(got).double(), want, **TOL)


# --------------------------------------------------------------------------------------------------
# TorchScript
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_jit_trace_saves_and_matches_float64(backend, tmp_path):
    """torch.jit.trace of DyT / ModulatedDyT / channels-first DyT, as nn.LayerNorm traces: the traced
    module runs new inputs to float64, and torch.jit.save / torch.jit.load round-trip it."""
    torch.manual_seed(0)
    small = _Small().eval()
    with use_backend("triton" if backend == "kernels" else "torch"), torch.no_grad():
        traced = torch.jit.trace(small, _small_args())
        path = str(tmp_path / "traced.pt")
        torch.jit.save(traced, path)
        loaded = torch.jit.load(path)
        args = _small_args()
        for module in (traced, loaded):
            for got, want in zip(module(*args), _small_float64(small, args)):
                torch.testing.assert_close(got.double(), want, **TOL)


def test_legacy_onnx_export_on_the_kernel_route(tmp_path):
    """torch.onnx.export(dynamo=False) where the eager call takes the kernels (a CUDA tensor's default):
    onnxruntime's outputs to float64. On the plain-ops route it exports (checked here too)."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    small, args = _Small().eval(), _small_args()
    for backend in ("torch", "triton"):
        path = str(tmp_path / f"{backend}.onnx")
        with use_backend(backend), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(small, args, path, dynamo=False)
        for got, want in zip(_onnx_run(path, args), _small_float64(small, args)):
            torch.testing.assert_close(torch.from_numpy(got).double(), want, **TOL)


def test_jit_script_runs_in_python():
    """torch.jit.script(DyT) runs in Python (the formula in torch ops: DyT.__prepare_scriptable__)."""
    torch.manual_seed(0)
    norm = DyT(8)
    nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 8)
    want = dyt_formula(x.double(), norm.alpha.double(), norm.weight.double(), norm.bias.double())
    torch.testing.assert_close(torch.jit.script(norm)(x).double(), want, **TOL)


def test_jit_script_saves(tmp_path):
    norm = torch.jit.script(DyT(8))
    torch.jit.save(norm, str(tmp_path / "scripted.pt"))
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "scripted.pt"))(x), torch.tanh(0.5 * x), **TOL)


# --------------------------------------------------------------------------------------------------
# Copying, dtypes, layouts, parametrizations, functional calls, ensembles
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_copies_dtypes_layouts_and_functional_calls(backend):
    """deepcopy and pickle after a call (the eager signature cache must not travel), .half() /
    .bfloat16(), .to(memory_format=channels_last), a parametrization of DyT.weight, functional_call
    with swapped parameters (the module's own untouched), stack_module_state + vmap over an ensemble:
    each against float64 of the parameters it should use."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    f64 = lambda x, a, w, b: dyt_formula(*(t.detach().double() for t in (x, a, w, b)))  # noqa: E731
    with use_backend(backend):
        norm = DyT(8)
        nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
        norm(x)
        for clone in (copy.deepcopy(norm), pickle.loads(pickle.dumps(norm))):
            with torch.no_grad():
                clone.weight.mul_(-2)
            torch.testing.assert_close(clone(x).double(), f64(x, clone.alpha, clone.weight, clone.bias), **TOL)
            torch.testing.assert_close(norm(x).double(), f64(x, norm.alpha, norm.weight, norm.bias), **TOL)

        for dtype, eps in ((torch.float16, 2.0 ** -11), (torch.bfloat16, 2.0 ** -8)):
            low = copy.deepcopy(norm).to(dtype)
            y = low(x.to(dtype))
            assert y.dtype == dtype and low.alpha.dtype == dtype
            want = f64(x.to(dtype), low.alpha, low.weight, low.bias)
            # the output's own rounding (eps * |y|) plus the kernels' tanh forms and w*t + b in fp32 (< eps * |w|)
            assert (y.double() - want).abs().max() <= 2 * eps * (want.abs().max() + low.weight.double().abs().max())

        conv = DyT(4, channels_last=False, alpha_per_channel=True).to(memory_format=torch.channels_last)
        img = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
        y = conv(img)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.double(), dyt_formula(img.double(), conv.alpha.double(), conv.weight.double(),
                                                           conv.bias.double(), channels_last=False), **TOL)

        par = copy.deepcopy(norm)
        nn.utils.parametrize.register_parametrization(par, "weight", _Square())
        original = par.parametrizations.weight.original
        y = par(x)
        torch.testing.assert_close(y.double(), f64(x, par.alpha, original * original, par.bias), **TOL)
        y.sum().backward()
        # d/dw0 of sum(w0^2 * t + b) = 2 * w0 * sum_rows(t): fp32 sums over 10 rows
        t64 = torch.tanh(par.alpha.double() * x.double()).reshape(-1, 8).sum(0)
        torch.testing.assert_close(original.grad.double(), 2 * original.double().detach() * t64, **TOL)

        swapped = {"alpha": torch.tensor([0.9]), "weight": torch.randn(8), "bias": torch.randn(8)}
        y = torch.func.functional_call(norm, swapped, (x,))
        torch.testing.assert_close(y.double(), f64(x, swapped["alpha"], swapped["weight"], swapped["bias"]), **TOL)
        assert norm.alpha.item() == 0.5

        mod = ModulatedDyT(8, elementwise_affine=True)
        shift, scale = torch.randn(2, 8), torch.randn(2, 8)
        h = torch.func.functional_call(mod, swapped, (x, shift, scale))
        want, _ = modulate_formula(x.double(), swapped["alpha"].double(), shift.double(), scale.double(),
                                   swapped["weight"].double(), swapped["bias"].double())
        torch.testing.assert_close(h.double(), want, **TOL)

        members = [DyT(8, alpha_init_value=0.3 * (i + 1)) for i in range(3)]
        for m in members:
            nn.init.normal_(m.weight)
        params, buffers = torch.func.stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")
        y = torch.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))(
            params, buffers, x)
        want = torch.stack([f64(x, m.alpha, m.weight, m.bias) for m in members])
        torch.testing.assert_close(y.double(), want, **TOL)


class _Square(nn.Module):
    def forward(self, w):
        return w * w


def test_meta_built_modules_initialize_after_to_empty():
    """Deferred init: DyT and ModulatedDyT built under torch.device("meta"), to_empty(device="cpu"),
    then each module's reset_parameters: the constructor's starts (alpha_init_value, weight_init_value,
    zero bias); a LayerNorm model built on meta converts, and its DyT initializes the same way."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), DyT(8, alpha_init_value=0.7, weight_init_value=2.0),
                              ModulatedDyT(8, elementwise_affine=True, alpha_init_value=0.3), nn.LayerNorm(8))
    convert_layernorm_to_dyt(model, alpha_init_value=0.2)
    assert isinstance(model[3], DyT) and model[3].alpha.is_meta
    model.to_empty(device="cpu")
    for m in model:
        m.reset_parameters()
    assert model[1].alpha.tolist() == [pytest.approx(0.7)] and model[1].weight.eq(2).all() and model[1].bias.eq(0).all()
    assert model[2].alpha.tolist() == [pytest.approx(0.3)] and model[2].weight.eq(1).all() and model[2].bias.eq(0).all()
    assert model[3].alpha.tolist() == [pytest.approx(0.2)] and model[3].weight.eq(1).all()


@pytest.mark.parametrize("name", ["timm_vit", "timm_convnext"])
def test_load_dyt_state_dict_into_a_model_built_on_meta(name):
    """A DyT checkpoint into a model built under torch.device("meta") (deferred init: accelerate's
    init_empty_weights, from_pretrained's low-memory path) with assign=True, as torch's own
    load_state_dict takes it. Before: load_dyt_state_dict had no assign (TypeError), and without it
    timm's LayerNorm / LayerNorm2d on meta were left alone (the converter cannot probe a meta module),
    so the strict load failed with "Unexpected key(s) ... norm1.alpha"; a plain load left every
    tensor on meta. Now the norms convert (probed on a CPU stand-in) and the model equals the
    checkpoint's to the bit."""
    source, inputs = _converted(name, False)
    state = source.state_dict()
    with torch.no_grad():
        want = LM.main_output(source(**inputs))
    with torch.device("meta"):
        model = LM.CASES[name].build().eval()
    model = load_dyt_state_dict(model, state, assign=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(p.requires_grad for p in model.parameters())
    assert sum(isinstance(m, DyT) for m in model.modules()) == sum(isinstance(m, DyT) for m in source.modules())
    with torch.no_grad():
        assert torch.equal(LM.main_output(model(**inputs)), want)


# --------------------------------------------------------------------------------------------------
# AOTInductor
# --------------------------------------------------------------------------------------------------

def test_aoti_package_on_cpu(tmp_path, monkeypatch):
    """torch._inductor.aoti_compile_and_package of an exported program holding the custom ops (the
    route use_backend("triton") takes), then aoti_load_package: float64's outputs."""
    pytest.importorskip("torch._inductor")
    backend = _force("opaque", monkeypatch)
    torch.manual_seed(0)
    small, args = _Small().eval(), _small_args()
    with use_backend(backend):
        ep = torch.export.export(small, args)
    try:
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "small.pt2"))
    except Exception as e:  # noqa: BLE001 - a machine without a working C++ toolchain
        if "compiler" in str(e).lower() or "cpp" in str(e).lower():
            pytest.skip(f"AOTInductor cannot compile here: {e}")
        raise
    loaded = torch._inductor.aoti_load_package(path)
    for got, want in zip(loaded(*args), _small_float64(small, args)):
        torch.testing.assert_close(got.double(), want, **TOL)


def _scripted_cases(dtype):
    torch.manual_seed(0)
    per_channel = DyT(8, alpha_per_channel=True)
    channels_first = DyT(6, channels_last=False, bias=False)
    modulated = ModulatedDyT(8, elementwise_affine=True)
    for m in (per_channel, channels_first, modulated):
        for p in m.parameters():
            nn.init.uniform_(p, 0.3, 1.5)
    x, mod = torch.randn(2, 3, 8, dtype=dtype), lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    return [(per_channel, (x,)), (DyT((4, 8)), (torch.randn(2, 4, 8, dtype=dtype),)),
            (channels_first, (torch.randn(2, 6, 5, 3, dtype=dtype),)),
            (modulated, (x, mod(2, 8), mod(2, 1, 8))),
            (modulated, (x, mod(2, 8), mod(2, 3, 8), torch.randn(2, 3, 8), mod(2, 8))),
            (modulated, (x, mod(2, 8), mod(2, 3, 8), torch.randn(2, 3, 8, dtype=torch.float64), mod(2, 8)))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scripted_modules_save_load_and_equal_eager(dtype, tmp_path):
    """torch.jit.script compiles DyT's and ModulatedDyT's __prepare_scriptable__ twins (the formula in
    torch ops over the same parameters): saved and loaded, they give the torch backend's eager results to
    the bit (same fp32 math, same dtypes: h in x's, r in the residual's), per-channel alpha, several
    normalized dims, channels-first, per-sample and per-token modulations, fp32 and float64 residuals."""
    for i, (module, args) in enumerate(_scripted_cases(dtype)):
        scripted = torch.jit.script(module)
        path = str(tmp_path / f"{i}.pt")
        torch.jit.save(scripted, path)
        with use_backend("torch"):
            want = module(*args)
        want = want if isinstance(want, tuple) else (want,)
        for m in (scripted, torch.jit.load(path)):
            got = m(*args)
            got = got if isinstance(got, tuple) else (got,)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and torch.equal(g, w), (i, g.dtype, w.dtype)
    with pytest.raises(Exception, match="normalized_shape"):
        torch.jit.script(DyT(8))(torch.randn(2, 7))


def test_scripted_converted_encoder_saves_and_equals_eager(tmp_path):
    """A converted nn.TransformerEncoder (scriptable with LayerNorm) scripts, saves and loads: its scripted
    forward reads norm1.eps and norm2.eps (DyT's NaN, so never the LayerNorm fast path)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    model = convert_layernorm_to_dyt(nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(32),
                                                           enable_nested_tensor=False).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(tmp_path / "encoder.pt"))
        loaded = torch.jit.load(str(tmp_path / "encoder.pt"))
    x = torch.randn(2, 7, 32)
    with use_backend("torch"), torch.no_grad():
        assert torch.equal(loaded(x), model(x))
