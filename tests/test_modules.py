"""The DyT module and backend selection (the converter's tests are in test_convert.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dyt_kernels
from dyt_kernels import DyT, ModulatedDyT, dyt, get_backend, reference, use_backend
from helpers import TANH_F32_ABS_ERR
from library_models import dyt_formula, randomize_


# --------------------------------------------------------------------------------------------------
# DyT: a one-word replacement for nn.LayerNorm.
# --------------------------------------------------------------------------------------------------

LAYERNORM_ARGS = [
    pytest.param((8,), {}, id="int"),
    pytest.param((8, 1e-6), {}, id="pos-eps"),
    pytest.param((8, 1e-6, False), {}, id="pos-no-affine"),
    pytest.param((8, 1e-5, True, False), {}, id="pos-no-bias"),
    pytest.param((8, 1e-5, True, True, "DEVICE", torch.float64), {}, id="pos-device-dtype"),
    pytest.param((), {"normalized_shape": (4, 8), "eps": 1e-3, "elementwise_affine": True, "bias": True,
                      "device": "DEVICE", "dtype": torch.bfloat16}, id="kw-all-tuple"),
    pytest.param(([4, 8],), {"elementwise_affine": False}, id="list-no-affine"),
    pytest.param((torch.Size([6]),), {"bias": False}, id="size-no-bias"),
]


@pytest.mark.parametrize("args,kwargs", LAYERNORM_ARGS)
def test_dyt_accepts_every_layernorm_argument(args, kwargs, device):
    args = tuple(device if a == "DEVICE" else a for a in args)
    kwargs = {k: (device if v == "DEVICE" else v) for k, v in kwargs.items()}
    ln, norm = nn.LayerNorm(*args, **kwargs), DyT(*args, **kwargs)
    assert norm.normalized_shape == tuple(ln.normalized_shape)
    assert norm.elementwise_affine == ln.elementwise_affine
    ln_params = dict(ln.named_parameters())
    params = dict(norm.named_parameters())
    assert set(params) == set(ln_params) | {"alpha"}
    for name, p in ln_params.items():
        assert params[name].shape == p.shape and params[name].dtype == p.dtype and params[name].device == p.device
    assert params["alpha"].dtype == ln_params.get("weight", params["alpha"]).dtype
    assert params["alpha"].device.type == torch.device(device).type
    assert (norm.bias is None) == (ln.bias is None) and (norm.weight is None) == (ln.weight is None)
    # Same input works for both (same trailing shape), and DyT keeps dtype and shape.
    x = torch.randn(3, *ln.normalized_shape, device=params["alpha"].device, dtype=params["alpha"].dtype)
    assert norm(x).shape == ln(x).shape and norm(x).dtype == ln(x).dtype


def test_parameters_and_initial_values(device):
    norm = DyT(16, device=device)
    assert [n for n, _ in norm.named_parameters()] == ["alpha", "weight", "bias"]
    assert norm.alpha.shape == (1,) and norm.alpha.item() == 0.5
    assert torch.equal(norm.weight, torch.ones(16, device=device))
    assert torch.equal(norm.bias, torch.zeros(16, device=device))
    assert list(norm.state_dict()) == ["alpha", "weight", "bias"]

    per = DyT((4, 8), alpha_init_value=0.8, alpha_per_channel=True, device=device)
    assert per.alpha.shape == (4, 8) and torch.equal(per.alpha, torch.full((4, 8), 0.8, device=device))
    assert all(p.requires_grad for p in per.parameters())

    with torch.no_grad():
        for p in norm.parameters():
            p.add_(1.0)
    norm.reset_parameters()
    assert norm.alpha.item() == 0.5 and torch.equal(norm.bias, torch.zeros(16, device=device))


def test_layernorm_state_dict_loads_into_dyt(device):
    """Swapping the class keeps checkpoints: LayerNorm's weight/bias load, only alpha is new."""
    ln = randomize_(nn.LayerNorm(12, device=device))
    norm = DyT(12, device=device)
    missing, unexpected = norm.load_state_dict(ln.state_dict(), strict=False)
    assert missing == ["alpha"] and unexpected == []
    assert torch.equal(norm.weight, ln.weight) and torch.equal(norm.bias, ln.bias)


def test_eps_is_accepted_ignored_and_reads_nan(device):
    x = torch.randn(5, 8, device=device)
    a, b = DyT(8, eps=1e-5, device=device), DyT(8, eps=0.3, device=device)
    assert math.isnan(a.eps) and math.isnan(b.eps)
    assert torch.equal(a(x), b(x))


def test_extra_repr(device):
    text = repr(DyT(384, device=device))
    for part in ["(384,)", "alpha_init_value=0.5", "alpha_per_channel=False", "elementwise_affine=True",
                 "bias=True", "channels_last=True"]:
        assert part in text, (part, text)
    text = repr(DyT(64, 1e-6, True, False, alpha_init_value=1.5, alpha_per_channel=True, channels_last=False))
    for part in ["(64,)", "alpha_init_value=1.5", "alpha_per_channel=True", "bias=False", "channels_last=False"]:
        assert part in text, (part, text)
    assert "elementwise_affine=False" in repr(DyT((2, 3), elementwise_affine=False))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape,normalized,per_channel", [
    ((2, 5, 24), 24, False), ((2, 5, 24), 24, True), ((3, 4, 8), (4, 8), True), ((6, 4, 8), (4, 8), False),
], ids=["D-alpha1", "D-alphaC", "4x8-alphaC", "4x8-alpha1"])
def test_module_forward_backward_matches_formula(shape, normalized, per_channel, backend, device):
    norm = randomize_(DyT(normalized, alpha_per_channel=per_channel, device=device))
    x = torch.randn(shape, device=device, requires_grad=True)
    dy = torch.randn(shape, device=device)
    with use_backend(backend):
        y = norm(x)
        y.backward(dy)
    k = 1 if isinstance(normalized, int) else len(normalized)
    flat = lambda t: t.double().reshape(*t.shape[:t.dim() - k], -1)  # noqa: E731
    params64 = [p.detach().double().reshape(-1).requires_grad_() for p in (norm.alpha, norm.weight, norm.bias)]
    x64 = x.detach().double().requires_grad_()
    y64 = dyt_formula(flat(x64), *params64).reshape(shape)
    y64.backward(dy.double())
    # fp32 kernel vs float64 formula: y within the tanh form's error times |w| (~1.7) plus rounding;
    # grads are sums of <= 30 terms of O(1). 1e-5 abs is ~50 fp32 eps at these magnitudes.
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    for p, p64 in zip((norm.alpha, norm.weight, norm.bias), params64):
        torch.testing.assert_close(p.grad.reshape(-1), p64.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["alpha1", "alphaC"])
def test_module_channels_first(per_channel, backend, device):
    norm = randomize_(DyT(6, channels_last=False, alpha_per_channel=per_channel, device=device))
    x = torch.randn(2, 6, 3, 5, device=device)
    with use_backend(backend):
        y = norm(x)
    want = dyt_formula(x.double(), *(p.detach().double() for p in (norm.alpha, norm.weight, norm.bias)), channel_dim=1)
    # fp32 vs float64 elementwise: tanh form error (<= TANH_F32_ABS_ERR) times |w| <= ~3, plus rounding.
    torch.testing.assert_close(y, want.float(), rtol=1e-6, atol=4 * TANH_F32_ABS_ERR * 3)
    with pytest.raises(ValueError, match="normalized_shape must be an int"):
        DyT((2, 3), channels_last=False)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("per_channel", [False, True], ids=["alpha1", "alphaC"])
def test_module_channels_first_wrong_channel_count(per_channel, affine, device):
    """5 channels into DyT(6, channels_last=False) is an error whatever the parameters are (the
    channels_last path checks the trailing shape itself; a scalar alpha without affine has no
    per-channel tensor whose size would catch it)."""
    norm = DyT(6, elementwise_affine=affine, channels_last=False, alpha_per_channel=per_channel, device=device)
    with pytest.raises(ValueError):
        norm(torch.randn(2, 5, 3, 5, device=device))


def test_module_wrong_trailing_shape(device):
    with pytest.raises(ValueError, match=r"normalized_shape=\(8,\).*\(2, 7\)"):
        DyT(8, device=device)(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match=r"normalized_shape=\(4, 8\).*\(2, 8, 4\)"):
        DyT((4, 8), device=device)(torch.randn(2, 8, 4, device=device))
    with pytest.raises(ValueError, match="normalized_shape must be positive"):
        DyT((4, 0))
    # fewer dims than normalized_shape, or none: the trailing-shape check names them too
    with pytest.raises(ValueError, match=r"normalized_shape=\(4, 8\).*\(8,\)"):
        DyT((4, 8), device=device)(torch.randn(8, device=device))
    with pytest.raises(ValueError, match=r"normalized_shape=\(8,\).*\(\)"):
        DyT(8, device=device)(torch.randn((), device=device))


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("how", ["parametrize", "functional_call", "assigned"])
def test_module_reads_the_parameters_the_module_answers_for(how, backend, device):
    """The modules read their parameters from the parameter dict (cheaper than nn.Module's
    __getattr__); a parametrization moves `weight` out of that dict, functional_call swaps tensors
    into it, assignment replaces the Parameter: each forward must use what module.<name> gives."""
    from torch.nn.utils import parametrize
    norm = randomize_(DyT(8, device=device))
    mod = ModulatedDyT(8, elementwise_affine=True, device=device)
    randomize_(mod)
    x = torch.randn(3, 5, 8, device=device)
    shift, scale = torch.randn(3, 8, device=device), torch.randn(3, 8, device=device)
    with use_backend(backend):
        if how == "parametrize":
            for m in (norm, mod):
                parametrize.register_parametrization(m, "weight", _Doubled())
                assert "weight" not in m._parameters
            y, h = norm(x), mod(x, shift, scale)
        elif how == "functional_call":
            new = {"weight": 2 * norm.weight.detach(), "bias": norm.bias.detach() - 1}
            y = torch.func.functional_call(norm, new, (x,))
            h = torch.func.functional_call(mod, {"weight": 2 * mod.weight.detach()}, (x, shift, scale))
            norm.bias.data -= 1   # the expected values below read the module's own parameters
            norm.weight.data *= 2
            mod.weight.data *= 2
        else:
            for m in (norm, mod):
                m.weight = nn.Parameter(2 * m.weight.detach())
            y, h = norm(x), mod(x, shift, scale)
    w = norm.weight.detach().double()
    want_y = dyt_formula(x.double(), norm.alpha.detach().double(), w, norm.bias.detach().double())
    mw = mod.weight.detach().double()
    want_h = dyt_formula(x.double(), mod.alpha.detach().double(), mw, mod.bias.detach().double()) \
        * (1 + scale.double()[:, None]) + shift.double()[:, None]
    # fp32 vs float64 elementwise: the tanh form's error times |w| (<= ~6 here), plus rounding
    torch.testing.assert_close(y, want_y.float(), rtol=1e-5, atol=8 * TANH_F32_ABS_ERR * 6)
    torch.testing.assert_close(h, want_h.float(), rtol=1e-5, atol=8 * TANH_F32_ABS_ERR * 6 * 4)


@pytest.mark.parametrize("value", [math.nan, math.inf, "0.5", None, True])
def test_module_alpha_init_value_must_be_finite(value):
    for make in (lambda: DyT(8, alpha_init_value=value), lambda: ModulatedDyT(8, alpha_init_value=value)):
        with pytest.raises(ValueError, match="alpha_init_value must be a finite number"):
            make()


def test_module_dtype(device):
    norm = DyT(32, dtype=torch.bfloat16, device=device)
    assert all(p.dtype == torch.bfloat16 for p in norm.parameters())
    x = torch.randn(4, 32, device=device, dtype=torch.bfloat16)
    with use_backend("triton"):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    # Default parameters (w=1, b=0, alpha=0.5): y = tanh(x/2), one bf16 rounding (2^-8 relative).
    torch.testing.assert_close(y.float(), torch.tanh(0.5 * x.float()), rtol=2 ** -8, atol=2 ** -9)


# --------------------------------------------------------------------------------------------------
# Backend selection.
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def reference_calls(monkeypatch):
    """Counts calls into reference.dyt / dyt_backward (the torch path) made by the registered ops."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = reference.dyt, reference.dyt_backward

    def spy_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def spy_bwd(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(reference, "dyt", spy_fwd)
    monkeypatch.setattr(reference, "dyt_backward", spy_bwd)
    return calls


def _fwd_bwd(device, dtype=torch.float32):
    x = torch.randn(3, 16, device=device, dtype=dtype, requires_grad=True)
    dyt(x, torch.tensor([0.5], device=device, dtype=dtype), torch.ones(16, device=device, dtype=dtype)).sum().backward()


def test_use_backend_nesting_restores(monkeypatch):
    monkeypatch.delenv("DYT_KERNELS_BACKEND", raising=False)
    assert get_backend() == "auto"
    with use_backend("torch"):
        assert get_backend() == "torch"
        with use_backend("triton"):
            assert get_backend() == "triton"
        assert get_backend() == "torch"
        with pytest.raises(RuntimeError, match="boom"), use_backend("auto"):
            raise RuntimeError("boom")
        assert get_backend() == "torch"
    assert get_backend() == "auto"
    assert dyt_kernels.get_backend is get_backend


@pytest.mark.parametrize("env,uses_reference", [("torch", True), ("triton", False), ("auto", None)])
def test_env_var_selects_backend(env, uses_reference, monkeypatch, reference_calls, device):
    monkeypatch.setenv("DYT_KERNELS_BACKEND", env)
    assert get_backend() == env
    if uses_reference is None:  # auto: Triton for CUDA tensors, the torch path for everything else
        uses_reference = device != "cuda"
    _fwd_bwd(device)
    assert (reference_calls["fwd"], reference_calls["bwd"]) == ((1, 1) if uses_reference else (0, 0))
    with use_backend("torch"):  # use_backend overrides the variable
        assert get_backend() == "torch"


def test_an_empty_env_var_counts_as_unset(monkeypatch):
    """DYT_KERNELS_BACKEND= (set to nothing, the shell's way to clear it for one command) is "auto", as
    an empty TRITON_INTERPRET is off; before, it was refused as a backend named ''."""
    from dyt_kernels.backend import traced_backend
    monkeypatch.setenv("DYT_KERNELS_BACKEND", "")
    assert get_backend() == "auto" and traced_backend() == "auto"


def test_auto_on_cpu_uses_torch_path(monkeypatch, reference_calls):
    monkeypatch.delenv("DYT_KERNELS_BACKEND", raising=False)
    with use_backend("auto"):
        _fwd_bwd("cpu")
    assert reference_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_float64_always_uses_torch_path(backend, reference_calls, device):
    with use_backend(backend):
        _fwd_bwd(device, torch.float64)
    assert reference_calls == {"fwd": 1, "bwd": 1}


def test_triton_backend_skips_reference(reference_calls, device):
    with use_backend("triton"):
        _fwd_bwd(device)
    assert reference_calls == {"fwd": 0, "bwd": 0}


def test_backward_runs_on_the_forward_backend(monkeypatch, device):
    """A forward under use_backend("triton") keeps the Triton backward even if .backward() runs
    outside the block: the plain-PyTorch backward must not be called."""
    from dyt_kernels import reference

    def boom(*args, **kwargs):
        raise AssertionError("the torch backward ran for a Triton forward")

    x = torch.randn(4, 8, device=device, requires_grad=True)
    m = DyT(8).to(device)
    with use_backend("triton"):
        y = m(x)
    monkeypatch.setattr(reference, "dyt_backward", boom)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_weight_init_value_is_where_reset_parameters_starts(device):
    norm = DyT(6, weight_init_value=2.5, device=device)
    assert torch.equal(norm.weight, torch.full((6,), 2.5, device=device))
    with torch.no_grad():
        norm.weight.zero_()
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.full((6,), 2.5, device=device))
    with pytest.raises(ValueError, match="weight_init_value must be a finite number"):
        DyT(6, weight_init_value=float("inf"))


def test_modulated_dyt_checks_hidden_size(device):
    norm = ModulatedDyT(384, device=device)
    x, mod = torch.randn(2, 3, 16, device=device), torch.zeros(2, 16, device=device)
    with pytest.raises(ValueError, match=r"D=hidden_size=384, got \(2, 3, 16\)"):
        norm(x, mod, mod)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="hidden_size must be a positive int"):
            ModulatedDyT(bad)


def test_alpha_accepts_numpy_scalars_and_refuses_bools(device):
    np = pytest.importorskip("numpy")
    x = torch.randn(3, 8, device=device)
    with use_backend("torch"):
        expected = dyt(x, 0.5)
        assert torch.equal(dyt(x, np.float32(0.5)), expected)
        assert torch.equal(dyt(x, np.float64(0.5)), expected)
        with pytest.raises(TypeError, match="alpha must be a real number or a torch.Tensor, got bool"):
            dyt(x, True)


def test_layernorm_state_into_dyt_warns_under_strict_false(device):
    """Any DyT (not only converted ones) says when a state dict has weights but no alpha."""
    from dyt_kernels import DyTCheckpointWarning
    norm = DyT(8, device=device)
    state = torch.nn.LayerNorm(8, device=device).state_dict()
    with pytest.warns(DyTCheckpointWarning, match="no 'alpha'"):
        norm.load_state_dict(state, strict=False)
    assert norm.alpha.item() == 0.5


# --------------------------------------------------------------------------------------------------
# API review: meta-device init, LayerNorm checkpoints, flag types, use_backend across threads.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False])
def test_modulated_dyt_reset_parameters_after_meta_init(affine, device):
    """Deferred init (build on meta, to_empty, then reset_parameters wherever a module has one)
    gives ModulatedDyT its documented start, as DyT and every torch layer get theirs (FSDP's
    meta-device materialization calls it on every module with parameters, and raised here). Before, ModulatedDyT had no
    reset_parameters: such a loop skipped it and alpha, weight and bias kept to_empty's garbage."""
    norm = ModulatedDyT(8, elementwise_affine=affine, alpha_init_value=0.7, device="meta")
    model = nn.Sequential(norm).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(123.0)   # what to_empty's uninitialized memory may hold
    for m in model.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    assert torch.equal(norm.alpha, torch.full((1,), 0.7, device=device))
    if affine:
        assert torch.equal(norm.weight, torch.ones(8, device=device))
        assert torch.equal(norm.bias, torch.zeros(8, device=device))
    else:
        assert norm.weight is None and norm.bias is None
    # and a fresh module starts where reset_parameters puts it
    fresh = ModulatedDyT(8, elementwise_affine=affine, alpha_init_value=0.7, device=device)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), norm.parameters()))


def test_modulated_dyt_warns_on_layernorm_state_under_strict_false(device):
    """A ModulatedDyT is a DyT: loading a state dict with its weight but no alpha (an affine
    LayerNorm's) under strict=False warns as DyT does; before, alpha kept its init silently."""
    from dyt_kernels import DyTCheckpointWarning
    model = nn.Sequential(ModulatedDyT(8, elementwise_affine=True, device=device))
    state = nn.Sequential(nn.LayerNorm(8, device=device)).state_dict()
    with pytest.warns(DyTCheckpointWarning, match=r"'0\.weight' but no '0\.alpha'"):
        model.load_state_dict(state, strict=False)
    assert model[0].alpha.item() == 0.5


@pytest.mark.parametrize("flag", ["channels_last", "alpha_per_channel"])
@pytest.mark.parametrize("value", ["False", "false", 0, None], ids=repr)
def test_dyt_flags_must_be_bools(flag, value):
    """channels_last and alpha_per_channel (DyT's own flags, no LayerNorm code passes them) are True
    or False, as dyt's channels_last is. Before, a string read from a config ("False") was truthy:
    DyT(6, channels_last="False") normalized the last dim of an (N, 6, H, 6) tensor with per-channel
    weights, silently, and alpha_per_channel="false" made a per-channel alpha."""
    with pytest.raises(TypeError, match=rf"{flag} must be True or False, got {value!r}"):
        DyT(6, **{flag: value})


def test_dyt_flags_accept_numpy_bools():
    np = pytest.importorskip("numpy")
    norm = DyT(6, channels_last=np.bool_(False), alpha_per_channel=np.bool_(True))
    assert norm.channels_last is False and norm.alpha_per_channel is True
    assert norm.alpha.shape == (6,)


def test_use_backend_is_per_thread_and_per_task(monkeypatch):
    """use_backend is a ContextVar (README, backend.py): asyncio tasks created inside the block see it,
    a thread started inside it does not (it sees DYT_KERNELS_BACKEND, else "auto"), unless it runs
    in a copy of the context or enters use_backend itself. Pins the documented semantics."""
    import asyncio
    import contextvars
    import threading
    monkeypatch.delenv("DYT_KERNELS_BACKEND", raising=False)
    seen = {}

    async def task():
        return get_backend()

    with use_backend("torch"):
        plain = threading.Thread(target=lambda: seen.setdefault("thread", get_backend()))
        ctx = contextvars.copy_context()
        copied = threading.Thread(target=lambda: ctx.run(lambda: seen.setdefault("copied", get_backend())))
        for t in (plain, copied):
            t.start()
            t.join()
        seen["task"] = asyncio.run(task())
    assert seen == {"thread": "auto", "copied": "torch", "task": "torch"}
    monkeypatch.setenv("DYT_KERNELS_BACKEND", "torch")
    t = threading.Thread(target=lambda: seen.setdefault("env", get_backend()))
    t.start()
    t.join()
    assert seen["env"] == "torch"
