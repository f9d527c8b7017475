"""Plain-PyTorch DyT: the CPU backend and the tests' oracle.

Everything computes in fp32 (float64 when given float64, which is how the tests build the oracle; and
dyt_modulate's residual add and the gradient it passes on, for a float64 residual stream) and returns
each result in its input's dtype. The backward functions write out the VJPs of
docs/DESIGN.md explicitly, so the kernels and these functions implement the same formulas; gradcheck on
`dyt`'s autograd path proves the formulas themselves.

    forward   t = tanh(a*x)        y = w*t + b
    backward  g = dy*w*(1 - t^2)   dx = a*g   dw = sum dy*t   db = sum dy   da = sum g*x

adaLN-modulated DyT (x: (B, L, D); shift/scale/gate: (B, D), (B, 1, D) or (B, L, D)):

    r = residual + gate*x          (only with a residual; gate optional)
    n = w*tanh(a*r) + b            h = n*(1 + scale) + shift
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype: t itself when it already is, never a no-op `.to`.

    dyt and dyt_modulate are the forward bodies of autograd Functions under torch.compile
    (autograd.py). A no-op `.to` gives back the very tensor it was given, and torch 2.11's dynamo
    misroutes the gradient of a Function output that is also an intermediate of its forward (there,
    `r.to(fp32)` inside the norm, with r returned): silently zero gradients (pytorch/pytorch#180642).
    Casting through here keeps every node of those forwards a distinct tensor.
    """
    return t if t.dtype == dtype else t.to(dtype)


def _up(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else cast(t, dtype)


def channel_view(p: Tensor, x: Tensor, channels_last: bool) -> Tensor:
    """A per-channel vector shaped to broadcast against x (channel = last dim, or dim 1)."""
    if channels_last or p.numel() == 1:
        return p.reshape(-1) if p.numel() != 1 else p.reshape(())
    return p.reshape(-1, *([1] * (x.dim() - 2)))


def channel_sum(t: Tensor, channels_last: bool) -> Tensor:
    """Sum over every dim but the channel dim."""
    if not channels_last:
        t = t.movedim(1, -1)
    if t.numel() == 0:  # reshape(-1, 0) cannot infer the row count; a sum of nothing is 0
        return t.new_zeros(t.shape[-1])
    return t.reshape(-1, t.shape[-1]).sum(0)


def _alpha_grad(g: Tensor, alpha: Tensor, channels_last: bool) -> Tensor:
    if alpha.numel() == 1:
        return g.sum().reshape(alpha.shape)
    return channel_sum(g, channels_last).reshape(alpha.shape)


def dyt(x: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
        channels_last: bool = True) -> Tensor:
    """y = weight * tanh(alpha * x) + bias, in fp32 (fp64 for fp64 input), returned in x.dtype."""
    ct = compute_dtype(x.dtype)
    y = torch.tanh(channel_view(cast(alpha, ct), x, channels_last) * cast(x, ct))
    if weight is not None:
        y = y * channel_view(cast(weight, ct), x, channels_last)
    if bias is not None:
        y = y + channel_view(cast(bias, ct), x, channels_last)
    return cast(y, x.dtype)


def dyt_backward(dy: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None,
                 channels_last: bool = True):
    """Returns (dx, dalpha, dweight, dbias); dweight/dbias are None when weight/bias are."""
    ct = compute_dtype(x.dtype)
    xc, dyc = x.to(ct), dy.to(ct)
    a = channel_view(alpha.to(ct), x, channels_last)
    t = torch.tanh(a * xc)
    g = dyc * (1 - t * t)
    if weight is not None:
        g = g * channel_view(weight.to(ct), x, channels_last)
    dx = (a * g).to(x.dtype)
    dalpha = _alpha_grad(g * xc, alpha, channels_last).to(alpha.dtype)
    dweight = None if weight is None else channel_sum(dyc * t, channels_last).to(weight.dtype)
    dbias = None if bias is None else channel_sum(dyc, channels_last).to(bias.dtype)
    return dx, dalpha, dweight, dbias


def as_modulation(m: Tensor, B: int, D: int) -> Tensor:
    """(B, D) or (B, 1, D) -> (B, 1, D); (B, L, D) unchanged."""
    return m.reshape(B, 1, D) if m.dim() == 2 else m


def per_token(m: Tensor, L: int) -> bool:
    """Whether a modulation tensor holds one vector per token (B, L, D) rather than per sample."""
    return m.dim() == 3 and m.shape[1] == L and L != 1


def _reduce_like(g: Tensor, m: Tensor) -> Tensor:
    """A (B, L, D) gradient for modulation tensor m: itself if m is per token, else summed over L -> (B, D)."""
    return g if per_token(m, g.shape[1]) else g.sum(1)


def dyt_modulate(x: Tensor, alpha: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                 bias: Tensor | None = None, residual: Tensor | None = None, gate: Tensor | None = None):
    """h = dyt(r) * (1 + scale) + shift with r = residual + gate * x; returns h, or (h, r) with a residual.

    h comes back in x.dtype, r in residual.dtype.
    """
    B, _, D = x.shape
    ct = compute_dtype(x.dtype)
    r = cast(x, ct)
    r_wide = None
    if residual is not None:
        if residual.dtype == torch.float64 and ct != torch.float64:
            # A float64 residual stream beside a narrower x: the add in float64, as eager
            # `residual + gate * x` keeps it, and r is that sum; the norm reads it in ct.
            r_wide = cast(x, torch.float64)
            if gate is not None:
                r_wide = r_wide * cast(as_modulation(gate, B, D), torch.float64)
            r_wide = residual + r_wide
            r = cast(r_wide, ct)
        else:
            if gate is not None:
                r = r * cast(as_modulation(gate, B, D), ct)
            # Round r to its storage dtype before the norm, as an unfused block would.
            r = cast(cast(cast(residual, ct) + r, residual.dtype), ct)
    n = dyt(r, cast(alpha, ct), _up(weight, ct), _up(bias, ct))
    h = n * (1 + cast(as_modulation(scale, B, D), ct)) + cast(as_modulation(shift, B, D), ct)
    if residual is None:
        return cast(h, x.dtype)
    return cast(h, x.dtype), cast(r, residual.dtype) if r_wide is None else r_wide


def dyt_modulate_backward(dh: Tensor, dr: Tensor | None, x: Tensor, r: Tensor, alpha: Tensor, scale: Tensor,
                          weight: Tensor | None, bias: Tensor | None, has_residual: bool, gate: Tensor | None,
                          shift_per_token: bool):
    """VJP of dyt_modulate. r is the norm's input (x itself without a residual).

    Returns (dx, dresidual, dgate, dshift, dscale, dweight, dbias, dalpha), None for absent inputs.
    dshift is fp32 (B, D), or None when shift is per token (its gradient is dh itself). dscale and
    dgate are (B, D) sums for per-sample tensors, (B, L, D) otherwise, in their tensors' dtypes.
    """
    B, _, D = x.shape
    ct = compute_dtype(x.dtype)
    dhc, rc = dh.to(ct), r.to(ct)
    a = alpha.to(ct).reshape(-1) if alpha.numel() != 1 else alpha.to(ct).reshape(())
    t = torch.tanh(a * rc)
    n = t if weight is None else t * weight.to(ct)
    if bias is not None:
        n = n + bias.to(ct)
    dn = dhc * (1 + as_modulation(scale, B, D).to(ct))
    dshift = None if shift_per_token else dhc.sum(1)
    dscale = _reduce_like(dhc * n, scale).to(scale.dtype)
    dt = dn if weight is None else dn * weight.to(ct)
    dz = dt * (1 - t * t)
    dalpha = _alpha_grad(dz * rc, alpha, True).to(alpha.dtype)
    dweight = None if weight is None else channel_sum(dn * t, True).to(weight.dtype)
    dbias = None if bias is None else channel_sum(dn, True).to(bias.dtype)
    drc = a * dz
    if not has_residual:
        return drc.to(x.dtype), None, None, dshift, dscale, dweight, dbias, dalpha
    # A float64 residual stream (dyt_modulate's r_wide): the gradient reaching r, and what it passes
    # on to the residual, x and gate, in float64.
    rt = torch.float64 if r.dtype == torch.float64 else ct
    drc = drc.to(rt)
    if dr is not None:
        drc = drc + dr.to(rt)
    dx, dgate = drc, None
    if gate is not None:
        dx = drc * as_modulation(gate, B, D).to(rt)
        dgate = _reduce_like(drc * x.to(rt), gate).to(gate.dtype)
    return dx.to(x.dtype), drc.to(r.dtype), dgate, dshift, dscale, dweight, dbias, dalpha


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None = None,
                       bias: Tensor | None = None, *, residual: Tensor | None = None,
                       gate: Tensor | None = None, eps: float = 1e-6):
    """The LayerNorm twin of dyt_modulate, in plain PyTorch autograd (models switch norms with it).

    Outputs come back in dyt_modulate's dtypes (h in x's, r in residual's); weight and bias are used
    in the norm input's dtype, as F.layer_norm requires. Every cast is a no-op when dtypes agree.
    """
    B, _, D = x.shape
    r = x
    if residual is not None:
        r = residual + (x if gate is None else as_modulation(gate, B, D) * x)
        r = r.to(residual.dtype)
    n = torch.nn.functional.layer_norm(r, (D,), _up(weight, r.dtype), _up(bias, r.dtype), eps)
    h = (n * (1 + as_modulation(scale, B, D)) + as_modulation(shift, B, D)).to(x.dtype)
    return h if residual is None else (h, r)


def dyt_modulate_grads(dh: Tensor, dr: Tensor | None, x: Tensor, r: Tensor, alpha: Tensor, shift: Tensor,
                       scale: Tensor, weight: Tensor | None, bias: Tensor | None, gate: Tensor | None,
                       has_residual: bool):
    """dyt_modulate_backward with every gradient shaped and typed like its input, as the kernels
    return them: (dx, dresidual, dgate, dshift, dscale, dweight, dbias, dalpha); None for absent
    inputs, and dshift None when shift is per token (its gradient is dh itself)."""
    L = x.shape[1]
    shift_tok = per_token(shift, L)
    dx, dres, dgate, dshift, dscale, dw, db, da = dyt_modulate_backward(
        dh, dr, x, r, alpha, scale, weight, bias, has_residual, gate, shift_tok)
    dshift = None if shift_tok else dshift.reshape(shift.shape).to(shift.dtype)
    dgate = None if gate is None else dgate.reshape(gate.shape)
    return dx, dres, dgate, dshift, dscale.reshape(scale.shape), dw, db, da
