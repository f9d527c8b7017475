"""DyT forward and backward: Triton kernels, their launch plans and launchers.

    forward   t = tanh(a*x)         y = w*t + b
    backward  g = dy*w*(1 - t^2)    dx = a*g    dw = sum_rows dy*t    db = sum_rows dy
              da = sum g*x  (scalar alpha: over everything; per-channel alpha: over rows)

Minimum bytes (s = element size of x, M*N elements; per-channel vectors are noise next to these):
    forward   read x, write y                        2*M*N*s       one launch
    backward  read x and dy, write dx                3*M*N*s       two launches
The backward recomputes tanh from x (one MUFU op in bf16/fp16) rather than saving y. It is persistent:
one wave of programs, each owning a column block and a run of row tiles, prefetching the next tile
while it computes the current one, its sums in fp32 registers until it writes one partial row each of
dw, db, da (scalar alpha: one number). The finishing launch (finish.py) sums those in a fixed order
and writes every gradient in its parameter's dtype: deterministic, no atomics. Side traffic is the
partials written and read back: P*K*4 bytes per gradient, P programs (about one per SM).

Layout: x is viewed as rows x columns with unit column stride. Channels run along the columns
(channels_last, and NCHW tensors stored channels_last) or along the rows (contiguous NCHW: row =
n*C + c, the columns are the H*W positions); PER_ROW picks which.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import direct
from . import plan as P
from .finish import launch_finish, plan_finish
from .primitives import (TANH_APPROX, TANH_F32, channel_cols, load_channels, load_row_vector, load_tile,
                         row_offsets, tanh_f32, x_row_offsets)


@triton.jit
def _dyt_fwd(
    x_ptr,      # (M, N) input rows, unit column stride
    y_ptr,      # (M, N) output rows
    alpha_ptr,  # (1,) shared or (C,) per channel
    w_ptr,      # (C,) weight, read only if HAS_WEIGHT
    b_ptr,      # (C,) bias, read only if HAS_BIAS
    M, N, C,    # rows, columns, channels
    stride_xm, stride_ym,
    x_n2, x_n1, stride_x1, stride_x0,   # X_LEVELS = 3: x's rows as three strided levels (stride_xm innermost)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    PER_ROW: tl.constexpr, TANH: tl.constexpr, INDEX_64: tl.constexpr, X_LEVELS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(N, BLOCK_N)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = channel_cols(pid % col_blocks, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x = load_tile(x_ptr, x_row_offsets(rows, stride_xm, x_n2, x_n1, stride_x1, stride_x0, X_LEVELS, INDEX_64), cols,
                  mask)
    if PER_ROW:
        ch = rows % C
        if ALPHA_PER_CHANNEL:
            a = load_row_vector(alpha_ptr, ch, row_ok)
        if HAS_WEIGHT:
            w = load_row_vector(w_ptr, ch, row_ok)
        if HAS_BIAS:
            b = load_row_vector(b_ptr, ch, row_ok)
    else:
        if ALPHA_PER_CHANNEL:
            a = load_channels(alpha_ptr, cols, col_ok, BLOCK_M)
        if HAS_WEIGHT:
            w = load_channels(w_ptr, cols, col_ok, BLOCK_M)
        if HAS_BIAS:
            b = load_channels(b_ptr, cols, col_ok, BLOCK_M)
    if not ALPHA_PER_CHANNEL:
        a = tl.load(alpha_ptr).to(tl.float32)
    y = tanh_f32(a * x, TANH)
    if HAS_WEIGHT:
        y = y * w
    if HAS_BIAS:
        y = y + b
    tl.store(y_ptr + row_offsets(rows, stride_ym, INDEX_64) + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _dyt_fwd_kernel(
    x_ptr, y_ptr, alpha_ptr, w_ptr, b_ptr, M, N, C, stride_xm, stride_ym,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    PER_ROW: tl.constexpr, TANH: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward over rows of one stride (the common case: no level arguments to pass)."""
    _dyt_fwd(x_ptr, y_ptr, alpha_ptr, w_ptr, b_ptr, M, N, C, stride_xm, stride_ym, 1, 1, 0, 0,
             HAS_WEIGHT, HAS_BIAS, ALPHA_PER_CHANNEL, PER_ROW, TANH, INDEX_64, 1, BLOCK_M, BLOCK_N)


@triton.jit
def _dyt_fwd_levels_kernel(
    x_ptr, y_ptr, alpha_ptr, w_ptr, b_ptr, M, N, C, stride_xm, stride_ym, x_n2, x_n1, stride_x1, stride_x0,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    PER_ROW: tl.constexpr, TANH: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward reading x's rows as three strided levels (row_levels)."""
    _dyt_fwd(x_ptr, y_ptr, alpha_ptr, w_ptr, b_ptr, M, N, C, stride_xm, stride_ym, x_n2, x_n1, stride_x1, stride_x0,
             HAS_WEIGHT, HAS_BIAS, ALPHA_PER_CHANNEL, PER_ROW, TANH, INDEX_64, 3, BLOCK_M, BLOCK_N)


@triton.jit
def _bwd_tile(s, first, fixed, M, N, PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows, columns and mask of a program's s-th tile: rows advance (channels along columns), or
    columns advance (PER_ROW); `first` is the program's first moving index, `fixed` the other axis."""
    if PER_ROW:
        rows = fixed
        cols = tl.max_contiguous(tl.multiple_of(first + s * BLOCK_N + tl.arange(0, BLOCK_N), BLOCK_N), BLOCK_N)
    else:
        rows = first + s * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = fixed
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows, cols, mask


@triton.jit
def _dyt_bwd(
    dy_ptr,     # (M, N) upstream gradient rows
    x_ptr,      # (M, N) saved input rows
    dx_ptr,     # (M, N) output: input gradient rows
    alpha_ptr,  # (1,) or (C,)
    w_ptr,      # (C,) weight, read only if HAS_WEIGHT
    part_ptr,   # (3, part_stride) fp32 partials of dw, db, da: [g * K + k], K = N (or M if PER_ROW);
                # a scalar alpha's partial is one number per program, at [g * blocks + block]
    M, N, C,
    stride_dym, stride_xm, stride_dxm,
    steps,      # tiles each program walks along the reduced axis
    part_stride,
    x_n2, x_n1, stride_x1, stride_x0,   # X_LEVELS = 3: x's rows as three strided levels (stride_xm innermost)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    PER_ROW: tl.constexpr, TANH: tl.constexpr, INDEX_64: tl.constexpr, X_LEVELS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A program owns one block of channels and walks `steps` tiles along the other axis: its
    # parameters load once, its sums stay in registers, and tile s+1 is in flight while s computes.
    pid = tl.program_id(0)
    if PER_ROW:
        blocks = tl.cdiv(M, BLOCK_M)
        block = pid % blocks
        g = pid // blocks
        fixed = block * BLOCK_M + tl.arange(0, BLOCK_M)
        first = g * steps * BLOCK_N
        ch = fixed % C
        ch_ok = fixed < M
        if ALPHA_PER_CHANNEL:
            a = load_row_vector(alpha_ptr, ch, ch_ok)
        if HAS_WEIGHT:
            w = load_row_vector(w_ptr, ch, ch_ok)
    else:
        blocks = tl.cdiv(N, BLOCK_N)
        block = pid % blocks
        g = pid // blocks
        fixed = channel_cols(block, BLOCK_N)
        first = g * steps * BLOCK_M
        ch_ok = fixed < N
        if ALPHA_PER_CHANNEL:
            a = load_channels(alpha_ptr, fixed, ch_ok, BLOCK_M)
        if HAS_WEIGHT:
            w = load_channels(w_ptr, fixed, ch_ok, BLOCK_M)
    if not ALPHA_PER_CHANNEL:
        a = tl.load(alpha_ptr).to(tl.float32)
    # Tiles past this program's run (or past the tensor) are fully masked.
    if PER_ROW:
        limit_n = tl.minimum(N, first + steps * BLOCK_N)
        limit_m = M
    else:
        limit_m = tl.minimum(M, first + steps * BLOCK_M)
        limit_n = N

    rows, cols, mask = _bwd_tile(0, first, fixed, limit_m, limit_n, PER_ROW, BLOCK_M, BLOCK_N)
    x_next = tl.load(x_ptr + x_row_offsets(rows, stride_xm, x_n2, x_n1, stride_x1, stride_x0, X_LEVELS, INDEX_64)
                     + cols[None, :], mask=mask, other=0.0)
    dy_next = tl.load(dy_ptr + row_offsets(rows, stride_dym, INDEX_64) + cols[None, :], mask=mask, other=0.0)
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(steps):
        x = x_next.to(tl.float32)
        dy = dy_next.to(tl.float32)
        rows, cols, mask = _bwd_tile(s, first, fixed, limit_m, limit_n, PER_ROW, BLOCK_M, BLOCK_N)
        rows_n, cols_n, mask_n = _bwd_tile(s + 1, first, fixed, limit_m, limit_n, PER_ROW, BLOCK_M, BLOCK_N)
        x_next = tl.load(x_ptr + x_row_offsets(rows_n, stride_xm, x_n2, x_n1, stride_x1, stride_x0, X_LEVELS,
                                               INDEX_64) + cols_n[None, :], mask=mask_n, other=0.0)
        dy_next = tl.load(dy_ptr + row_offsets(rows_n, stride_dym, INDEX_64) + cols_n[None, :], mask=mask_n,
                          other=0.0)
        # Padded lanes hold x = dy = 0, but an infinite alpha or weight there would still give
        # inf * 0 = NaN and poison the sums: they are zeroed explicitly.
        t = tanh_f32(tl.where(mask, a * x, 0.0), TANH)
        g_t = dy * (1.0 - t * t)
        if HAS_WEIGHT:
            acc_w += dy * t
            g_t = tl.where(mask, g_t * w, 0.0)
        if HAS_BIAS:
            acc_b += dy
        acc_a += g_t * x
        tl.store(dx_ptr + row_offsets(rows, stride_dxm, INDEX_64) + cols[None, :],
                 (a * g_t).to(dx_ptr.dtype.element_ty), mask=mask)
    if PER_ROW:
        out = g * M + fixed
        sum_w, sum_b, sum_a = tl.sum(acc_w, axis=1), tl.sum(acc_b, axis=1), tl.sum(acc_a, axis=1)
    else:
        out = g * N + fixed
        sum_w, sum_b, sum_a = tl.sum(acc_w, axis=0), tl.sum(acc_b, axis=0), tl.sum(acc_a, axis=0)
    if HAS_WEIGHT:
        tl.store(part_ptr + out, sum_w, mask=ch_ok)
    if HAS_BIAS:
        tl.store(part_ptr + part_stride + out, sum_b, mask=ch_ok)
    if ALPHA_PER_CHANNEL:
        tl.store(part_ptr + 2 * part_stride + out, sum_a, mask=ch_ok)
    else:
        tl.store(part_ptr + 2 * part_stride + pid, tl.sum(sum_a, axis=0))


@triton.jit
def _dyt_bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, alpha_ptr, w_ptr, part_ptr, M, N, C, stride_dym, stride_xm, stride_dxm, steps, part_stride,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    PER_ROW: tl.constexpr, TANH: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The backward over rows of one stride (the common case: no level arguments to pass)."""
    _dyt_bwd(dy_ptr, x_ptr, dx_ptr, alpha_ptr, w_ptr, part_ptr, M, N, C, stride_dym, stride_xm, stride_dxm, steps,
             part_stride, 1, 1, 0, 0, HAS_WEIGHT, HAS_BIAS, ALPHA_PER_CHANNEL, PER_ROW, TANH, INDEX_64, 1,
             BLOCK_M, BLOCK_N)


@triton.jit
def _dyt_bwd_levels_kernel(
    dy_ptr, x_ptr, dx_ptr, alpha_ptr, w_ptr, part_ptr, M, N, C, stride_dym, stride_xm, stride_dxm, steps, part_stride,
    x_n2, x_n1, stride_x1, stride_x0,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    PER_ROW: tl.constexpr, TANH: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The backward reading x's rows as three strided levels (row_levels)."""
    _dyt_bwd(dy_ptr, x_ptr, dx_ptr, alpha_ptr, w_ptr, part_ptr, M, N, C, stride_dym, stride_xm, stride_dxm, steps,
             part_stride, x_n2, x_n1, stride_x1, stride_x0, HAS_WEIGHT, HAS_BIAS, ALPHA_PER_CHANNEL, PER_ROW, TANH,
             INDEX_64, 3, BLOCK_M, BLOCK_N)


# --------------------------------------------------------------------------------------------------
# Launch plans (pure functions of shape, dtypes, flags and device properties; cached).

@dataclass(frozen=True)
class Flags:
    has_weight: bool
    has_bias: bool
    alpha_per_channel: bool
    per_row: bool


def tanh_mode(dtype: torch.dtype, props: P.DeviceProps) -> int:
    if props.interpreter or dtype == torch.float32:
        return TANH_F32
    return TANH_APPROX


def _constexprs(flags: Flags, dtype, props, index64: bool, tile: P.Tile) -> tuple:
    return (("HAS_WEIGHT", flags.has_weight), ("HAS_BIAS", flags.has_bias),
            ("ALPHA_PER_CHANNEL", flags.alpha_per_channel), ("PER_ROW", flags.per_row),
            ("TANH", tanh_mode(dtype, props)), ("INDEX_64", index64),
            ("BLOCK_M", tile.block_m), ("BLOCK_N", tile.block_n))


# x's rows of one stride: no level arguments (the one-level kernels); three: the levels kernels' four
ONE_LEVEL = ()
_LEVEL_ARGS = (("x_n2", "i32"), ("x_n1", "i32"), ("stride_x1", "i32"), ("stride_x0", "i32"))


def _divisible(values: dict[str, int]) -> tuple:
    return tuple(name for name, v in values.items() if v % 16 == 0)


@dataclass(frozen=True)
class BackwardPlan:
    tile: P.Tile
    blocks: int            # column blocks (row blocks if per_row)
    programs: int          # programs per block, each walking `steps` tiles
    steps: int
    grid: int
    index64: bool
    programs_per_sm: int
    spec: P.KernelSpec
    part_stride: int       # fp32 elements per partial stream (programs * K, rounded up to 16)
    K: int                 # partial sums per program: N, or M if per_row
    rows: int              # M


BWD_WARPS = 16
MAX_BLOCK_N = 1024


@functools.lru_cache(maxsize=4096)
def plan_forward(M: int, N: int, C: int, dtype: torch.dtype, param_dtypes: tuple, flags: Flags,
                 props: P.DeviceProps, wide: bool = False, levels: int = 1) -> P.ForwardPlan:
    """wide: a strided operand's offsets reach 2^31 elements (P.row_span), so 64-bit indexing;
    levels: 3 when x's rows are three strided levels (row_levels), else 1."""
    P.check_rows(M)
    tile = P.streaming_tile(M, N, dtype, MAX_BLOCK_N)
    index64 = P.needs_index64(M * N) or wide
    alpha_t, w_t, b_t = param_dtypes
    cols_bytes = lambda t: P.cdiv(P.vector_width(dtype) * torch.empty((), dtype=t).element_size(), 16)  # noqa: E731
    vectors = 1 + sum(cols_bytes(t) for t, on in ((alpha_t, flags.alpha_per_channel), (w_t, flags.has_weight),
                                                  (b_t, flags.has_bias)) if on and not flags.per_row)
    three = levels == 3
    spec = P.KernelSpec(
        _dyt_fwd_levels_kernel if three else _dyt_fwd_kernel,
        (("x_ptr", P.pointer(dtype)), ("y_ptr", P.pointer(dtype)), ("alpha_ptr", P.pointer(alpha_t)),
         ("w_ptr", P.pointer(w_t)), ("b_ptr", P.pointer(b_t)), ("M", "i32"), ("N", "i32"), ("C", "i32"),
         ("stride_xm", "i32"), ("stride_ym", "i32")) + (_LEVEL_ARGS if three else ()),
        _constexprs(flags, dtype, props, index64, tile),
        ("x_ptr", "y_ptr", "alpha_ptr", "w_ptr", "b_ptr") + _divisible({"M": M, "N": N, "C": C, "stride_xm": N,
                                                                      "stride_ym": N}),
        tile.num_warps, P.streaming_maxnreg(vectors))
    grid = P.cdiv(M, tile.block_m) * P.cdiv(N, tile.block_n)
    return P.ForwardPlan(tile, grid, index64, spec, M, N)


@functools.lru_cache(maxsize=4096)
def plan_backward(M: int, N: int, C: int, dtype: torch.dtype, param_dtypes: tuple, flags: Flags,
                  props: P.DeviceProps, wide: bool = False, levels: int = 1) -> BackwardPlan:
    P.check_rows(M)
    elem = torch.empty((), dtype=dtype).element_size()
    # Per thread and stream, 32 bytes (two 16-byte vectors) of the tile, at up to 16 warps.
    per_thread = 32 // elem
    tile = P.tile_for(M, N, BWD_WARPS * 32 * per_thread, MAX_BLOCK_N, BWD_WARPS, per_thread)
    index64 = P.needs_index64(M * N) or wide
    alpha_t, w_t, _ = param_dtypes
    three = levels == 3
    spec = P.KernelSpec(
        _dyt_bwd_levels_kernel if three else _dyt_bwd_kernel,
        (("dy_ptr", P.pointer(dtype)), ("x_ptr", P.pointer(dtype)), ("dx_ptr", P.pointer(dtype)),
         ("alpha_ptr", P.pointer(alpha_t)), ("w_ptr", P.pointer(w_t)), ("part_ptr", "*fp32"),
         ("M", "i32"), ("N", "i32"), ("C", "i32"), ("stride_dym", "i32"), ("stride_xm", "i32"),
         ("stride_dxm", "i32"), ("steps", "i32"), ("part_stride", "i32")) + (_LEVEL_ARGS if three else ()),
        _constexprs(flags, dtype, props, index64, tile),
        ("dy_ptr", "x_ptr", "dx_ptr", "alpha_ptr", "w_ptr", "part_ptr", "part_stride") + _divisible(
            {"M": M, "N": N, "C": C, "stride_dym": N, "stride_xm": N, "stride_dxm": N}),
        tile.num_warps)
    if flags.per_row:
        blocks, tiles, K = P.cdiv(M, tile.block_m), P.cdiv(N, tile.block_n), M
    else:
        blocks, tiles, K = P.cdiv(N, tile.block_n), P.cdiv(M, tile.block_m), N
    per_sm = P.occupancy(spec.resources(props), tile.num_warps, props)
    if per_sm < 1:
        raise RuntimeError(f"dyt backward tile {tile} does not fit one SM of {props.name}")
    programs, steps = P.split_reduction(tiles, blocks, per_sm, props)
    part_stride = P.round_up(max(programs * K, programs * blocks), 16)   # aligned partial streams
    return BackwardPlan(tile, blocks, programs, steps, programs * blocks, index64, per_sm, spec, part_stride, K, M)


# --------------------------------------------------------------------------------------------------
# Bytes (the module docstring's budget, with the per-channel vectors; the static report and the
# benchmarks count with these).

def min_bytes(direction: str, M: int, N: int, elem: int, alpha_bytes: int, weight_bytes: int,
              bias_bytes: int) -> int:
    """Each input read once, each output written once (per-vector sizes in bytes, 0 when absent)."""
    if direction == "fwd":   # read x, alpha, weight, bias; write y
        return 2 * M * N * elem + alpha_bytes + weight_bytes + bias_bytes
    # read dy, x, alpha, weight; write dx, dalpha, dweight, dbias
    return 3 * M * N * elem + 2 * alpha_bytes + 2 * weight_bytes + bias_bytes


def side_bytes(p: BackwardPlan, flags: Flags) -> int:
    """The backward's fp32 partials, written by the main kernel and read back by the finishing one."""
    streams = int(flags.has_weight) + int(flags.has_bias) + int(flags.alpha_per_channel)
    scalar_alpha = 0 if flags.alpha_per_channel else p.grid
    return 2 * 4 * (streams * p.programs * p.K + scalar_alpha)


# --------------------------------------------------------------------------------------------------
# Layout and launchers.

def rows_view(t: Tensor, n: int) -> Tensor:
    """t as (rows, n) with unit column stride: a view when one exists, else a contiguous copy."""
    if t.dim() == 2 and t.shape[1] == n and (t.stride(1) == 1 or n == 1):
        return t
    try:
        v = t.view(-1, n)
    except RuntimeError:
        return t.reshape(-1, n).contiguous()
    return v if v.stride(1) == 1 or n == 1 else v.contiguous()


@dataclass(frozen=True)
class Layout:
    """How an (N, C, ...) or (..., C) tensor maps onto kernel rows: see the module docstring."""
    channels_last: bool   # the caller's convention
    moved: bool           # channels-first data walked as channels-last (stored NHWC, or no spatial dims)
    per_row: bool         # channels-first NCHW: one channel per row


_CHANNELS_LAST = Layout(True, False, False)


def layout_of(x: Tensor, channels_last: bool) -> Layout:
    if channels_last:
        return _CHANNELS_LAST
    spatial = x.numel() // max(x.shape[0] * x.shape[1], 1) if x.numel() else 1
    if x.dim() == 2 or spatial == 1:
        # No spatial positions: (N, C) is channels-last already, whatever its strides.
        return Layout(False, True, False)
    if x.movedim(1, -1).is_contiguous():
        return Layout(False, True, False)
    return Layout(False, False, True)


def as_rows(t: Tensor, layout: Layout, C: int) -> Tensor:
    if layout.channels_last:
        return rows_view(t, C)
    if layout.moved:
        return rows_view(t.movedim(1, -1) if t.dim() > 2 else t, C)
    t = t.contiguous()
    return t.view(t.shape[0] * C, -1)


def empty_like_layout(x: Tensor, layout: Layout) -> Tensor:
    """An output for x in the layout the kernels walk: NHWC-stored channels-first data stays NHWC."""
    if layout.moved and x.dim() > 2 and x.movedim(1, -1).is_contiguous():
        return torch.empty_like(x)  # dense x: the same strides
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def output_like(x: Tensor, channels_last: bool, layout: Layout | None = None) -> Tensor:
    """y (or dx) as the launchers allocate it: dense, NHWC-stored channels-first data staying NHWC.
    ops/library.py's fake implementations allocate with it too, so a traced graph's strides are real.
    `layout`: x's, where the caller has worked it out already (layout_of costs ~2 us on a 4-D x)."""
    if layout is None:
        layout = _CHANNELS_LAST if channels_last else layout_of(x, False)
    return empty_like_layout(x, layout)


_FWD = P.BoundedCache()  # launch configurations by (shape, dtypes, flags, device)
_BWD = P.BoundedCache()  # launch configurations by (shape, dtypes, flags, device)


def _forward_launch(key) -> P.Launch:
    M, N, C, dtype, alpha_t, w_t, b_t, has_w, has_b, apc, per_row, device, wide, levels = key
    p = plan_forward(M, N, C, dtype, (alpha_t, w_t, b_t), Flags(has_w, has_b, apc, per_row), P.device_props(device),
                     wide, levels)
    return _FWD.add(key, P.launch_of(p, p.spec, p.grid))


def _backward_launch(key) -> P.Launch:
    M, N, C, dtype, alpha_t, w_t, b_t, has_w, has_b, apc, per_row, device, wide, levels = key
    p = plan_backward(M, N, C, dtype, (alpha_t, w_t, b_t), Flags(has_w, has_b, apc, per_row), P.device_props(device),
                      wide, levels)
    return _BWD.add(key, P.launch_of(p, p.spec, p.grid, _finish_plan(p, M, C, has_w, has_b, apc, per_row)))


def _finish_plan(p: BackwardPlan, M: int, C: int, has_w: bool, has_b: bool, apc: bool, per_row: bool):
    """The channel sums: partials are (programs * rows-per-channel, C) matrices, one stream per
    gradient at part_stride apart (per_row: rows are n*C + c); a scalar alpha's are one per program.
    Jobs in the order dweight, dbias, dalpha (the launcher passes the gradients in that order)."""
    S = p.programs * (M // C if per_row else 1)
    jobs = [(0, 1, S, C)] if has_w else []
    if has_b:
        jobs.append((p.part_stride, 1, S, C))
    jobs.append((2 * p.part_stride, 1, S, C) if apc else (2 * p.part_stride, 1, p.grid, 1))
    return plan_finish(jobs)


def _key(M: int, N: int, C: int, x: Tensor, alpha: Tensor, weight, bias, per_row: bool, wide: bool,
         levels: int) -> tuple:
    return (M, N, C, x.dtype, alpha.dtype, alpha.dtype if weight is None else weight.dtype,
            alpha.dtype if bias is None else bias.dtype, weight is not None, bias is not None, alpha.numel() > 1,
            per_row, x.device, wide, levels)


def row_levels(t: Tensor, n: int) -> tuple | None:
    """t's rows (every index but the last; n columns at unit stride) as three strided levels where one
    does not serve: (x_n2, x_n1, stride_2, stride_1, stride_0), level sizes and strides innermost
    first. None where a (rows, n) view exists, or more than three levels are needed (a copy then).
    Attention's head views of a fused qkv projection, (B, H, L, d) with strides (L*3D, d, 3D, 1),
    are three levels; dims of size 1 drop out and adjacent dims that tile each other merge."""
    if t.dim() < 3 or (t.stride(-1) != 1 and n != 1):
        return None
    levels: list[list[int]] = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if levels and levels[-1][1] == stride * size:
            levels[-1] = [levels[-1][0] * size, stride]
        else:
            levels.append([size, stride])
    if not 2 <= len(levels) <= 3:
        return None
    (_, s0), (n1, s1), (n2, s2) = [[1, 0]] * (3 - len(levels)) + levels
    return n2, n1, s2, s1, s0


def x_rows(t: Tensor, n: int) -> tuple[Tensor, int, tuple, int]:
    """(operand, row stride, three-level arguments, span) for reading t as rows of n columns: t itself
    with its three levels (X_LEVELS = 3), else rows_view's view or contiguous copy (ONE_LEVEL). The
    span is how far its offsets reach (P.row_span)."""
    levels = row_levels(t, n)
    if levels is None:
        t2 = rows_view(t, n)
        return t2, t2.stride(0), ONE_LEVEL, P.row_span(t2)
    n2, n1, s2, s1, s0 = levels
    outer = t.numel() // (n * n1 * n2)
    return t, s2, (n2, n1, s1, s0), (outer - 1) * s0 + (n1 - 1) * s1 + (n2 - 1) * s2 + n


def forward(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, channels_last: bool,
            launch=None, slot: list | None = None) -> Tensor:
    """y = dyt(x) with one launch; `launch` wraps the kernel (wrap_triton inside custom ops). `slot`,
    from functional.py, remembers this argument signature's launch configurations between calls."""
    rows = None if slot is None else slot[2]
    if rows is not None and launch is None:
        # A validated signature (x's strides in it) whose x an earlier call read in place (InPlace):
        # the kernels walk x's own memory with that call's integers, and y is allocated as that call
        # allocated it, so a direct launch (direct.py) while the inputs stay aligned.
        kernel, grid, consts, options, runners, ints, keep = rows.forward
        y = torch.empty_like(x) if keep else torch.empty_like(x, memory_format=torch.contiguous_format)
        w = x if weight is None else weight
        b = x if bias is None else bias
        direct.launch(kernel, grid, consts, options, runners, (x, y, alpha, w, b, *ints), (x, alpha, w, b))
        return y
    layout = _CHANNELS_LAST if channels_last else layout_of(x, False)
    y = output_like(x, channels_last, layout)
    if channels_last:
        C = x.shape[-1]
        if x.numel() == 0:
            return y
        x2, sx, levels, span = x_rows(x, C)
        y2 = y.view(-1, C)
    else:
        C = x.shape[1]
        if x.numel() == 0:
            return y
        if layout.moved:
            x2, sx, levels, span = x_rows(x.movedim(1, -1) if x.dim() > 2 else x, C)
        else:
            x2 = as_rows(x, layout, C)
            sx, levels, span = x2.stride(0), ONE_LEVEL, x2.numel()
        y2 = as_rows(y, layout, C)
    M, N = y2.shape
    # A strided x whose offsets reach 2^31 elements needs 64-bit indexing, which M * N alone does not
    # show; such a call never takes or fills the signature's slot (kept for the common case).
    wide = P.needs_index64(span)
    three = bool(levels)
    cfg = P.cached_launch(None if wide else slot, 0, _FWD,
                          lambda: _key(M, N, C, x, alpha, weight, bias, layout.per_row, wide, 3 if three else 1),
                          _forward_launch)
    P.run(cfg.plan.spec.kernel, cfg, launch, x2, y2, alpha, x2 if weight is None else weight,
          x2 if bias is None else bias, M, N, C, sx, y2.stride(0), *levels)
    if slot is not None and launch is None and not wide:
        slot[2] = in_place(x, x2, sx, levels, y, y2, M, N, C, cfg, _saved(x, alpha, weight, bias))
    return y


@dataclass(frozen=True)
class InPlace:
    """How a call read x and wrote y in place, for later calls of its signature (functional.py puts
    x's shape and strides in it, so they walk the same way): x's rows at row stride sx (and three
    levels, or none), y dense rows allocated like empty_like(x) (keep: x is dense and y has its
    strides) or contiguous; the strides a backward's x and dy must have to take the same walk."""
    # The forward's direct launch: (kernel, grid, constexprs, options, runners, the integers after its
    # five pointers: M, N, C, stride_xm, stride_ym, *levels, keep). The runners (direct.py) are this
    # signature's own: its integers (x's row stride, levels) are not fixed by the launch configuration,
    # which other strides share, and Triton specializes on them (divisibility by 16, the value 1).
    forward: tuple
    backward_ints: tuple   # after the backward's six pointers: M, N, C, stride_dym, stride_xm, stride_dxm
    levels: tuple
    saved: tuple   # x's strides, its dtype, alpha's, weight's and bias's: what the walk is for (_saved)
    y_strides: tuple
    keep: bool
    backward_runners: dict = field(default_factory=dict, compare=False)


def _saved(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple:
    """What a backward's launch assumes of the saved tensors: x's strides and the dtypes it reads, and
    bias's, which dbias is written in (the Function keeps bias by reference: `param.data = ...half()`
    or `module.half()` between the forward and the backward changes it under the graph)."""
    return (x.stride(), x.dtype, alpha.dtype, None if weight is None else weight.dtype,
            None if bias is None else bias.dtype)


def in_place(x: Tensor, x2: Tensor, sx: int, levels: tuple, y: Tensor, y2: Tensor, M: int, N: int,
             C: int, cfg: P.Launch, saved: tuple) -> InPlace | None:
    """The call's InPlace where x2, the rows the kernel read, is x's own memory (a view, not a copy)
    and y2 is y's as dense rows, with y allocated as empty_like(x) would (x dense, same strides) or
    contiguous; else None. A copy has its own allocation, so the data pointers tell views apart."""
    if x2.data_ptr() != x.data_ptr() or y2.data_ptr() != y.data_ptr() or y2.stride(0) != N:
        return None
    keep = y.stride() == x.stride()
    if not keep and not y.is_contiguous():
        return None
    forward = (cfg.plan.spec.kernel, cfg.grid, cfg.consts, cfg.options, {}, (M, N, C, sx, N, *levels), keep)
    return InPlace(forward, (M, N, C, N, sx, N), levels, saved, y.stride(), keep)


def backward(dy: Tensor, x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None,
             channels_last: bool, launch=None, slot: list | None = None):
    """(dx, dalpha, dweight, dbias) with two launches; dweight/dbias are None when weight/bias are."""
    if dy.is_neg():   # a lazily negated gradient (autograd hands on torch.complex's): read it negated
        dy = dy.resolve_neg()
    if x.dtype != dy.dtype:   # a saved-tensor hook unpacked x in another dtype than the forward's (y's, dy's)
        x = x.to(dy.dtype)
    rows = None if slot is None else slot[2]
    saved = None if rows is None else _saved(x, alpha, weight, bias)
    if (rows is not None and slot[1] is not None and saved == rows.saved and dy.stride() == rows.y_strides
            and alpha.is_contiguous() and (weight is None or weight.is_contiguous())):
        # A validated signature whose x the forward read in place (forward's InPlace), x and dy laid
        # out as the forward's x and y: the kernels walk the tensors themselves. (x, alpha and weight
        # are checked again: a saved-tensor hook registered on one of them after the forward,
        # grad_fn._raw_saved_tensors[i].register_hooks, may unpack another layout.)
        cfg, fixed, runners = slot[1], launch is None, rows.backward_runners
        p = cfg.plan
        dx = torch.empty_like(x) if rows.keep else torch.empty_like(x, memory_format=torch.contiguous_format)
        x2, dy2, dx2 = x, dy, dx
        ints, levels = rows.backward_ints, rows.levels   # dy and dx are dense rows, whatever dims they have
    else:
        C = x.shape[-1] if channels_last else x.shape[1]
        layout = _CHANNELS_LAST if channels_last else layout_of(x, False)
        dx = output_like(x, channels_last, layout)
        if x.numel() == 0:
            zeros = lambda p: None if p is None else torch.zeros_like(p)  # noqa: E731
            return dx, torch.zeros_like(alpha), zeros(weight), zeros(bias)
        # The vectors are read at unit stride; the forward's checks made them so, but a saved-tensor
        # hook may unpack them otherwise (contiguous() is the tensor itself when it is).
        alpha, weight = alpha.contiguous(), None if weight is None else weight.contiguous()
        if layout.per_row:
            x2 = as_rows(x, layout, C)
            sx, levels, span = x2.stride(0), ONE_LEVEL, x2.numel()
        else:
            x2, sx, levels, span = x_rows(x.movedim(1, -1) if layout.moved and x.dim() > 2 else x, C)
        dy2, dx2 = as_rows(dy, layout, C), as_rows(dx, layout, C)
        M, N = dx2.shape
        ints = (M, N, C, dy2.stride(0), sx, dx2.stride(0))
        wide = P.needs_index64(P.row_span(dy2), span)   # dx2 is dense: M * N
        three = bool(levels)
        # The slot's backward launch is for x as the forward saw it; a saved-tensor hook may hand
        # back x in another layout (another walk: levels, rows of one channel), which plans its own.
        same_x = rows is not None and saved == rows.saved
        cfg = P.cached_launch(slot if same_x and not wide else None, 1, _BWD,
                              lambda: _key(M, N, C, x, alpha, weight, bias, layout.per_row, wide, 3 if three else 1),
                              _backward_launch)
        p, fixed = cfg.plan, False
    part = torch.empty(3 * p.part_stride, dtype=torch.float32, device=x.device)
    da = torch.empty_like(alpha)
    dw = None if weight is None else torch.empty_like(weight)
    db = None if bias is None else torch.empty_like(bias)
    w = x2 if weight is None else weight
    args = (dy2, x2, dx2, alpha, w, part, *ints, p.steps, p.part_stride, *levels)
    if fixed:   # the integers are the signature's: a direct launch while the inputs stay aligned
        direct.launch(p.spec.kernel, cfg.grid, cfg.consts, cfg.options, runners, args, (dy2, x2, alpha, w))
    else:
        P.run(p.spec.kernel, cfg, launch, *args)
    launch_finish(cfg.finish, part, [g for g in (dw, db, da) if g is not None], launch)
    return dx, da, dw, db
