"""The benchmarked implementations, one registry entry each; a new provider is one `register(...)`.

Three ops, each with its own inputs (built by `make_inputs`, every tensor a leaf that requires grad):

    norm       x (M, N), alpha (1,), weight (N,), bias (N,)        -> y
    adaln      x (B, L, D), alpha (1,), shift, scale (B, D)        -> h
    adaln_res  adaln's plus residual (B, L, D), gate (B, D)        -> (h, r)

and one opt-in op (`--ops qknorm`; not in a default run, whose GPU time budget it would strain):

    qknorm     x a (B, H, L, d) head view of a fused (B, L, 3*H*d) qkv projection (strides
               (L*3*H*d, d, 3*H*d, 1)), alpha (1,), weight, bias (d,) -> y: the QK-norm of timm's ViT
               and FLUX, which dyt_kernels reads in place (ops/dyt.row_levels)

A provider's `build(inputs, ctx)` returns a closure that runs its forward on those inputs and
returns its outputs; the harness wraps it for fwd / bwd / fwd_bwd. `unavailable(ctx)` returns why it
cannot run here (None if it can), so a skipped row records the reason.

The eager baselines are the formulas a model would write; the compiled ones are the same formulas
under torch.compile (static shapes, as a fixed-resolution model compiles them). adaLN uses no affine
weight/bias, as PixArt-alpha and FLUX do, and LayerNorm eps 1e-6.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

OPS = ("norm", "adaln", "adaln_res")
EXTRA_OPS = ("qknorm",)
ALL_OPS = OPS + EXTRA_OPS
EPS = 1e-6


@dataclass
class Context:
    device: torch.device
    compile_backend: str = "inductor"
    _compiled: Dict[str, Callable] = field(default_factory=dict)

    def compiled(self, fn: Callable) -> Callable:
        # One torch.compile wrapper per formula: its cache then holds one entry per shape/dtype.
        key = fn.__qualname__
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, dynamic=False, backend=self.compile_backend)
        return self._compiled[key]


@dataclass(frozen=True)
class Provider:
    name: str
    op: str
    label: str
    build: Callable[[dict, Context], Callable[[], object]]
    ours: bool = False
    unavailable: Callable[[Context], Optional[str]] = lambda ctx: None


REGISTRY: Dict[tuple, Provider] = {}


def register(p: Provider) -> Provider:
    if p.op not in ALL_OPS:
        raise ValueError(f"provider {p.name}: op must be one of {ALL_OPS}, got {p.op!r}")
    if (p.op, p.name) in REGISTRY:
        raise ValueError(f"provider {p.name} registered twice for op {p.op}")
    REGISTRY[(p.op, p.name)] = p
    return p


def providers_for(op: str) -> list:
    return [p for p in REGISTRY.values() if p.op == op]


def make_inputs(op: str, shape: tuple, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Fresh random leaves for one op; alpha and the per-channel/per-sample tensors share x's dtype,
    as in a module converted with .to(dtype)."""
    # Drawn on the device: the production shapes are hundreds of MB, slow to draw on a CPU.
    g = torch.Generator(device=device).manual_seed(seed)

    def leaf(*size, scale=1.0, offset=0.0):
        t = torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale).add_(offset)
        return t.to(dtype).requires_grad_(True)

    if op == "norm":
        M, N = shape
        return {"x": leaf(M, N), "alpha": leaf(1, scale=0.05, offset=0.5),
                "weight": leaf(N, scale=0.1, offset=1.0), "bias": leaf(N, scale=0.1)}
    if op == "qknorm":
        B, L, H, d = shape
        qkv = leaf(B, L, 3 * H * d).detach()
        q = qkv.view(B, L, 3, H, d).permute(2, 0, 3, 1, 4)[0]   # a view of qkv's storage, as a leaf
        return {"x": q.detach().requires_grad_(True), "alpha": leaf(1, scale=0.05, offset=0.5),
                "weight": leaf(d, scale=0.1, offset=1.0), "bias": leaf(d, scale=0.1)}
    B, L, D = shape
    out = {"x": leaf(B, L, D), "alpha": leaf(1, scale=0.05, offset=0.5),
           "shift": leaf(B, D, scale=0.1), "scale": leaf(B, D, scale=0.1)}
    if op == "adaln_res":
        out["residual"] = leaf(B, L, D)
        out["gate"] = leaf(B, D, scale=0.1, offset=1.0)
    return out


# ----- formulas (module level, so torch.compile caches them by code object) ----------------------

def dyt_formula(x, alpha, weight, bias):
    return weight * torch.tanh(alpha * x) + bias


def ln_modulate(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def dyt_modulate_formula(x, alpha, shift, scale):
    return torch.tanh(alpha * x) * (1 + scale[:, None]) + shift[:, None]


def ln_modulate_res(x, residual, gate, shift, scale):
    r = residual + gate[:, None] * x
    return ln_modulate(r, shift, scale), r


def dyt_modulate_res(x, residual, gate, alpha, shift, scale):
    r = residual + gate[:, None] * x
    return dyt_modulate_formula(r, alpha, shift, scale), r


# ----- availability -----------------------------------------------------------------------------

def _liger_dyt():
    """Liger-Kernel's DyT autograd function (what its LigerDyT module applies): x, alpha, gamma, beta."""
    try:
        from liger_kernel.ops.dyt import LigerDyTFunction
    except ImportError:
        from liger_kernel.ops import LigerDyTFunction  # raises ImportError when Liger is absent
    return LigerDyTFunction.apply


def _liger_unavailable(ctx: Context) -> Optional[str]:
    try:
        _liger_dyt()
    except Exception as e:  # an import can fail in many ways (missing triton backend, version skew)
        return f"liger_kernel not importable: {type(e).__name__}: {e}"
    if ctx.device.type != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    return None


def _rms_unavailable(ctx: Context) -> Optional[str]:
    return None if hasattr(F, "rms_norm") else f"torch {torch.__version__} has no F.rms_norm"


# ----- registry ---------------------------------------------------------------------------------
# build(i, ctx): i is make_inputs' dict; the closure it returns is what gets timed.

def _layernorm(i, ctx):
    return lambda: F.layer_norm(i["x"], (i["x"].shape[-1],), i["weight"], i["bias"], EPS)


def _rmsnorm(i, ctx):
    return lambda: F.rms_norm(i["x"], (i["x"].shape[-1],), i["weight"], EPS)


def _dyt_eager(i, ctx, f=dyt_formula):
    return lambda: f(i["x"], i["alpha"], i["weight"], i["bias"])


def _liger(i, ctx):
    apply = _liger_dyt()
    return lambda: apply(i["x"], i["alpha"], i["weight"], i["bias"])


def _ours_dyt(i, ctx):
    from dyt_kernels import dyt
    return lambda: dyt(i["x"], i["alpha"], i["weight"], i["bias"])


def _ln_mod(i, ctx, f=ln_modulate):
    return lambda: f(i["x"], i["shift"], i["scale"])


def _dyt_mod(i, ctx, f=dyt_modulate_formula):
    return lambda: f(i["x"], i["alpha"], i["shift"], i["scale"])


def _ours_adaln(i, ctx):
    from dyt_kernels import dyt_modulate
    return lambda: dyt_modulate(i["x"], i["alpha"], i["shift"], i["scale"])


def _ln_mod_res(i, ctx, f=ln_modulate_res):
    return lambda: f(i["x"], i["residual"], i["gate"], i["shift"], i["scale"])


def _dyt_mod_res(i, ctx, f=dyt_modulate_res):
    return lambda: f(i["x"], i["residual"], i["gate"], i["alpha"], i["shift"], i["scale"])


def _ours_adaln_res(i, ctx):
    from dyt_kernels import dyt_modulate
    return lambda: dyt_modulate(i["x"], i["alpha"], i["shift"], i["scale"], residual=i["residual"], gate=i["gate"])


def _compiled(builder, formula):
    return lambda i, ctx: builder(i, ctx, ctx.compiled(formula))


for _p in (
    Provider("torch_layernorm", "norm", "LayerNorm (torch)", _layernorm),
    Provider("torch_rmsnorm", "norm", "RMSNorm (torch)", _rmsnorm, unavailable=_rms_unavailable),
    Provider("dyt_eager", "norm", "DyT eager", _dyt_eager),
    Provider("dyt_compile", "norm", "DyT compiled", _compiled(_dyt_eager, dyt_formula)),
    Provider("liger_dyt", "norm", "LigerDyT", _liger, unavailable=_liger_unavailable),
    Provider("ours", "norm", "dyt_kernels.dyt", _ours_dyt, ours=True),
    Provider("torch_layernorm", "qknorm", "LayerNorm (torch)", _layernorm),
    Provider("torch_rmsnorm", "qknorm", "RMSNorm (torch)", _rmsnorm, unavailable=_rms_unavailable),
    Provider("dyt_eager", "qknorm", "DyT eager", _dyt_eager),
    Provider("dyt_compile", "qknorm", "DyT compiled", _compiled(_dyt_eager, dyt_formula)),
    Provider("ours", "qknorm", "dyt_kernels.dyt", _ours_dyt, ours=True),
    Provider("ln_mod_eager", "adaln", "LN+modulate eager", _ln_mod),
    Provider("ln_mod_compile", "adaln", "LN+modulate compiled", _compiled(_ln_mod, ln_modulate)),
    Provider("dyt_mod_eager", "adaln", "DyT+modulate eager", _dyt_mod),
    Provider("dyt_mod_compile", "adaln", "DyT+modulate compiled", _compiled(_dyt_mod, dyt_modulate_formula)),
    Provider("ours", "adaln", "dyt_kernels.dyt_modulate", _ours_adaln, ours=True),
    Provider("ln_mod_eager", "adaln_res", "residual+LN+modulate eager", _ln_mod_res),
    Provider("ln_mod_compile", "adaln_res", "residual+LN+modulate compiled", _compiled(_ln_mod_res, ln_modulate_res)),
    Provider("dyt_mod_eager", "adaln_res", "residual+DyT+modulate eager", _dyt_mod_res),
    Provider("dyt_mod_compile", "adaln_res", "residual+DyT+modulate compiled",
             _compiled(_dyt_mod_res, dyt_modulate_res)),
    Provider("ours", "adaln_res", "dyt_kernels.dyt_modulate(residual, gate)", _ours_adaln_res, ours=True),
):
    register(_p)
