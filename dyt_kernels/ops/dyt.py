"""DyT forward and backward as Triton kernels, registered as torch.library ops with autograd.

    forward   t = tanh(a*x)         y = w*t + b
    backward  g = dy*w*(1 - t^2)    dx = a*g    dw = sum_rows dy*t    db = sum_rows dy
              da = sum g*x  (scalar alpha: over everything; per-channel alpha: over rows)

Minimum bytes (s = element size of x, M*N elements; per-channel vectors are noise next to these):
    forward   read x, write y                        2*M*N*s
    backward  read x and dy, write dx                3*M*N*s   (+ G*N*4 per fp32 partial buffer)
The backward recomputes tanh from x (one MUFU op) rather than saving y, and writes fp32 per-program
partials of dw/db/da that torch.sum then reduces: deterministic, no atomics.

Layout: x is viewed as rows x columns with unit column stride. Channels run along the columns
(channels_last, and NCHW tensors stored channels_last) or along the rows (contiguous NCHW: row =
n*C + c, the columns are the H*W positions); PARAM_PER_ROW picks which.
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
from .launch import as_rows, reduction_programs, tanh_f32, tanh_mode, tile_config, tile_coords


@triton.jit
def _load_channel(ptr, ch, ch_ok, PER_ROW: tl.constexpr):
    """A per-channel vector loaded 1-D (so its layout matches the tile's) and shaped to broadcast."""
    v = tl.load(ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
    if PER_ROW:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _dyt_fwd_kernel(
    x_ptr,      # (M, N) input rows, unit column stride
    y_ptr,      # (M, N) output rows
    alpha_ptr,  # (1,) shared or (C,) per channel
    w_ptr,      # (C,) weight, read only if HAS_WEIGHT
    b_ptr,      # (C,) bias, read only if HAS_BIAS
    M, N, C,    # rows, columns, channels
    stride_xm, stride_ym,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    PARAM_PER_ROW: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = tile_coords(tl.program_id(0), N, BLOCK_M, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if PARAM_PER_ROW:
        ch = rows % C
        ch_ok = row_ok
    else:
        ch = cols
        ch_ok = col_ok
    if ALPHA_PER_CHANNEL:
        a = _load_channel(alpha_ptr, ch, ch_ok, PARAM_PER_ROW)
    else:
        a = tl.load(alpha_ptr).to(tl.float32)
    y = tanh_f32(a * x, TANH)
    if HAS_WEIGHT:
        y = y * _load_channel(w_ptr, ch, ch_ok, PARAM_PER_ROW)
    if HAS_BIAS:
        y = y + _load_channel(b_ptr, ch, ch_ok, PARAM_PER_ROW)
    tl.store(y_ptr + rows64 * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dyt_bwd_kernel(
    dy_ptr,     # (M, N) upstream gradient rows
    x_ptr,      # (M, N) saved input rows
    dx_ptr,     # (M, N) output: input gradient rows
    alpha_ptr,  # (1,) or (C,)
    w_ptr,      # (C,) weight, read only if HAS_WEIGHT
    dw_part,    # (G, K) fp32 partials of sum dy*t; K = N, or M if PARAM_PER_ROW
    db_part,    # (G, K) fp32 partials of sum dy
    da_part,    # (G, K) fp32 partials of sum g*x
    M, N, C,
    stride_dym, stride_xm, stride_dxm,
    steps,      # tiles each program walks along the reduced axis
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    PARAM_PER_ROW: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A program owns one block of channels and walks `steps` tiles along the other axis, so its
    # parameters load once and its sums stay in registers until one partial row is written.
    pid = tl.program_id(0)
    if PARAM_PER_ROW:
        n_row_blocks = tl.cdiv(M, BLOCK_M)
        g = pid // n_row_blocks
        rows = (pid % n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        ch = rows % C
        ch_ok = rows < M
    else:
        n_col_blocks = tl.cdiv(N, BLOCK_N)
        g = pid // n_col_blocks
        cols = (pid % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)
        ch = cols
        ch_ok = cols < N
    if ALPHA_PER_CHANNEL:
        a = _load_channel(alpha_ptr, ch, ch_ok, PARAM_PER_ROW)
    else:
        a = tl.load(alpha_ptr).to(tl.float32)
    if HAS_WEIGHT:
        w = _load_channel(w_ptr, ch, ch_ok, PARAM_PER_ROW)
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(steps):
        if PARAM_PER_ROW:
            cols = (g * steps + s) * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)
        else:
            rows = (g * steps + s) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tanh_f32(a * x, TANH)
        gt = dy * (1.0 - t * t)
        if HAS_WEIGHT:
            gt = gt * w
            acc_w += dy * t
        if HAS_BIAS:
            acc_b += dy
        acc_a += gt * x
        tl.store(dx_ptr + rows64 * stride_dxm + cols[None, :], (a * gt).to(dx_ptr.dtype.element_ty), mask=mask)
    if PARAM_PER_ROW:
        out = g.to(tl.int64) * M + rows
        out_ok = rows < M
        sum_w, sum_b, sum_a = tl.sum(acc_w, axis=1), tl.sum(acc_b, axis=1), tl.sum(acc_a, axis=1)
    else:
        out = g.to(tl.int64) * N + cols
        out_ok = cols < N
        sum_w, sum_b, sum_a = tl.sum(acc_w, axis=0), tl.sum(acc_b, axis=0), tl.sum(acc_a, axis=0)
    if HAS_WEIGHT:
        tl.store(dw_part + out, sum_w, mask=out_ok)
    if HAS_BIAS:
        tl.store(db_part + out, sum_b, mask=out_ok)
    tl.store(da_part + out, sum_a, mask=out_ok)


def _channels_along_rows(x: Tensor, channels_last: bool) -> bool:
    """True for NCHW data stored NCHW-contiguous (or strided): channels then index the rows."""
    return not channels_last and not x.movedim(1, -1).is_contiguous()


def _rows_of(t: Tensor, channels_last: bool, per_row: bool) -> Tensor:
    """t as the (rows, columns) view the kernels walk (see the module docstring)."""
    if per_row:
        return as_rows(t.contiguous(), t.numel() // (t.shape[0] * t.shape[1]))
    if not channels_last:
        t = t.movedim(1, -1)
    return as_rows(t, t.shape[-1])


def _empty_out(x: Tensor, per_row: bool, channels_last: bool) -> Tensor:
    # NCHW stored channels_last keeps that layout; everything else comes out contiguous.
    if not channels_last and not per_row:
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@triton_op("dyt_kernels::dyt_fwd", mutates_args=())
def dyt_fwd(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            channels_last: bool) -> Tensor:
    if not use_triton(x):
        return reference.dyt(x, alpha, weight, bias, channels_last)
    per_row = _channels_along_rows(x, channels_last)
    y = _empty_out(x, per_row, channels_last)
    if x.numel() == 0:
        return y
    x2, y2 = _rows_of(x, channels_last, per_row), _rows_of(y, channels_last, per_row)
    M, N = x2.shape
    C = x.shape[-1] if channels_last else x.shape[1]
    block_m, block_n, num_warps = tile_config(M, N, x.element_size())
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    wrap_triton(_dyt_fwd_kernel)[grid](
        x2, y2, alpha, x2 if weight is None else weight, x2 if bias is None else bias,
        M, N, C, x2.stride(0), y2.stride(0),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ALPHA_PER_CHANNEL=alpha.numel() > 1,
        PARAM_PER_ROW=per_row, TANH=tanh_mode(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y


@triton_op("dyt_kernels::dyt_bwd", mutates_args=())
def dyt_bwd(dy: Tensor, x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            channels_last: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dalpha, dweight, dbias); dweight/dbias are empty when weight/bias are None."""
    if not use_triton(x):
        dx, da, dw, db = reference.dyt_backward(dy, x, alpha, weight, bias, channels_last)
    else:
        dx, da, dw, db = _dyt_bwd_triton(dy, x, alpha, weight, bias, channels_last)
    return dx, da, x.new_empty((0,)) if dw is None else dw, x.new_empty((0,)) if db is None else db


def _dyt_bwd_triton(dy, x, alpha, weight, bias, channels_last):
    C = x.shape[-1] if channels_last else x.shape[1]
    per_row = _channels_along_rows(x, channels_last)
    dx = _empty_out(x, per_row, channels_last)
    if x.numel() == 0:
        zeros = lambda p: None if p is None else torch.zeros_like(p)  # noqa: E731
        return dx, torch.zeros_like(alpha), zeros(weight), zeros(bias)
    x2, dy2, dx2 = (_rows_of(t, channels_last, per_row) for t in (x, dy, dx))
    M, N = x2.shape
    # Three (M, N)-sized streams and three fp32 accumulators live per tile: half the forward's tile.
    block_m, block_n, num_warps = tile_config(M, N, x.element_size(), tile_bytes=8192)
    if per_row:
        blocks, steps_total, K = triton.cdiv(M, block_m), triton.cdiv(N, block_n), M
    else:
        blocks, steps_total, K = triton.cdiv(N, block_n), triton.cdiv(M, block_m), N
    G = reduction_programs(x.device, steps_total, blocks)
    steps = triton.cdiv(steps_total, G)
    G = triton.cdiv(steps_total, steps)  # every program gets at least one tile
    part = torch.empty((3, G, K), dtype=torch.float32, device=x.device)
    wrap_triton(_dyt_bwd_kernel)[(G * blocks,)](
        dy2, x2, dx2, alpha, x2 if weight is None else weight, part[0], part[1], part[2],
        M, N, C, dy2.stride(0), x2.stride(0), dx2.stride(0), steps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ALPHA_PER_CHANNEL=alpha.numel() > 1,
        PARAM_PER_ROW=per_row, TANH=tanh_mode(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    sums = part.sum(1)  # (3, K), a fixed-order reduction
    if per_row:
        sums = sums.view(3, -1, C).sum(1)
    # copy=True: the three results must not be views of one buffer (custom ops may not alias outputs).
    dw = None if weight is None else sums[0].to(weight.dtype, copy=True)
    db = None if bias is None else sums[1].to(bias.dtype, copy=True)
    da = (sums[2] if alpha.numel() > 1 else sums[2].sum()).reshape(alpha.shape).to(alpha.dtype, copy=True)
    return dx, da, dw, db


def _setup_context(ctx, inputs, output):
    x, alpha, weight, bias, channels_last = inputs
    ctx.save_for_backward(x, alpha, weight, bias)
    ctx.channels_last = channels_last
    ctx.backend = get_backend()  # the backward runs on the forward's backend, wherever .backward() is called


def _backward(ctx, dy):
    x, alpha, weight, bias = ctx.saved_tensors
    with use_backend(ctx.backend):
        dx, da, dw, db = torch.ops.dyt_kernels.dyt_bwd(dy, x, alpha, weight, bias, ctx.channels_last)
    return dx, da, dw if weight is not None else None, db if bias is not None else None, None


dyt_fwd.register_autograd(_backward, setup_context=_setup_context)
