"""Minimum bytes each benchmarked op must move through device memory: every input read once, every
output written once, nothing else (no saved statistics, no partial-sum buffers, no re-reads).

Achieved GB/s is reported over these counts, so a provider that re-reads x or writes an fp32 scratch
buffer shows up as lower GB/s rather than being credited for the extra traffic. The counts depend
only on the op, never on the provider: LayerNorm and RMSNorm rows use the DyT count (x, y, weight,
bias), which differs from their own minimum by one N-vector at most.

Pure functions of shapes and element sizes (bytes), so they can be checked by hand. Each returns
{tensor name: bytes}; `total` adds them up.

    norm      x (M, N), y (M, N); weight, bias (N,); alpha (1,)
              fwd  read x, alpha, weight, bias                write y
              bwd  read dy, x, alpha, weight                  write dx, dalpha, dweight, dbias
    adaln     x (B, L, D); shift, scale, gate (B, D) per sample; residual, h, r (B, L, D); alpha (1,)
              fwd  read x, [residual, gate], shift, scale, alpha     write h, [r]
              bwd  read dh, [dr], norm input (r, else x), [x, gate], scale, alpha
                   write dx, [dresidual], dshift, dscale, [dgate], dalpha

The kernel headers (dyt_kernels/ops/dyt.py) quote only the (M, N) streams, 2*M*N*s forward and
3*M*N*s backward; the per-channel vectors added here are a few KB. fwd_bwd is the two passes as a
training step runs them, so x is counted in both.
"""
from __future__ import annotations

from typing import Dict

MODES = ("fwd", "bwd", "fwd_bwd")

Traffic = Dict[str, int]


def total(traffic: Traffic) -> int:
    return sum(traffic.values())


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _merge(fwd: Traffic, bwd: Traffic) -> Traffic:
    out = {f"fwd.{k}": v for k, v in fwd.items()}
    out.update({f"bwd.{k}": v for k, v in bwd.items()})
    return out


def norm_traffic(mode: str, M: int, N: int, elem: int, *, param_elem: int | None = None,
                 alpha_elem: int | None = None) -> Traffic:
    """DyT y = weight*tanh(alpha*x) + bias over M rows of N channels, scalar alpha.

    elem: bytes per element of x/y/dy/dx; param_elem: of weight/bias and their grads (default elem);
    alpha_elem: of alpha and dalpha (default param_elem).
    """
    _check_mode(mode)
    p = elem if param_elem is None else param_elem
    a = p if alpha_elem is None else alpha_elem
    rows = M * N * elem
    fwd = {"x": rows, "alpha": a, "weight": N * p, "bias": N * p, "y": rows}
    bwd = {"dy": rows, "x": rows, "alpha": a, "weight": N * p,
           "dx": rows, "dalpha": a, "dweight": N * p, "dbias": N * p}
    return fwd if mode == "fwd" else bwd if mode == "bwd" else _merge(fwd, bwd)


def adaln_traffic(mode: str, B: int, L: int, D: int, elem: int, *, residual: bool = False, gate: bool = False,
                  mod_elem: int | None = None, alpha_elem: int | None = None) -> Traffic:
    """adaLN-modulated DyT (no affine, as in PixArt-alpha/FLUX), optionally with the gated residual.

    elem: bytes per element of the (B, L, D) tensors; mod_elem: of shift/scale/gate and their grads
    (default elem); alpha_elem: of alpha/dalpha (default mod_elem).
    """
    _check_mode(mode)
    if gate and not residual:
        raise ValueError("gate scales x before the residual add, so it needs residual=True")
    m = elem if mod_elem is None else mod_elem
    a = m if alpha_elem is None else alpha_elem
    act, vec = B * L * D * elem, B * D * m
    fwd = {"x": act, "shift": vec, "scale": vec, "alpha": a, "h": act}
    if residual:
        fwd.update({"residual": act, "r": act})
    if gate:
        fwd["gate"] = vec
    bwd = {"dh": act, "scale": vec, "alpha": a, "dx": act, "dshift": vec, "dscale": vec, "dalpha": a}
    if residual:
        # tanh needs r; with no gate dx is dresidual itself, one tensor written once.
        bwd.update({"dr": act, "r": act})
        if gate:
            bwd.update({"x": act, "gate": vec, "dresidual": act, "dgate": vec})
    else:
        bwd["x"] = act
    return fwd if mode == "fwd" else bwd if mode == "bwd" else _merge(fwd, bwd)


def copy_traffic(numel: int, elem: int) -> Traffic:
    """y.copy_(x): read x, write y."""
    return {"x": numel * elem, "y": numel * elem}


def norm_bytes(mode: str, M: int, N: int, elem: int, **kw) -> int:
    return total(norm_traffic(mode, M, N, elem, **kw))


def adaln_bytes(mode: str, B: int, L: int, D: int, elem: int, **kw) -> int:
    return total(adaln_traffic(mode, B, L, D, elem, **kw))


def copy_bytes(numel: int, elem: int) -> int:
    return total(copy_traffic(numel, elem))
