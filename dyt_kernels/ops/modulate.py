"""adaLN-modulated DyT with the pre-norm gated residual fused in (PixArt-alpha / FLUX blocks).

    r = residual + gate*x            (with a residual; gate optional)
    n = w*tanh(a*r) + b              h = n*(1 + scale) + shift
    backward, with dn = dh*(1 + scale), dz = dn*w*(1 - t^2), dr_total = a*dz + dr:
        dshift = sum_L dh    dscale = sum_L dh*n    dgate = sum_L dr_total*x    (per-sample tensors)
        dresidual = dr_total    dx = gate*dr_total    dw = sum dn*t    db = sum dn    da = sum dz*r

x, residual, h, r are (B, L, D), viewed as B*L rows of D. shift/scale/gate are per sample (B, D)
and broadcast over L (the kernels address them with a zero token stride), or per token (B, L, D).

Minimum bytes, E = B*L*D elements of s bytes, P = B*D per-sample vectors (per-token ones cost E):
    forward    no residual         read x, shift, scale; write h                  2E*s + 2P*s
               residual, gate      read x, residual, gate, shift, scale; write h, r   4E*s + 3P*s
               residual, no gate                                                     4E*s + 2P*s
    backward   no residual         read dh, x; write dx                           3E*s (+ P*s scale)
               residual, no gate   read dh, dr, r; write dresidual (= dx)          4E*s (+ P*s)
               residual, gate      read dh, dr, r, x; write dresidual, dx          6E*s (+ 2P*s)
The backward's small terms: it reads scale (and gate) and writes dshift, dscale (and dgate) as (B, D)
fp32 partial sums, P*s-sized each. Per-token scale/gate instead add a read of scale/gate and a write
of dscale/dgate (E*s each); a per-token dshift is dh itself and costs nothing. The backward saves r (the norm's input), never h, recomputes
tanh, and reduces per-sample and per-channel sums through fp32 per-program partials: no atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import reference
from ..backend import get_backend, use_backend, use_triton
from ..reference import per_token
from .launch import as_rows, reduction_programs, tanh_f32, tanh_mode, tile_config, tile_coords


@triton.jit
def _load_mod(ptr, sample, token, cols, stride_b, stride_l, mask):
    """shift/scale/gate[sample, token, cols] as fp32; stride_l = 0 broadcasts a per-sample tensor."""
    return tl.load(ptr + sample * stride_b + token * stride_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _modulate_fwd_kernel(
    x_ptr,      # (B*L, D) rows of x
    res_ptr,    # (B*L, D) rows of residual, if HAS_RESIDUAL
    gate_ptr,   # gate[b, l, :] at b*stride_gb + l*stride_gl (stride_gl = 0: per sample), if HAS_GATE
    shift_ptr,  # shift, addressed like gate
    scale_ptr,  # scale, addressed like gate
    alpha_ptr,  # (1,) or (D,)
    w_ptr,      # (D,) if HAS_WEIGHT
    b_ptr,      # (D,) if HAS_BIAS
    h_ptr,      # (B*L, D) output h
    r_ptr,      # (B*L, D) output r = residual + gate*x, if HAS_RESIDUAL
    M, N, L,
    stride_xm, stride_resm, stride_hm, stride_rm,
    stride_gb, stride_gl, stride_shb, stride_shl, stride_scb, stride_scl,
    HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ALPHA_PER_CHANNEL: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = tile_coords(tl.program_id(0), N, BLOCK_M, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    sample = (rows64 // L)[:, None]
    token = (rows64 % L)[:, None]
    rows64 = rows64[:, None]
    r = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        if HAS_GATE:
            r = r * _load_mod(gate_ptr, sample, token, cols, stride_gb, stride_gl, mask)
        r += tl.load(res_ptr + rows64 * stride_resm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r_out = r.to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + rows64 * stride_rm + cols[None, :], r_out, mask=mask)
        r = r_out.to(tl.float32)  # normalize the stored r, so the backward's recomputation matches
    if ALPHA_PER_CHANNEL:
        a = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        a = tl.load(alpha_ptr).to(tl.float32)
    n = tanh_f32(a * r, TANH)
    if HAS_WEIGHT:
        n = n * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        n = n + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    shift = _load_mod(shift_ptr, sample, token, cols, stride_shb, stride_shl, mask)
    scale = _load_mod(scale_ptr, sample, token, cols, stride_scb, stride_scl, mask)
    h = n * (1.0 + scale) + shift
    tl.store(h_ptr + rows64 * stride_hm + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulate_bwd_kernel(
    dh_ptr,      # (B*L, D) upstream gradient of h
    dr_ptr,      # (B*L, D) upstream gradient of r, if HAS_DR
    r_ptr,       # (B*L, D) the norm's input: r with a residual, x without
    x_ptr,       # (B*L, D) x, read for dgate if HAS_GATE
    gate_ptr, scale_ptr,  # addressed as in the forward
    alpha_ptr, w_ptr, b_ptr,
    drt_ptr,     # (B*L, D) output: dresidual (with a residual) or dx (without)
    dx_ptr,      # (B*L, D) output: dx = gate*dresidual, if HAS_GATE
    dscale_ptr,  # (B*L, D) output if SCALE_PER_TOKEN
    dgate_ptr,   # (B*L, D) output if GATE_PER_TOKEN
    sample_part,   # (3, B, G, D) fp32 partials of dshift, dscale, dgate for per-sample tensors
    channel_part,  # (3, B*G, D) fp32 partials of dw, db, dalpha
    B, N, L, G,
    stride_dhm, stride_drm, stride_rm, stride_xm, stride_drtm, stride_dxm,
    stride_gb, stride_gl, stride_scb, stride_scl,
    steps,       # token tiles per program
    HAS_RESIDUAL: tl.constexpr, HAS_DR: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, SHIFT_PER_TOKEN: tl.constexpr,
    SCALE_PER_TOKEN: tl.constexpr, GATE_PER_TOKEN: tl.constexpr, TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A program owns (sample b, token chunk g, channel block): per-sample and per-channel sums stay
    # in registers across its `steps` token tiles, then leave as one fp32 partial row each.
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    cb = pid % n_col_blocks
    g = (pid // n_col_blocks) % G
    b = pid // (n_col_blocks * G)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)
    col_ok = cols < N
    if ALPHA_PER_CHANNEL:
        a = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        a = tl.load(alpha_ptr).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    b64 = b.to(tl.int64)
    # Per-sample scale/gate load once, as full tiles with token stride 0: the tile's own layout (16-byte
    # accesses, no layout shuffle), the repeats served from L1.
    tile_rows = tl.arange(0, BLOCK_M)[:, None]
    tile_ok = (tile_rows >= 0) & col_ok[None, :]
    if not SCALE_PER_TOKEN:
        scale = _load_mod(scale_ptr, b64, tile_rows, cols, stride_scb, 0, tile_ok)
    if HAS_GATE and not GATE_PER_TOKEN:
        gate = _load_mod(gate_ptr, b64, tile_rows, cols, stride_gb, 0, tile_ok)
    acc_shift = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(steps):
        tokens = ((g * steps + s) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (tokens < L)[:, None] & col_ok[None, :]
        rows = (b64 * L + tokens)[:, None]
        tok = tokens[:, None]
        dh = tl.load(dh_ptr + rows * stride_dhm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + rows * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tanh_f32(a * r, TANH)
        n = t
        if HAS_WEIGHT:
            n = n * w
        if HAS_BIAS:
            n = n + bias
        if SCALE_PER_TOKEN:
            scale = _load_mod(scale_ptr, b64, tok, cols, stride_scb, stride_scl, mask)
            tl.store(dscale_ptr + rows * N + cols[None, :], (dh * n).to(dscale_ptr.dtype.element_ty), mask=mask)
        else:
            acc_scale += dh * n
        if not SHIFT_PER_TOKEN:
            acc_shift += dh
        dn = dh * (1.0 + scale)
        if HAS_WEIGHT:
            acc_w += dn * t
            dz = dn * w * (1.0 - t * t)
        else:
            dz = dn * (1.0 - t * t)
        if HAS_BIAS:
            acc_b += dn
        acc_a += dz * r
        drt = a * dz
        if HAS_DR:
            drt += tl.load(dr_ptr + rows * stride_drm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(drt_ptr + rows * stride_drtm + cols[None, :], drt.to(drt_ptr.dtype.element_ty), mask=mask)
        if HAS_GATE:
            x = tl.load(x_ptr + rows * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if GATE_PER_TOKEN:
                gate = _load_mod(gate_ptr, b64, tok, cols, stride_gb, stride_gl, mask)
                tl.store(dgate_ptr + rows * N + cols[None, :], (drt * x).to(dgate_ptr.dtype.element_ty), mask=mask)
            else:
                acc_gate += drt * x
            tl.store(dx_ptr + rows * stride_dxm + cols[None, :], (gate * drt).to(dx_ptr.dtype.element_ty), mask=mask)
    part_row = (b64 * G + g) * N + cols
    BGN = B * G * N
    if not SHIFT_PER_TOKEN:
        tl.store(sample_part + part_row, tl.sum(acc_shift, axis=0), mask=col_ok)
    if not SCALE_PER_TOKEN:
        tl.store(sample_part + BGN + part_row, tl.sum(acc_scale, axis=0), mask=col_ok)
    if HAS_GATE and not GATE_PER_TOKEN:
        tl.store(sample_part + 2 * BGN + part_row, tl.sum(acc_gate, axis=0), mask=col_ok)
    if HAS_WEIGHT:
        tl.store(channel_part + part_row, tl.sum(acc_w, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(channel_part + BGN + part_row, tl.sum(acc_b, axis=0), mask=col_ok)
    tl.store(channel_part + 2 * BGN + part_row, tl.sum(acc_a, axis=0), mask=col_ok)


def _mod_strides(m: Tensor | None, L: int) -> tuple[Tensor | None, int, int]:
    """(tensor, sample stride, token stride) with unit channel stride; token stride 0 when per sample."""
    if m is None:
        return None, 0, 0
    if m.stride(-1) != 1:
        m = m.contiguous()
    if per_token(m, L):
        return m, m.stride(0), m.stride(1)
    return m, m.stride(0), 0


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,))


@triton_op("dyt_kernels::dyt_modulate_fwd", mutates_args=())
def dyt_modulate_fwd(x: Tensor, alpha: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], residual: Optional[Tensor], gate: Optional[Tensor]
                     ) -> tuple[Tensor, Tensor]:
    """(h, r); r is empty without a residual."""
    if not use_triton(x):
        out = reference.dyt_modulate(x, alpha, shift, scale, weight, bias, residual, gate)
        return (out, _empty(x)) if residual is None else out
    B, L, D = x.shape
    h = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    r = _empty(x) if residual is None else torch.empty((B, L, D), dtype=residual.dtype, device=x.device)
    if x.numel() == 0:
        return h, r
    x2, h2 = as_rows(x, D), h.view(-1, D)
    res2 = x2 if residual is None else as_rows(residual, D)
    r2 = h2 if residual is None else r.view(-1, D)
    gate, sgb, sgl = _mod_strides(gate, L)
    shift, sshb, sshl = _mod_strides(shift, L)
    scale, sscb, sscl = _mod_strides(scale, L)
    M = B * L
    block_m, block_n, num_warps = tile_config(M, D, x.element_size())
    grid = (triton.cdiv(M, block_m) * triton.cdiv(D, block_n),)
    wrap_triton(_modulate_fwd_kernel)[grid](
        x2, res2, x2 if gate is None else gate, shift, scale, alpha,
        x2 if weight is None else weight, x2 if bias is None else bias, h2, r2,
        M, D, L, x2.stride(0), res2.stride(0), h2.stride(0), r2.stride(0),
        sgb, sgl, sshb, sshl, sscb, sscl,
        HAS_RESIDUAL=residual is not None, HAS_GATE=gate is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, ALPHA_PER_CHANNEL=alpha.numel() > 1, TANH=tanh_mode(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return h, r


@triton_op("dyt_kernels::dyt_modulate_bwd", mutates_args=())
def dyt_modulate_bwd(dh: Tensor, dr: Optional[Tensor], x: Tensor, r: Tensor, alpha: Tensor, scale: Tensor,
                     weight: Optional[Tensor], bias: Optional[Tensor], gate: Optional[Tensor], has_residual: bool,
                     shift_per_token: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dgate, dshift, dscale, dweight, dbias, dalpha), as reference.dyt_modulate_backward
    returns them; absent ones come back empty, and so does dx when it equals dresidual (residual
    without gate: custom-op outputs may not alias)."""
    r = r if has_residual else x
    if not use_triton(x):
        grads = list(reference.dyt_modulate_backward(dh, dr, x, r, alpha, scale, weight, bias, has_residual,
                                                     gate, shift_per_token))
    else:
        grads = _modulate_bwd_triton(dh, dr, x, r, alpha, scale, weight, bias, has_residual, gate,
                                     shift_per_token)
    if has_residual and gate is None:
        grads[0] = None
    return tuple(_empty(x) if g is None else g for g in grads)


def _modulate_bwd_triton(dh, dr, x, r, alpha, scale, weight, bias, has_residual, gate, shift_per_token):
    B, L, D = x.shape
    scale_tok = per_token(scale, L)
    gate_tok = gate is not None and per_token(gate, L)
    drt = torch.empty((B, L, D), dtype=r.dtype, device=x.device)
    dx = torch.empty_like(drt, dtype=x.dtype) if gate is not None else None
    dscale = torch.empty((B, L, D), dtype=scale.dtype, device=x.device) if scale_tok else None
    dgate = torch.empty((B, L, D), dtype=gate.dtype, device=x.device) if gate_tok else None
    if x.numel() == 0:
        zeros = lambda p: None if p is None else torch.zeros_like(p)  # noqa: E731
        red = lambda like: torch.zeros((B, D), dtype=like.dtype, device=x.device)  # noqa: E731
        return [dx if gate is not None else drt, drt if has_residual else None,
                None if gate is None else (dgate if gate_tok else red(gate)),
                None if shift_per_token else torch.zeros((B, D), device=x.device),
                dscale if scale_tok else red(scale), zeros(weight), zeros(bias), torch.zeros_like(alpha)]
    dh2, r2, drt2 = as_rows(dh, D), as_rows(r, D), drt.view(-1, D)
    dr2 = r2 if dr is None else as_rows(dr, D)
    x2 = as_rows(x, D) if gate is not None else r2
    dx2 = drt2 if dx is None else dx.view(-1, D)
    gate_t, sgb, sgl = _mod_strides(gate, L)
    scale_t, sscb, sscl = _mod_strides(scale, L)
    # Up to six fp32 accumulators live per tile: a quarter of the forward's tile.
    block_m, block_n, num_warps = tile_config(L, D, x.element_size(), tile_bytes=2048 * x.element_size(), max_block_n=512)
    n_col_blocks = triton.cdiv(D, block_n)
    steps_total = triton.cdiv(L, block_m)
    G = reduction_programs(x.device, steps_total, B * n_col_blocks)
    steps = triton.cdiv(steps_total, G)
    G = triton.cdiv(steps_total, steps)
    sample_part = torch.empty((3, B, G, D), dtype=torch.float32, device=x.device)
    channel_part = torch.empty((3, B * G, D), dtype=torch.float32, device=x.device)
    wrap_triton(_modulate_bwd_kernel)[(B * G * n_col_blocks,)](
        dh2, dr2, r2, x2, x2 if gate_t is None else gate_t, scale_t, alpha,
        x2 if weight is None else weight, x2 if bias is None else bias,
        drt2, dx2, drt2 if dscale is None else dscale, drt2 if dgate is None else dgate,
        sample_part, channel_part, B, D, L, G,
        dh2.stride(0), dr2.stride(0), r2.stride(0), x2.stride(0), drt2.stride(0), dx2.stride(0),
        sgb, sgl, sscb, sscl, steps,
        HAS_RESIDUAL=has_residual, HAS_DR=dr is not None, HAS_GATE=gate is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ALPHA_PER_CHANNEL=alpha.numel() > 1,
        SHIFT_PER_TOKEN=shift_per_token, SCALE_PER_TOKEN=scale_tok, GATE_PER_TOKEN=gate_tok,
        TANH=tanh_mode(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    per_sample = sample_part.sum(2)    # (3, B, D), fixed-order reductions
    per_channel = channel_part.sum(1)  # (3, D)
    dshift = None if shift_per_token else per_sample[0].clone()
    if not scale_tok:
        dscale = per_sample[1].to(scale.dtype, copy=True)
    if gate is not None and not gate_tok:
        dgate = per_sample[2].to(gate.dtype, copy=True)
    dw = None if weight is None else per_channel[0].to(weight.dtype, copy=True)
    db = None if bias is None else per_channel[1].to(bias.dtype, copy=True)
    da = (per_channel[2] if alpha.numel() > 1 else per_channel[2].sum()).reshape(alpha.shape)
    da = da.to(alpha.dtype, copy=True)
    return [dx if gate is not None else drt, drt if has_residual else None, dgate, dshift, dscale, dw, db, da]


def _setup_context(ctx, inputs, output):
    x, alpha, shift, scale, weight, bias, residual, gate = inputs
    _, r = output
    ctx.has_residual = residual is not None
    ctx.shift_per_token = per_token(shift, x.shape[1])
    ctx.shift_shape, ctx.shift_dtype = shift.shape, shift.dtype
    ctx.save_for_backward(x, r, alpha, scale, weight, bias, gate)
    ctx.backend = get_backend()  # the backward runs on the forward's backend, wherever .backward() is called


def _backward(ctx, dh, dr):
    x, r, alpha, scale, weight, bias, gate = ctx.saved_tensors
    with use_backend(ctx.backend):
        dx, dres, dgate, dshift, dscale, dw, db, da = torch.ops.dyt_kernels.dyt_modulate_bwd(
            dh, dr if ctx.has_residual else None, x, r, alpha, scale, weight, bias, gate, ctx.has_residual,
            ctx.shift_per_token)
    if ctx.has_residual and gate is None:
        dx = dres.to(x.dtype)
    dshift = (dh if ctx.shift_per_token else dshift).reshape(ctx.shift_shape).to(ctx.shift_dtype)
    opt = lambda g, p: None if p is None else g.reshape(p.shape)  # noqa: E731
    return (dx, da, dshift, dscale.reshape(scale.shape), opt(dw, weight), opt(db, bias),
            dres if ctx.has_residual else None, opt(dgate, gate))


dyt_modulate_fwd.register_autograd(_backward, setup_context=_setup_context)
