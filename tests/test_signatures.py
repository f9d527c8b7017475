"""The signature cache's matching (dyt_kernels/_signatures.py): torch's TensorGuards and the Python
fallback agree, on tensors that differ in one fact at a time and on random pairs; and the cache's
own rules (a tensor passed twice, absent arguments, the per-shape bound)."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from dyt_kernels import _signatures, dyt, dyt_modulate, functional, use_backend
from float64_checks import dyt_formula
from helpers import signature_guards


# (conftest.py) no runner ever handed two sets of argument dtypes
pytestmark = pytest.mark.usefixtures("launches_keep_their_signature")


def _variants():
    """Tensors of one shape, or near it, differing in one fact at a time from the first."""
    base = torch.randn(4, 6)
    yield "base", base
    yield "another base", torch.randn(4, 6)
    yield "float64", base.double()
    yield "bfloat16", base.bfloat16()
    yield "transposed strides", torch.empty_strided((4, 6), (1, 4))
    yield "column slice", torch.randn(4, 8)[:, :6]
    yield "expanded", torch.randn(1, 6).expand(4, 6)
    yield "other shape", torch.randn(6, 4)
    yield "other rank", torch.randn(4, 6, 1)
    yield "negated", torch._neg_view(torch.randn(4, 6))
    yield "negated imag", torch.randn(4, 6, dtype=torch.complex64).conj().imag
    yield "requires grad", torch.randn(4, 6, requires_grad=True)
    yield "parameter", torch.nn.Parameter(torch.randn(4, 6))
    yield "sparse", base.to_sparse()
    yield "sparse csr", base.to_sparse_csr()
    yield "absent stand-in", _signatures.absent()
    yield "meta", torch.empty(4, 6, device="meta")


VARIANTS = dict(_variants())


def test_torch_guards_are_the_ones_in_use():
    """On the torch releases this project runs on (2.11 on the GPU image, 2.14 here) torch's guard
    passes the self-test; PyGuards is the fallback for others."""
    if torch.__version__.split("+")[0].rsplit(".", 1)[0] in ("2.11", "2.12", "2.13", "2.14"):
        assert _signatures.GUARDS is _signatures._c_guards() is not None


# Guards are built from dense tensors only (Signatures.add; torch's aborts on a sparse compressed one).
@pytest.mark.parametrize("built", [n for n, t in VARIANTS.items() if t.layout == torch.strided])
def test_one_fact_apart(built):
    """A guard built from one variant matches that variant's facts only, in both implementations."""
    torch_guards = _signatures._c_guards()
    for name, t in VARIANTS.items():
        want = name != "sparse csr" and _signatures._facts(VARIANTS[built]) == _signatures._facts(t)
        for impl in (torch_guards, _signatures.PyGuards):
            if impl is None:
                continue
            got = impl(VARIANTS[built], dynamic_dims_sizes=None, dynamic_dims_strides=None).check(t)
            assert got is want, f"{impl.__name__} built on {built}, checking {name}: {got}"


def test_random_argument_lists_agree():
    """Random four-tensor calls: both implementations give the same answer, which is True exactly
    when every tensor has the facts of the one in its place and no tensor is passed twice."""
    torch_guards = _signatures._c_guards()
    if torch_guards is None:
        pytest.skip("torch's TensorGuards is not usable here")
    dense = [t for t in VARIANTS.values() if t.layout == torch.strided]
    pool = dense + [VARIANTS["sparse"]]
    rng = random.Random(0)
    for _ in range(400):
        built = [rng.choice(dense) for _ in range(4)]
        if len({id(t) for t in built}) != 4:
            continue
        call = [t if rng.random() < 0.7 else rng.choice(pool) for t in built]
        want = (all(_signatures._facts(a) == _signatures._facts(b) for a, b in zip(built, call))
                and len({id(t) for t in call}) == 4)
        for impl in (torch_guards, _signatures.PyGuards):
            assert impl(*built, dynamic_dims_sizes=None, dynamic_dims_strides=None).check(*call) is want


def test_a_non_tensor_never_matches():
    for impl in (_signatures._c_guards(), _signatures.PyGuards):
        if impl is not None:
            g = impl(torch.randn(3), torch.randn(1), dynamic_dims_sizes=None, dynamic_dims_strides=None)
            assert g.check(torch.randn(3), 0.5) is False
            assert g.check([1.0, 2.0, 3.0], torch.randn(1)) is False


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("impl", ["torch", "python"])
def test_one_tensor_twice_is_right_and_not_cached(impl):
    """weight is bias: no guard matches such a call (each tensor must be distinct), so it is never
    remembered, and every call takes the checks; its values are still right."""
    with signature_guards(impl), use_backend("triton"):
        x, a, wb = torch.randn(5, 8), torch.tensor([0.7]), torch.randn(8)
        for _ in range(3):
            torch.testing.assert_close(dyt(x, a, wb, wb).double(), dyt_formula(x.double(), a.double(), wb.double(),
                                                                               wb.double()), rtol=1e-5, atol=1e-5)
        assert functional._VALIDATED.slots() == []


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("impl", ["torch", "python"])
def test_absent_and_present_arguments_share_a_shape(impl):
    """Calls of one x shape with and without weight / bias, residual / gate, interleaved: each keeps
    its own entry and its own values."""
    with signature_guards(impl), use_backend("triton"):
        x, a, w, b = torch.randn(2, 3, 8), torch.tensor([0.7]), torch.randn(8), torch.randn(8)
        combos = [(w, b), (None, b), (w, None), (None, None)]
        for weight, bias in combos * 2:
            want = dyt_formula(x.double(), a.double(), None if weight is None else weight.double(),
                               None if bias is None else bias.double())
            torch.testing.assert_close(dyt(x, a, weight, bias).double(), want, rtol=1e-5, atol=1e-5)
        assert len(functional._VALIDATED.slots()) == len(combos)
        shift, scale, gate, res = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 3, 8)
        outs = {}
        for residual, g in [(res, gate), (res, None), (None, None)] * 2:
            out = dyt_modulate(x, a, shift, scale, w, b, residual=residual, gate=g)
            key = (residual is None, g is None)
            if key in outs:
                for o, p in zip(out if isinstance(out, tuple) else (out,), outs[key]):
                    assert torch.equal(o, p)
            outs[key] = out if isinstance(out, tuple) else (out,)
        assert len(functional._VALIDATED_MOD.slots()) == 3


@pytest.mark.usefixtures("on_device")
def test_a_shape_keeps_a_bounded_number_of_entries():
    with signature_guards("torch" if _signatures._c_guards() else "python"), use_backend("triton"):
        x = torch.randn(2, 8)
        for dtype, rg, per_channel in itertools.product(
                (torch.float32, torch.float64, torch.bfloat16), (False, True), (False, True)):
            a = (torch.rand(8 if per_channel else 1) + 0.5).to(dtype if dtype != torch.float64 else torch.float32)
            dyt(x.to(dtype).detach().requires_grad_(rg), a)
        (bucket,) = functional._VALIDATED.values()
        assert len(bucket) == _signatures.Signatures.PER_SHAPE   # 12 signatures met, the oldest dropped


def _dead_wrapper():
    leaked = []

    def f(t):
        leaked.append(t * 1)   # escapes the transform: a dead wrapper once grad returns
        return (t * t).sum()
    torch.func.grad(f)(torch.randn(4, 6))
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    return leaked[0]


def test_functorch_wrappers_are_never_remembered_nor_matched():
    """autograd.lean_dyt_apply skips unwrapping dead functorch wrappers for calls that found a slot:
    so Signatures never remembers a wrapper, and a guard plain tensors left never matches one."""
    dead = _dead_wrapper()
    plain = torch._C._functorch.unwrap_if_dead(dead)
    assert _signatures.Signatures().add((4, 6), None, (dead, torch.randn(1)), [None]) is None
    for impl in (_signatures._c_guards(), _signatures.PyGuards):
        if impl is not None:
            g = impl(plain, dynamic_dims_sizes=None, dynamic_dims_strides=None)
            assert g.check(plain) is True and g.check(dead) is False


def test_import_under_another_default_device():
    """torch.set_default_device before the import (here "meta"; "cuda" the same way): the self-test
    and the stand-ins are made on the CPU explicitly, so torch's guards are still chosen and importing
    creates no tensor on that device (on "cuda" it would initialize CUDA at import)."""
    import subprocess
    import sys
    code = ("import torch; torch.set_default_device('meta'); import dyt_kernels; "
            "from dyt_kernels import _signatures as S, functional as F; "
            "print(S.GUARDS is S.PyGuards, F._NO_WEIGHT.device.type, F._NO_GATE.device.type)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    fallback, *devices = out.stdout.split()
    assert devices == ["cpu", "cpu"]
    if _signatures._c_guards() is not None:
        assert fallback == "False"
