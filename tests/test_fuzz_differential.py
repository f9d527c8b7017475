"""Differential fuzzing of dyt and dyt_modulate (Triton backend) against float64, call after call.

test_layouts.py draws one layout per call against a cache it clears; this file aims at what a single
call cannot show:

- signature churn: many calls of one shape (the signature cache's bucket) whose layouts, dtypes,
  optional arguments, requires_grad patterns, grad modes and channels_last flags differ from one call
  to the next, in a shuffled order, with exact repeats (same tensors: the output must be bitwise the
  first call's) and lookalike repeats (fresh tensors of the same layout, another storage offset);
  a stale cache hit reads the wrong elements, the wrong dtype or the wrong flags, silently;
- a random subset of inputs requiring grad, and calls under no_grad / inference_mode;
- upstream gradients in any layout (transposed, stepped, expanded, misaligned);
- one tensor passed for two arguments (shift is scale, residual is x, x is weight, ...), and
  gradients accumulated into .grad over two backward passes;
- inputs (and their whole storage, padding included) and upstream gradients never written, and
  outputs and gradients never sharing storage with an input.

Every case is drawn by its own seeded generator; the case id holds its index and seed, and the
failure message every field of the case. Rerun one case with `pytest tests/test_fuzz_differential.py
-k <id>`. DYT_FUZZ_SEED=<int> draws a fresh set (exploring; the committed seed is SEED).

Tolerances. Single calls are checked with float64_checks.check_dyt / check_modulate: every output and
gradient three-way against float64 (at most 2x the error of plain PyTorch computing the same formula
in the dtype under test, plus an atol derived there from the kernels' fp32 tanh form, the rounding of
r before the norm and fp32 reductions). Calls without a graph use the same forward atols. Aliased
calls, which those helpers cannot express, use ALIAS_* below.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random

import pytest
import torch

from dyt_kernels import dyt, dyt_modulate, functional, use_backend
from float64_checks import (_modulate_atols, check_dyt, check_modulate, dyt_formula, float64_run,
                            modulate_formula, naive_run, repro)
from helpers import (FP32_EPS, assert_close_3way, assert_fresh, elementwise_atol, eps, max_abs, max_abs_err,
                     poisoned_empty, tanh_abs_err)

# (conftest.py) no runner ever handed two sets of argument dtypes
pytestmark = pytest.mark.usefixtures("launches_keep_their_signature")

SEED = int(os.environ.get("DYT_FUZZ_SEED", "73219"))
BACKEND = "triton"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # the kernels natively on a GPU (conftest)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# channel sizes: 1, primes, just below / at / above powers of two (the plans' BLOCK_N thresholds)
CHANNEL_SIZES = [1, 2, 3, 7, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 255, 257]
OTHER_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 11]
P_ZERO = 0.04        # chance that a dim is 0
MAX_ELEMENTS = 768   # the interpreter runs ~1 ms per program instance: small tensors keep the file < 90 s

N_DYT, N_MOD = 48, 44          # single-call cases
N_SEQ, SEQ_VARIANTS = 16, 5    # churn sequences, distinct signatures in each (each called 2-3 times)
LONG_SEQ_VARIANTS = 10         # every fifth sequence: more signatures than a bucket holds (PER_SHAPE = 8)
N_ALIAS = 24


# --------------------------------------------------------------------------------------------------
# Layouts: how a tensor of a logical shape sits in memory. A layout is a tuple, so cases print as
# plain data: ("contiguous",), ("transposed", i, j), ("step2", dim, start), ("expanded", dims),
# ("narrow", storage offset), ("channels_last",).
# --------------------------------------------------------------------------------------------------

def draw_layout(rng: random.Random, shape, p_plain: float = 0.35) -> tuple:
    n = len(shape)
    if rng.random() < p_plain or n == 0:
        return ("contiguous",)
    kinds = ["step2", "narrow", "expanded"] + (["transposed", "transposed"] if n >= 2 else []) \
        + (["channels_last", "channels_last"] if n == 4 else [])
    kind = rng.choice(kinds)
    if kind == "transposed":
        i, j = sorted(rng.sample(range(n), 2))
        return ("transposed", i, j)
    if kind == "step2":
        return ("step2", rng.randrange(n), rng.randrange(2))
    if kind == "expanded":
        dims = tuple(d for d in range(n) if rng.random() < 0.5) or (rng.randrange(n),)
        return ("expanded", dims)
    if kind == "narrow":
        return ("narrow", rng.choice([1, 2, 3, 5, 8]))
    return ("channels_last",)


def draw_vector_layout(rng: random.Random) -> tuple:
    return rng.choice([("contiguous",), ("contiguous",), ("step2", 0, 1), ("narrow", 1), ("narrow", 3),
                       ("expanded", (0,))])


def relocate(layout: tuple, rng: random.Random) -> tuple:
    """The same strides at another storage offset (a lookalike: one signature, other memory)."""
    if layout[0] == "narrow":
        return ("narrow", rng.choice([1, 2, 3, 5, 8, 13]))
    return layout


def _values(shape, dtype, gen, kind: str, scale: float, center: float):
    if kind == "alpha":   # |a| in [0.2, 1.2], either sign: never ~0, so alpha's effect shows
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        v = sign * (0.2 + torch.rand(shape, generator=gen))
    else:
        v = center + scale * torch.randn(shape, generator=gen)
    return v.to(device=DEVICE, dtype=dtype)   # drawn on the CPU, so a GPU run draws the same values


def materialize(shape, layout: tuple, dtype, gen, *, kind: str = "randn", scale: float = 1.0,
                center: float = 0.0):
    """(tensor of `shape` laid out as `layout`, the tensor owning its whole storage)."""
    shape = list(shape)
    k = layout[0]
    if k == "contiguous":
        base = _values(shape, dtype, gen, kind, scale, center)
        return base, base
    if k == "transposed":
        i, j = layout[1], layout[2]
        s = list(shape)
        s[i], s[j] = s[j], s[i]
        base = _values(s, dtype, gen, kind, scale, center)
        return base.transpose(i, j), base
    if k == "step2":
        d, start = layout[1], layout[2]
        s = list(shape)
        s[d] = 2 * s[d]
        base = _values(s, dtype, gen, kind, scale, center)
        idx = [slice(None)] * len(shape)
        idx[d] = slice(start, None, 2)
        return base[tuple(idx)], base
    if k == "expanded":
        s = [1 if d in layout[1] else n for d, n in enumerate(shape)]
        base = _values(s, dtype, gen, kind, scale, center)
        return base.expand(shape), base
    if k == "narrow":
        n = math.prod(shape)
        base = _values([n + layout[1] + 3], dtype, gen, kind, scale, center)
        return base.narrow(0, layout[1], n).view(shape), base
    if k == "channels_last":
        base = _values(shape, dtype, gen, kind, scale, center).contiguous(memory_format=torch.channels_last)
        return base, base
    raise ValueError(layout)


def _size(rng: random.Random, sizes) -> int:
    return 0 if rng.random() < P_ZERO else rng.choice(sizes)


def _fit(shape: list[int], keep: int) -> list[int]:
    """Halve the largest dim other than `keep` (then `keep`) until the shape fits MAX_ELEMENTS."""
    while math.prod(shape) > MAX_ELEMENTS:
        others = [i for i in range(len(shape)) if i != keep and shape[i] > 1]
        i = max(others, key=lambda j: shape[j]) if others else keep
        shape[i] = (shape[i] + 1) // 2
    return shape


# --------------------------------------------------------------------------------------------------
# Cases.
# --------------------------------------------------------------------------------------------------

GRAD_MODES = ["grad", "grad", "grad", "no_grad", "inference"]


@dataclasses.dataclass(frozen=True)
class Param:
    """An optional per-channel tensor, or alpha: form "float" | "0d" | "(1,)" | "(1,1)" | "channel"."""
    form: str
    layout: tuple
    dtype: str


@dataclasses.dataclass(frozen=True)
class DytCase:
    id: str
    seed: int
    dtype: str
    shape: tuple
    channels_last: bool
    x_layout: tuple
    dy_layout: tuple
    alpha: Param
    weight: Param | None
    bias: Param | None
    requires_grad: tuple    # names of the tensor arguments that require grad
    grad_mode: str          # "grad", "no_grad" or "inference"

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.channels_last else self.shape[1]


@dataclasses.dataclass(frozen=True)
class ModCase:
    id: str
    seed: int
    dtype: str
    shape: tuple
    x_layout: tuple
    dh_layout: tuple
    residual_layout: tuple | None
    dr_layout: tuple | None
    mods: tuple             # ((name, "BD" | "B1D" | "BLD", layout), ...) for shift, scale[, gate]
    alpha: Param
    weight: Param | None
    bias: Param | None
    requires_grad: tuple
    grad_mode: str


def describe(case) -> str:
    fields = ", ".join(f"{f.name}={getattr(case, f.name)}" for f in dataclasses.fields(case) if f.name != "id")
    return f"fuzz case {case.id} (DYT_FUZZ_SEED={SEED}): {fields}"


PARAM_DTYPES = {**DTYPES, "fp64": torch.float64}   # alpha/weight/bias may be float64 beside a narrower x


def _param_dtype(rng: random.Random, dtype: str) -> str:
    return rng.choice([dtype, dtype, "fp32", rng.choice(list(PARAM_DTYPES))])


def _draw_alpha(rng: random.Random, dtype: str) -> Param:
    form = rng.choice(["float", "0d", "(1,)", "(1,)", "(1,1)", "channel", "channel", "channel"])
    return Param(form, draw_vector_layout(rng) if form == "channel" else ("contiguous",), _param_dtype(rng, dtype))


def _draw_vector(rng: random.Random, dtype: str, p: float = 0.7) -> Param | None:
    return Param("channel", draw_vector_layout(rng), _param_dtype(rng, dtype)) if rng.random() < p else None


def _draw_requires(rng: random.Random, names) -> tuple:
    return tuple(n for n in names if rng.random() < 0.6)


def draw_dyt(rng: random.Random, case_id: str, shape=None, channels_last=None) -> DytCase:
    if shape is None:
        rank = rng.choice([1, 2, 2, 3, 3, 4, 4])
        channels_last = rank == 1 or rng.random() < 0.5
        C = _size(rng, CHANNEL_SIZES)
        others = [_size(rng, OTHER_SIZES) for _ in range(rank - 1)]
        shape = others + [C] if channels_last else [others[0], C, *others[1:]]
        shape = tuple(_fit(shape, rank - 1 if channels_last else 1))
    dtype = rng.choice(list(DTYPES))
    alpha = _draw_alpha(rng, dtype)
    weight, bias = _draw_vector(rng, dtype), _draw_vector(rng, dtype)
    names = ["x"] + (["alpha"] if alpha.form != "float" else []) + (["weight"] if weight else []) \
        + (["bias"] if bias else [])
    return DytCase(case_id, rng.getrandbits(48), dtype, tuple(shape), channels_last, draw_layout(rng, shape),
                   draw_layout(rng, shape, p_plain=0.5), alpha, weight, bias, _draw_requires(rng, names),
                   rng.choice(GRAD_MODES))


MOD_MODES = {"BD": lambda B, L, D: (B, D), "B1D": lambda B, L, D: (B, 1, D), "BLD": lambda B, L, D: (B, L, D)}


def draw_mod(rng: random.Random, case_id: str, shape=None) -> ModCase:
    if shape is None:
        shape = [_size(rng, [1, 2, 3]), _size(rng, [1, 2, 3, 5, 7, 8, 16, 17]), _size(rng, CHANNEL_SIZES)]
        shape = tuple(_fit(shape, 2))
    B, L, D = shape
    dtype = rng.choice(list(DTYPES))
    alpha = _draw_alpha(rng, dtype)
    weight, bias = _draw_vector(rng, dtype, 0.5), _draw_vector(rng, dtype, 0.5)
    residual = rng.random() < 0.6
    names = ["shift", "scale"] + (["gate"] if residual and rng.random() < 0.7 else [])
    mods = []
    for name in names:
        mode = rng.choice(list(MOD_MODES))
        mods.append((name, mode, draw_layout(rng, MOD_MODES[mode](B, L, D))))
    grads = ["x", "shift", "scale"] + (["alpha"] if alpha.form != "float" else []) + (["weight"] if weight else []) \
        + (["bias"] if bias else []) + (["residual"] if residual else []) + (["gate"] if "gate" in names else [])
    return ModCase(case_id, rng.getrandbits(48), dtype, tuple(shape), draw_layout(rng, shape),
                   draw_layout(rng, shape, p_plain=0.5), draw_layout(rng, shape) if residual else None,
                   draw_layout(rng, shape, p_plain=0.5) if residual else None, tuple(mods), alpha, weight, bias,
                   _draw_requires(rng, grads), rng.choice(GRAD_MODES))


def _case_rng(kind: str, index: int) -> tuple[random.Random, str]:
    rng = random.Random(f"{SEED}/{kind}/{index}")
    return rng, f"{kind}-{index:03d}-s{SEED}"


# --------------------------------------------------------------------------------------------------
# Building a case's tensors. Returns the inputs dict (as float64_checks takes it), the upstream
# gradients, and every tensor owning input or gradient storage (for the never-written check).
# --------------------------------------------------------------------------------------------------

def _param(p: Param | None, C: int, gen, bases: list, *, kind="randn", scale=1.0, center=0.0):
    if p is None:
        return None
    dtype = PARAM_DTYPES[p.dtype]
    if p.form == "channel":
        t, base = materialize((C,), p.layout, dtype, gen, kind=kind, scale=scale, center=center)
        bases.append(base)
        return t
    t, _ = materialize((1,), ("contiguous",), dtype, gen, kind=kind, scale=scale, center=center)
    if p.form == "float":
        return t.item()
    t = t.reshape({"0d": (), "(1,)": (1,), "(1,1)": (1, 1)}[p.form]).clone()
    bases.append(t)
    return t


def _requiring(inputs: dict, names) -> dict:
    """inputs with exactly `names` requiring grad (leaves with the same strides and storage)."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().requires_grad_(k in names)
        out[k] = v
    return out


def build_dyt(case: DytCase, seed: int | None = None):
    gen = torch.Generator().manual_seed(case.seed if seed is None else seed)
    dtype, bases = DTYPES[case.dtype], []
    x, xb = materialize(case.shape, case.x_layout, dtype, gen, scale=2.0)   # both tanh branches, saturation
    dy, dyb = materialize(case.shape, case.dy_layout, dtype, gen)
    C = case.channels
    alpha = _param(case.alpha, C, gen, bases, kind="alpha")
    weight = _param(case.weight, C, gen, bases, scale=0.5, center=1.0)
    bias = _param(case.bias, C, gen, bases, scale=0.5)
    inputs = _requiring({"x": x, "alpha": alpha, "weight": weight, "bias": bias}, case.requires_grad)
    return inputs, dy, [xb, dyb] + bases


def build_mod(case: ModCase, seed: int | None = None):
    gen = torch.Generator().manual_seed(case.seed if seed is None else seed)
    dtype, bases = DTYPES[case.dtype], []
    B, L, D = case.shape
    x, xb = materialize(case.shape, case.x_layout, dtype, gen)
    dh, dhb = materialize(case.shape, case.dh_layout, dtype, gen)
    bases += [xb, dhb]
    residual = dr = None
    if case.residual_layout is not None:
        residual, rb = materialize(case.shape, case.residual_layout, dtype, gen)
        dr, drb = materialize(case.shape, case.dr_layout, dtype, gen)
        bases += [rb, drb]
    mods = {}
    for name, mode, layout in case.mods:
        mods[name], mb = materialize(MOD_MODES[mode](B, L, D), layout, dtype, gen,
                                     scale=0.5 if name == "scale" else 1.0)
        bases.append(mb)
    alpha = _param(case.alpha, D, gen, bases, kind="alpha")
    weight = _param(case.weight, D, gen, bases, scale=0.5, center=1.0)
    bias = _param(case.bias, D, gen, bases, scale=0.5)
    inputs = _requiring({"x": x, "alpha": alpha, "shift": mods["shift"], "scale": mods["scale"], "weight": weight,
                         "bias": bias, "residual": residual, "gate": mods.get("gate")}, case.requires_grad)
    return inputs, dh, dr, bases


# --------------------------------------------------------------------------------------------------
# Running and checking one call.
# --------------------------------------------------------------------------------------------------

def _grad_context(mode: str):
    return {"no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]()


def _snapshot(bases: list) -> list:
    return [(b, b.detach().clone()) for b in bases]


def assert_unwritten(snapshot: list) -> None:
    """Every input and upstream gradient storage (the whole buffer, its padding included) as before."""
    for i, (b, before) in enumerate(snapshot):
        assert torch.equal(b.detach(), before) or torch.equal(b.detach().isnan(), before.isnan()) and torch.equal(
            b.detach().nan_to_num(), before.nan_to_num()), f"storage {i} ({tuple(b.shape)}) was modified in place"


def _forward_only_dyt(case: DytCase, inputs: dict, dy) -> dict:
    """No graph (no_grad / inference_mode): y three-way against float64 with check_dyt's y atol."""
    with use_backend(BACKEND), poisoned_empty(), _grad_context(case.grad_mode):
        y = dyt(**inputs, channels_last=case.channels_last)
    assert not y.requires_grad, "an output without a graph requires grad"
    assert_fresh(y, *[v for v in inputs.values() if isinstance(v, torch.Tensor)])
    y = y.clone() if y.is_inference() else y
    (y64,), _, in64 = float64_run(dyt_formula, inputs, [dy], channels_last=case.channels_last)
    (yn,), _ = naive_run(dyt_formula, inputs, [dy], y.dtype, channels_last=case.channels_last)
    w = inputs["weight"]
    w_max = 1.0 if w is None else max_abs(w.detach().double())
    atol = elementwise_atol(y64, y.dtype, tanh_abs_err(y.dtype) * w_max + 2 * FP32_EPS * max_abs(y64))
    assert_close_3way("y", y, y64, yn, atol)
    return {"y": y}


def run_dyt(case: DytCase, inputs: dict, dy, bases: list) -> dict:
    snap = _snapshot(bases)
    if case.grad_mode == "grad":
        out = check_dyt(inputs, dy, backend=BACKEND, channels_last=case.channels_last)
    else:
        out = _forward_only_dyt(case, inputs, dy)
    assert_unwritten(snap)
    return out


def _forward_only_mod(case: ModCase, inputs: dict, dh, dr) -> dict:
    with use_backend(BACKEND), poisoned_empty(), _grad_context(case.grad_mode):
        outs = dyt_modulate(**inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    douts = [dh] if inputs["residual"] is None else [dh, dr]
    assert len(outs) == len(douts), f"dyt_modulate returned {len(outs)} tensors, expected {len(douts)}"
    ins = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    for o in outs:
        assert not o.requires_grad, "an output without a graph requires grad"
        assert_fresh(o, *ins)
    if len(outs) == 2:
        assert_fresh(outs[0], outs[1])
    outs = [o.clone() if o.is_inference() else o for o in outs]
    outs64, _, in64 = float64_run(modulate_formula, inputs, douts)
    naive, _ = naive_run(modulate_formula, inputs, douts, outs[0].dtype)
    atol = _modulate_atols(inputs, in64, outs64, {}, douts)
    assert_close_3way("h", outs[0], outs64[0], naive[0], atol["h"])
    if len(outs) == 2:
        assert_close_3way("r", outs[1], outs64[1], naive[1], atol["r"])
    return dict(zip(["h", "r"], outs))


def run_mod(case: ModCase, inputs: dict, dh, dr, bases: list) -> dict:
    snap = _snapshot(bases)
    if case.grad_mode == "grad":
        out = check_modulate(inputs, dh, dr, backend=BACKEND)
    else:
        out = _forward_only_mod(case, inputs, dh, dr)
    assert_unwritten(snap)
    return out


# --------------------------------------------------------------------------------------------------
# Single calls.
# --------------------------------------------------------------------------------------------------

def _dyt_cases():
    out = []
    for i in range(N_DYT):
        rng, cid = _case_rng("dyt", i)
        case = draw_dyt(rng, f"{cid}-{rng.getrandbits(20):05x}")
        out.append(pytest.param(case, id=case.id))
    return out


def _mod_cases():
    out = []
    for i in range(N_MOD):
        rng, cid = _case_rng("mod", i)
        case = draw_mod(rng, f"{cid}-{rng.getrandbits(20):05x}")
        out.append(pytest.param(case, id=case.id))
    return out


@pytest.mark.parametrize("case", _dyt_cases())
def test_dyt_fuzz(case):
    inputs, dy, bases = build_dyt(case)
    with repro(describe(case)):
        run_dyt(case, inputs, dy, bases)


@pytest.mark.parametrize("case", _mod_cases())
def test_modulate_fuzz(case):
    inputs, dh, dr, bases = build_mod(case)
    with repro(describe(case)):
        run_mod(case, inputs, dh, dr, bases)


# --------------------------------------------------------------------------------------------------
# Signature churn: one shape, many signatures, interleaved.
# --------------------------------------------------------------------------------------------------

# What a near miss changes: mostly strides alone (dtypes and flags kept, so the cached launch
# configuration would still fit and only a stale in-place walk would read the wrong elements), or
# one other fact of the signature.
MUTATIONS = ["layout", "layout", "layout", "requires_grad", "requires_grad", "grad_mode", "param", "dtype", "any"]


def _mutate(rng: random.Random, case, new_id: str):
    """A near miss of `case`, the shape kept: its strides only, its requires_grad pattern, its grad
    mode, one parameter (form, layout, dtype or presence), x's dtype, or any one or two choices."""
    fresh = draw_dyt(rng, new_id, case.shape, case.channels_last) if isinstance(case, DytCase) \
        else draw_mod(rng, new_id, case.shape)
    mod = isinstance(case, ModCase)
    kind = rng.choice(MUTATIONS)
    if kind == "layout":
        names = rng.sample(["x_layout", "mod_layouts", "residual_layout"] if mod else ["x_layout", "dy_layout"],
                           rng.choice([1, 2]))
    elif kind == "param":
        names = [rng.choice(["alpha", "weight", "bias"])]
    elif kind == "any":
        names = [f.name for f in dataclasses.fields(case) if f.name not in ("id", "seed", "shape", "channels_last")]
        if mod:   # residual/gate presence and the grad names hang together: redrawn together
            names = [f for f in names if f not in ("residual_layout", "dr_layout", "mods")] + ["residual", "mods"]
        names = rng.sample(names, rng.choice([1, 2]))
    else:
        names = [kind]
    changes = {"id": new_id, "seed": rng.getrandbits(48)}
    for name in names:
        if name == "residual":
            changes.update(residual_layout=fresh.residual_layout, dr_layout=fresh.dr_layout, mods=fresh.mods,
                           requires_grad=fresh.requires_grad)
        elif name == "mods":   # shift's and scale's modes and layouts; gate (present or not) kept
            changes["mods"] = tuple(fresh.mods[:2]) + tuple(case.mods[2:])
        elif name == "mod_layouts":   # the same modes, other strides
            B, L, D = case.shape
            changes["mods"] = tuple((n, m, draw_layout(rng, MOD_MODES[m](B, L, D))) for n, m, _ in case.mods)
        elif name == "residual_layout":
            if case.residual_layout is not None:
                changes["residual_layout"] = draw_layout(rng, case.shape)
        else:
            changes[name] = getattr(fresh, name)
    out = dataclasses.replace(case, **changes)
    # requires_grad names only tensors the case passes
    passed = {"x"} | ({"alpha"} if out.alpha.form != "float" else set()) \
        | ({"weight"} if out.weight else set()) | ({"bias"} if out.bias else set())
    if mod:
        passed |= ({"residual"} if out.residual_layout else set()) | {n for n, _, _ in out.mods}
    if kind == "requires_grad" and set(out.requires_grad) == set(case.requires_grad):   # flip one bit at least
        flip = rng.choice(sorted(passed))
        out = dataclasses.replace(out, requires_grad=tuple(set(out.requires_grad) ^ {flip}))
    return dataclasses.replace(out, requires_grad=tuple(sorted(n for n in out.requires_grad if n in passed)))


def _channel_flip(rng: random.Random, case: DytCase, new_id: str) -> DytCase | None:
    """The same x shape read with the other channels_last flag (another channel count): a cached
    signature of one flag must never serve the other."""
    if len(case.shape) < 2:
        return None
    fresh = draw_dyt(rng, new_id, case.shape, not case.channels_last)
    return fresh


def _sequence(index: int):
    rng, cid = _case_rng("seq", index)
    op = "dyt" if index % 2 == 0 else "mod"
    first = draw_dyt(rng, f"{cid}-v0") if op == "dyt" else draw_mod(rng, f"{cid}-v0")
    while math.prod(first.shape) == 0 or math.prod(first.shape) > 512:   # a shape with elements to get wrong
        first = draw_dyt(rng, f"{cid}-v0") if op == "dyt" else draw_mod(rng, f"{cid}-v0")
    if rng.random() < 0.6:
        # plain tensors: the first signature is remembered (its arguments pass the checks unchanged)
        # and its launches read every tensor in place, the walk a stale hit would reuse
        plain = lambda p: p and dataclasses.replace(p, layout=("contiguous",))  # noqa: E731
        alpha = dataclasses.replace(first.alpha, layout=("contiguous",),
                                    form=first.alpha.form if first.alpha.form in ("(1,)", "channel") else "(1,)")
        first = dataclasses.replace(first, x_layout=("contiguous",), alpha=alpha, weight=plain(first.weight),
                                    bias=plain(first.bias), **(
            {"residual_layout": ("contiguous",)} if getattr(first, "residual_layout", None) else {}))
    variants, count = [first], LONG_SEQ_VARIANTS if index % 5 == 4 else SEQ_VARIANTS
    for v in range(1, count):
        new_id = f"{cid}-v{v}"
        flip = op == "dyt" and rng.random() < 0.2 and _channel_flip(rng, variants[0], new_id)
        variants.append(flip or _mutate(rng, rng.choice(variants), new_id))
    # each variant 2-3 times; a repeat reuses the first call's tensors ("same": bitwise the first
    # result) or builds new ones in the same layout ("lookalike": new values, maybe a new offset)
    schedule = [(v, r) for v in range(count) for r in range(rng.choice([2, 2, 3]))]
    rng.shuffle(schedule)
    calls = []
    for v, r in schedule:
        how = "first" if r == 0 else rng.choice(["same", "lookalike"])
        calls.append((v, how, rng.getrandbits(32)))
    return cid, variants, calls


def _fix_order(calls):
    """Within each variant, the first occurrence is its 'first' call (the shuffle may have put a repeat first)."""
    seen, out = set(), []
    for v, how, s in calls:
        out.append((v, "first" if v not in seen else (how if how != "first" else "same"), s))
        seen.add(v)
    return out


def _seq_params():
    out = []
    for i in range(N_SEQ):
        cid, variants, calls = _sequence(i)
        out.append(pytest.param(i, id=cid))
    return out


def _bitwise_same(first: dict, again: dict, what: str) -> None:
    assert sorted(first) == sorted(again), f"{what}: outputs {sorted(again)}, first call {sorted(first)}"
    for k in first:
        a, b = first[k].detach(), again[k].detach()
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {k} {b.dtype}{tuple(b.shape)} vs {a.dtype}{tuple(a.shape)}"
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), \
            f"{what}: {k} differs bitwise from the first call with the same tensors " \
            f"(max diff {max_abs_err(a, b):.3e})"


@pytest.mark.parametrize("index", _seq_params())
def test_signature_churn(index):
    """Calls of one shape whose signatures differ in strides, offsets, dtypes, optional arguments,
    requires_grad, grad mode or channels_last, interleaved: each call against float64, and a repeat
    with the very same tensors bitwise equal to the first."""
    cid, variants, calls = _sequence(index)
    calls = _fix_order(calls)
    functional._VALIDATED.clear()
    functional._VALIDATED_MOD.clear()
    built, results = {}, {}
    for step, (v, how, seed) in enumerate(calls):
        case = variants[v]
        if how == "lookalike":
            rng = random.Random(seed)
            fields = {}
            for name in [f for f in ("x_layout", "dy_layout", "dh_layout", "residual_layout", "dr_layout")
                         if hasattr(case, f) and getattr(case, f) is not None]:
                fields[name] = relocate(getattr(case, name), rng)
            case = dataclasses.replace(case, **fields)
        history = " -> ".join(f"{variants[c].id}[{h}]" for c, h, _ in calls[:step + 1])
        with repro(f"call {step} ({how}) of {history}\n{describe(case)}"):
            if how == "same":
                args = built[v]
            else:
                args = (build_dyt if isinstance(case, DytCase) else build_mod)(case, seed if how != "first" else None)
            out = (run_dyt if isinstance(case, DytCase) else run_mod)(case, *args)
            if how == "first":
                built[v], results[v] = args, out
            elif how == "same":
                _bitwise_same(results[v], out, f"variant {v}")


def test_churn_sequences_cover_the_space():
    """The sequences really hold what test_signature_churn promises: repeats of both kinds, shapes
    shared by signatures differing in each of strides, dtype, requires_grad and grad mode."""
    seen = {"same": False, "lookalike": False, "layout": False, "dtype": False, "requires_grad": False,
            "grad_mode": False, "channels_last flip": False, "weight presence": False}
    for i in range(N_SEQ):
        _, variants, calls = _sequence(i)
        for _, how, _ in _fix_order(calls):
            if how != "first":
                seen[how] = True
        for a in variants:
            for b in variants:
                if a is b:
                    continue
                seen["layout"] |= a.x_layout != b.x_layout
                seen["dtype"] |= a.dtype != b.dtype
                seen["requires_grad"] |= a.requires_grad != b.requires_grad
                seen["grad_mode"] |= a.grad_mode != b.grad_mode
                seen["weight presence"] |= (a.weight is None) != (b.weight is None)
                if isinstance(a, DytCase):
                    seen["channels_last flip"] |= a.channels_last != b.channels_last
    seen["more signatures of one shape than a bucket holds"] = any(
        len(_sequence(i)[1]) > functional._VALIDATED.PER_SHAPE for i in range(N_SEQ))
    missing = [k for k, ok in seen.items() if not ok]
    assert not missing, f"DYT_FUZZ_SEED={SEED}: no churn sequence has {missing}"


def test_single_cases_cover_the_space():
    dcases = [p.values[0] for p in _dyt_cases()]
    mcases = [p.values[0] for p in _mod_cases()]
    seen = {
        "ranks 1-4": {len(c.shape) for c in dcases} == {1, 2, 3, 4},
        "channels first": any(not c.channels_last for c in dcases),
        "every dtype": {c.dtype for c in dcases} == set(DTYPES) == {c.dtype for c in mcases},
        "every x layout": {c.x_layout[0] for c in dcases} >= {"contiguous", "transposed", "step2", "expanded",
                                                             "narrow", "channels_last"},
        "every alpha form": {c.alpha.form for c in dcases} == {"float", "0d", "(1,)", "(1,1)", "channel"},
        "no weight, no bias": any(c.weight is None for c in dcases) and any(c.bias is None for c in mcases),
        "every modulation mode": {m for c in mcases for _, m, _ in c.mods} == set(MOD_MODES),
        "residual with and without gate": {len(c.mods) for c in mcases if c.residual_layout} == {2, 3},
        "no residual": any(c.residual_layout is None for c in mcases),
        "a 0 size": any(0 in c.shape for c in dcases + mcases),
        "every grad mode": {c.grad_mode for c in dcases + mcases} == set(GRAD_MODES),
        "partial requires_grad": any(0 < len(c.requires_grad) < 3 for c in dcases + mcases),
        "no requires_grad": any(not c.requires_grad for c in dcases + mcases),
        "a float64 parameter": any(p is not None and p.dtype == "fp64"
                                   for c in dcases + mcases for p in (c.alpha, c.weight, c.bias)),
    }
    missing = [k for k, ok in seen.items() if not ok]
    assert not missing, f"DYT_FUZZ_SEED={SEED} draws no single case with: {missing}"


# --------------------------------------------------------------------------------------------------
# One tensor for two arguments; gradients accumulated into .grad.
# --------------------------------------------------------------------------------------------------

# Aliased calls are compared with a hand-written float64 formula (the float64_checks helpers take
# one tensor per argument). Values are O(1); every output or gradient is a few fp32 operations on
# them, or a sum of at most n of those (n: elements of x). Bound: 2x the same-dtype PyTorch error
# (the output dtype's rounding, as in helpers.assert_close_3way) plus one rounding into the output
# dtype plus, per summed term, the fp32 tanh form's error and ~8 fp32 roundings, growing like
# sqrt(n) (random-sign rounding; helpers.reduction_atol), at the result's scale (1 + max|ref|).
# A wrong, missing or doubled term is O(0.1) or more.
def alias_atol(ref64, dtype, n_terms: int) -> float:
    scale = 1 + max_abs(ref64)
    return eps(dtype) * max_abs(ref64) + math.sqrt(max(n_terms, 1)) * (tanh_abs_err(dtype) + 8 * FP32_EPS) * scale


def _dyt64(x, alpha, weight=None, bias=None):
    y = torch.tanh((alpha.reshape(()) if alpha.numel() == 1 else alpha) * x)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _mod64(x, alpha, shift, scale, weight=None, bias=None, residual=None, gate=None):
    per = lambda m: m.unsqueeze(1) if m.dim() == 2 else m  # noqa: E731
    r = x if residual is None else residual + (x if gate is None else per(gate) * x)
    n = _dyt64(r, alpha, weight, bias)
    h = n * (1 + per(scale)) + per(shift)
    return h if residual is None else (h, r)


# name -> (op, the distinct tensors {key: shape kind}, the call's arguments {arg: key})
DYT_ALIASES = {
    "weight-is-bias": ({"x": "X", "a": "1", "w": "C"}, dict(alpha="a", weight="w", bias="w")),
    "alpha-is-weight": ({"x": "X", "w": "C", "b": "C"}, dict(alpha="w", weight="w", bias="b")),
    "alpha-is-bias": ({"x": "X", "w": "C", "b": "C"}, dict(alpha="b", weight="w", bias="b")),
    "alpha-weight-bias-one": ({"x": "X", "w": "C"}, dict(alpha="w", weight="w", bias="w")),
    "x-is-weight": ({"v": "C", "a": "1", "b": "C"}, dict(x="v", alpha="a", weight="v", bias="b")),
    "x-is-alpha": ({"v": "C", "w": "C"}, dict(x="v", alpha="v", weight="w")),
}
MOD_ALIASES = {
    "shift-is-scale": ({"x": "X", "a": "1", "m": "M"}, dict(shift="m", scale="m")),
    "residual-is-x": ({"x": "X", "a": "1", "m": "M", "s": "M"}, dict(shift="m", scale="s", residual="x")),
    "residual-is-x-gate-is-shift": ({"x": "X", "a": "1", "m": "M", "s": "M"},
                                    dict(shift="m", scale="s", residual="x", gate="m")),
    "gate-is-scale": ({"x": "X", "r": "X", "a": "1", "m": "M", "s": "M"},
                      dict(shift="m", scale="s", residual="r", gate="s")),
    "shift-is-x": ({"x": "X", "a": "1", "s": "M"}, dict(shift="x", scale="s")),
    "scale-is-residual": ({"x": "X", "r": "X", "a": "1", "m": "M", "g": "M"},
                          dict(shift="m", scale="r", residual="r", gate="g")),
    "weight-is-bias-is-alpha": ({"x": "X", "w": "D", "m": "M", "s": "M"}, dict(alpha="w", shift="m", scale="s",
                                                                              weight="w", bias="w")),
    "gate-is-shift-is-scale": ({"x": "X", "r": "X", "a": "1", "m": "M"},
                               dict(shift="m", scale="m", residual="r", gate="m")),
}


@dataclasses.dataclass(frozen=True)
class AliasCase:
    id: str
    seed: int
    op: str
    alias: str
    dtype: str
    shape: tuple
    mod_mode: str           # for "M" tensors: BD, B1D or BLD ("shift-is-x" forces BLD)
    accumulate: bool        # two forward+backward passes into .grad instead of torch.autograd.grad


def _alias_cases():
    out = []
    for i in range(N_ALIAS):
        rng, cid = _case_rng("alias", i)
        op = "dyt" if i % 3 == 0 else "mod"
        alias = rng.choice(list(DYT_ALIASES if op == "dyt" else MOD_ALIASES))
        dtype = rng.choice(["fp32", "fp32", "bf16", "fp16"])
        if op == "dyt":
            C = rng.choice([c for c in CHANNEL_SIZES if c > 1])
            shape = (C,) if alias.startswith("x-is") else tuple(_fit([rng.choice(OTHER_SIZES), C], 1))
        else:
            shape = tuple(_fit([rng.choice([1, 2, 3]), rng.choice([1, 3, 5, 16]), rng.choice(CHANNEL_SIZES)], 2))
        mode = "BLD" if alias in ("shift-is-x", "scale-is-residual") else rng.choice(list(MOD_MODES))
        case = AliasCase(f"{cid}-{alias}", rng.getrandbits(48), op, alias, dtype, shape, mode, rng.random() < 0.4)
        out.append(pytest.param(case, id=case.id))
    return out


def _alias_run(case: AliasCase, dtype, fn, base: dict):
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in base.items()}
    distinct, args = (DYT_ALIASES if case.op == "dyt" else MOD_ALIASES)[case.alias]
    kw = {a: leaves[k] for a, k in args.items()}
    if "x" not in kw:
        kw["x"] = leaves["x"]
    if "alpha" not in kw:
        kw["alpha"] = leaves["a"] if "a" in leaves else 0.7
    gen = torch.Generator().manual_seed(case.seed + 1)
    passes = 2 if case.accumulate else 1
    outs = None
    for _ in range(passes):
        outs = fn(**kw)
        outs = outs if isinstance(outs, tuple) else (outs,)
        # drawn in the case's dtype, so every run sees the same upstream values
        douts = [torch.randn(o.shape, generator=gen).to(DTYPES[case.dtype]).to(device=DEVICE, dtype=dtype)
                 for o in outs]
        if case.accumulate:
            torch.autograd.backward(outs, douts)
        else:
            grads = torch.autograd.grad(outs, list(leaves.values()), douts, allow_unused=True)
    if case.accumulate:
        grads = [v.grad for v in leaves.values()]
    return outs, dict(zip(leaves, grads)), leaves


@pytest.mark.parametrize("case", _alias_cases())
def test_aliased_arguments(case):
    """One tensor passed as two (or three) arguments, against float64 autograd of the same expression;
    with `accumulate`, .grad after two passes (a gradient handed to two leaves as one tensor, then
    accumulated into in place, would double-count)."""
    distinct, _ = (DYT_ALIASES if case.op == "dyt" else MOD_ALIASES)[case.alias]
    gen = torch.Generator().manual_seed(case.seed)
    if case.op == "dyt":
        C = case.shape[-1]
        sizes = {"X": case.shape, "C": (C,), "1": (1,)}
    else:
        B, L, D = case.shape
        sizes = {"X": case.shape, "D": (D,), "1": (1,), "M": MOD_MODES[case.mod_mode](B, L, D)}
    base = {}
    for k, kind in distinct.items():
        v = torch.randn(sizes[kind], generator=gen)
        if kind in ("1",) or k in ("w",):      # alphas and weights around +-0.7 / 1, never ~0
            v = 0.7 + 0.3 * v
        base[k] = v.to(device=DEVICE, dtype=DTYPES[case.dtype])   # the op's values exactly, so float64 copies are the same numbers
    dtype = DTYPES[case.dtype]
    snapshot = {k: v.clone() for k, v in base.items()}
    with repro(f"alias case {case} (DYT_FUZZ_SEED={SEED})"):
        with use_backend(BACKEND), poisoned_empty():
            outs, grads, leaves = _alias_run(case, dtype, dyt if case.op == "dyt" else dyt_modulate, base)
        formula = _dyt64 if case.op == "dyt" else _mod64
        outs64, grads64, _ = _alias_run(case, torch.float64, formula, base)
        outsn, gradsn, _ = _alias_run(case, dtype, formula, base)
        n = math.prod(case.shape)
        for i, (o, o64, on) in enumerate(zip(outs, outs64, outsn)):
            for leaf in leaves.values():
                assert_fresh(o, leaf)
            assert_close_3way(f"output {i}", o, o64, on.to(dtype), alias_atol(o64, dtype, 1))
        for k, g64 in grads64.items():
            if g64 is None:
                assert grads[k] is None, f"d{k}: expected no gradient"
                continue
            assert grads[k] is not None, f"d{k}: missing"
            assert_close_3way(f"d{k}", grads[k], g64, gradsn[k], alias_atol(g64, dtype, n))
        for k, v in base.items():
            assert torch.equal(v, snapshot[k]), f"{k} was modified"
