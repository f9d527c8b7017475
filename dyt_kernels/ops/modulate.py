"""adaLN-modulated DyT with the pre-norm gated residual fused in (PixArt-alpha / FLUX blocks).

    r = residual + gate*x            (with a residual; gate optional)
    n = w*tanh(a*r) + b              h = n*(1 + scale) + shift
    backward, with dn = dh*(1 + scale), dz = dn*w*(1 - t^2), dr_total = a*dz + dr:
        dshift = sum_L dh    dscale = sum_L dh*n    dgate = sum_L dr_total*x    (per-sample tensors)
        dresidual = dr_total    dx = gate*dr_total    dw = sum dn*t    db = sum dn    da = sum dz*r

x, residual, h, r are (B, L, D), viewed as B*L rows of D. shift/scale/gate are per sample (B, D)
and broadcast over L (the kernels address them with a zero token stride), or per token (B, L, D).

Minimum bytes, E = B*L*D elements of s bytes, P = B*D per-sample vectors (per-token ones cost E):
    forward    no residual         read x, shift, scale; write h                      2E*s + 2P*s
               residual, gate      read x, residual, gate, shift, scale; write h, r   4E*s + 3P*s
               residual, no gate                                                     4E*s + 2P*s
    backward   no residual         read dh, x; write dx                               3E*s (+ 3P*s)
               residual, no gate   read dh, dr, r; write dresidual (= dx)             4E*s (+ 3P*s)
               residual, gate      read dh, dr, r, x; write dresidual, dx             6E*s (+ 5P*s)
The backward's small terms: it reads scale (and gate) and writes dshift, dscale (and dgate), P*s
each. Per-token scale/gate instead add a read of scale/gate and a write of dscale/dgate (E*s each);
a per-token dshift is dh itself and costs nothing. The backward saves r (the norm's input), never h,
and recomputes tanh.

The backward is persistent, one wave: a program owns a column block and a run of (sample, token
chunk) units, prefetching tile i+1 while it computes tile i. Per-sample sums close at the end of
each unit: written straight into dshift/dscale/dgate in their dtypes when a sample is one unit, or
as fp32 partials the finishing launch sums when long samples are split to keep every SM busy.
Per-channel sums (dw, db, da) stay in registers for the whole run, one partial row per program.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import per_token
from . import direct
from . import plan as P
from .dyt import MAX_BLOCK_N as _FWD_MAX_BLOCK_N, rows_view, tanh_mode
from .finish import launch_finish, plan_finish
from .primitives import channel_cols, load_channels, row_offsets, tanh_f32


@triton.jit
def _mod_offsets(sample, token, stride_b, stride_l, INDEX_64: tl.constexpr):
    """Offsets of shift/scale/gate[sample, token, :] (stride_l = 0: one vector per sample), as a column."""
    if INDEX_64:
        off = sample.to(tl.int64) * stride_b + token.to(tl.int64) * stride_l
    else:
        off = sample * stride_b + token * stride_l
    return off[:, None]


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
    ALPHA_PER_CHANNEL: tl.constexpr, TANH: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(N, BLOCK_N)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = channel_cols(pid % col_blocks, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    sample = rows // L       # 32-bit: row counts are checked to fit
    token = rows - sample * L
    # Every load of the tile is issued before the first is used (one memory round trip): shift and
    # scale first, as ptxas would otherwise sink them below the residual math to their late use.
    shift = tl.load(shift_ptr + _mod_offsets(sample, token, stride_shb, stride_shl, INDEX_64) + cols[None, :],
                    mask=mask, other=0.0)
    scale = tl.load(scale_ptr + _mod_offsets(sample, token, stride_scb, stride_scl, INDEX_64) + cols[None, :],
                    mask=mask, other=0.0)
    x = tl.load(x_ptr + row_offsets(rows, stride_xm, INDEX_64) + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row_offsets(rows, stride_resm, INDEX_64) + cols[None, :], mask=mask, other=0.0)
        if HAS_GATE:
            gate = tl.load(gate_ptr + _mod_offsets(sample, token, stride_gb, stride_gl, INDEX_64) + cols[None, :],
                           mask=mask, other=0.0)
    if ALPHA_PER_CHANNEL:
        a = load_channels(alpha_ptr, cols, col_ok, BLOCK_M)
    else:
        a = tl.load(alpha_ptr).to(tl.float32)
    if HAS_WEIGHT:
        w = load_channels(w_ptr, cols, col_ok, BLOCK_M)
    if HAS_BIAS:
        bias = load_channels(b_ptr, cols, col_ok, BLOCK_M)
    r = x.to(tl.float32)
    if HAS_RESIDUAL:
        if HAS_GATE:
            r = r * gate.to(tl.float32)
        r += res.to(tl.float32)
        r_out = r.to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + row_offsets(rows, stride_rm, INDEX_64) + cols[None, :], r_out, mask=mask)
        r = r_out.to(tl.float32)  # the norm reads r as stored, as an unfused block would
    n = tanh_f32(a * r, TANH)
    if HAS_WEIGHT:
        n = n * w
    if HAS_BIAS:
        n = n + bias
    h = n * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(h_ptr + row_offsets(rows, stride_hm, INDEX_64) + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _next_tile(u, k, sample, chunk, S, TPC):
    """The step after (unit u, tile k of it, its sample and chunk): counters, no integer division."""
    k1 = k + 1
    wrap = k1 == TPC
    k1 = tl.where(wrap, 0, k1)
    chunk1 = chunk + wrap.to(tl.int32)
    wrap_sample = chunk1 == S
    return (u + wrap.to(tl.int32), k1, sample + wrap_sample.to(tl.int32), tl.where(wrap_sample, 0, chunk1))


@triton.jit
def _modulate_bwd_kernel(
    dh_ptr,      # (B*L, D) upstream gradient of h
    dr_ptr,      # (B*L, D) upstream gradient of r, if HAS_DR
    r_ptr,       # (B*L, D) the norm's input: r with a residual, x without
    x_ptr,       # (B*L, D) x, read for dgate if HAS_GATE
    gate_ptr, scale_ptr,  # addressed as in the forward (token stride 0: per sample)
    alpha_ptr, w_ptr, b_ptr,
    drt_ptr,     # (B*L, D) output: dresidual (with a residual) or dx (without)
    dx_ptr,      # (B*L, D) output dx = gate*dresidual (or a cast of it), if WRITE_DX
    dscale_tok,  # (B*L, D) output dscale if SCALE_PER_TOKEN
    dgate_tok,   # (B*L, D) output dgate if GATE_PER_TOKEN
    dshift_ptr, dscale_ptr, dgate_ptr,  # (B, D) per-sample gradients, written directly unless SPLIT
    part,        # fp32 partials: (3, sample_stride) of dshift, dscale, dgate (B*S*D each, when SPLIT),
                 # then (3, channel_stride) of dw, db, da (scalar alpha: one per program)
    N, L, S, TPC, U, units,   # channels; tokens; chunks per sample; tiles per chunk; units per program; B*S
    stride_dhm, stride_drm, stride_rm, stride_xm, stride_drtm, stride_dxm,
    stride_gb, stride_gl, stride_scb, stride_scl,
    sample_stride, channel_stride,
    HAS_RESIDUAL: tl.constexpr, HAS_DR: tl.constexpr, HAS_GATE: tl.constexpr, WRITE_DX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    SHIFT_PER_TOKEN: tl.constexpr, SCALE_PER_TOKEN: tl.constexpr, GATE_PER_TOKEN: tl.constexpr,
    SPLIT: tl.constexpr, TANH: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(N, BLOCK_N)
    block = pid % col_blocks
    g = pid // col_blocks
    sample_part = part
    channel_part = part + 3 * sample_stride.to(tl.int64)
    cols = channel_cols(block, BLOCK_N)
    col_ok = cols < N
    if ALPHA_PER_CHANNEL:
        a = load_channels(alpha_ptr, cols, col_ok, BLOCK_M)
    else:
        a = tl.load(alpha_ptr).to(tl.float32)
    if HAS_WEIGHT:
        w = load_channels(w_ptr, cols, col_ok, BLOCK_M)
    if HAS_BIAS:
        bias = load_channels(b_ptr, cols, col_ok, BLOCK_M)
    steps = U * TPC
    u_end = tl.minimum(units, (g + 1) * U)

    # Step 0's loads; every iteration then issues step i+1's before computing step i.
    u = g * U
    sample = u // S
    chunk = u - sample * S
    k = u * 0
    tokens = (chunk * TPC + k) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = ((tokens < L) & (u < u_end))[:, None] & col_ok[None, :]
    rows = sample * L + tokens
    dh_n = tl.load(dh_ptr + row_offsets(rows, stride_dhm, INDEX_64) + cols[None, :], mask=mask, other=0.0)
    r_n = tl.load(r_ptr + row_offsets(rows, stride_rm, INDEX_64) + cols[None, :], mask=mask, other=0.0)
    # Per-sample scale/gate load with token stride 0: the sample's one vector as a broadcast tile.
    sc_n = tl.load(scale_ptr + _mod_offsets(sample, tokens, stride_scb, stride_scl, INDEX_64) + cols[None, :],
                   mask=mask, other=0.0)
    if HAS_DR:
        dr_n = tl.load(dr_ptr + row_offsets(rows, stride_drm, INDEX_64) + cols[None, :], mask=mask, other=0.0)
    if HAS_GATE:
        x_n = tl.load(x_ptr + row_offsets(rows, stride_xm, INDEX_64) + cols[None, :], mask=mask, other=0.0)
        gt_n = tl.load(gate_ptr + _mod_offsets(sample, tokens, stride_gb, stride_gl, INDEX_64) + cols[None, :],
                       mask=mask, other=0.0)

    acc_shift = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(steps):
        dh = dh_n.to(tl.float32)
        r = r_n.to(tl.float32)
        scale = sc_n.to(tl.float32)
        if HAS_DR:
            dr = dr_n.to(tl.float32)
        if HAS_GATE:
            x = x_n.to(tl.float32)
            gate = gt_n.to(tl.float32)
        valid = u < u_end
        tokens = (chunk * TPC + k) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = ((tokens < L) & valid)[:, None] & col_ok[None, :]
        rows = sample * L + tokens
        # Prefetch step i+1 (fully masked past the program's run).
        u_n, k_n, sample_n, chunk_n = _next_tile(u, k, sample, chunk, S, TPC)
        tokens_n = (chunk_n * TPC + k_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_n = ((tokens_n < L) & (u_n < u_end))[:, None] & col_ok[None, :]
        rows_n = sample_n * L + tokens_n
        dh_n = tl.load(dh_ptr + row_offsets(rows_n, stride_dhm, INDEX_64) + cols[None, :], mask=mask_n, other=0.0)
        r_n = tl.load(r_ptr + row_offsets(rows_n, stride_rm, INDEX_64) + cols[None, :], mask=mask_n, other=0.0)
        sc_n = tl.load(scale_ptr + _mod_offsets(sample_n, tokens_n, stride_scb, stride_scl, INDEX_64)
                       + cols[None, :], mask=mask_n, other=0.0)
        if HAS_DR:
            dr_n = tl.load(dr_ptr + row_offsets(rows_n, stride_drm, INDEX_64) + cols[None, :], mask=mask_n,
                           other=0.0)
        if HAS_GATE:
            x_n = tl.load(x_ptr + row_offsets(rows_n, stride_xm, INDEX_64) + cols[None, :], mask=mask_n,
                          other=0.0)
            gt_n = tl.load(gate_ptr + _mod_offsets(sample_n, tokens_n, stride_gb, stride_gl, INDEX_64)
                           + cols[None, :], mask=mask_n, other=0.0)

        # Padded lanes hold r = dh = 0, but an infinite alpha, weight or bias there would still give
        # inf * 0 = NaN and poison the sums: they are zeroed explicitly (n too when it has a weight and
        # no bias: w * tanh(0) is inf * 0 there).
        t = tanh_f32(tl.where(mask, a * r, 0.0), TANH)
        n = t
        if HAS_WEIGHT:
            n = n * w
        if HAS_BIAS:
            n = n + bias
        if HAS_WEIGHT or HAS_BIAS:
            n = tl.where(mask, n, 0.0)
        if SCALE_PER_TOKEN:
            tl.store(dscale_tok + row_offsets(rows, N, INDEX_64) + cols[None, :],
                     (dh * n).to(dscale_tok.dtype.element_ty), mask=mask)
        else:
            acc_scale += dh * n
        if not SHIFT_PER_TOKEN:
            acc_shift += dh
        dn = dh * (1.0 + scale)
        if HAS_WEIGHT:
            acc_w += dn * t
            dz = tl.where(mask, dn * w * (1.0 - t * t), 0.0)
        else:
            dz = dn * (1.0 - t * t)
        if HAS_BIAS:
            acc_b += dn
        acc_a += dz * r
        drt = a * dz
        if HAS_DR:
            drt += dr
        tl.store(drt_ptr + row_offsets(rows, stride_drtm, INDEX_64) + cols[None, :],
                 drt.to(drt_ptr.dtype.element_ty), mask=mask)
        if HAS_GATE:
            if GATE_PER_TOKEN:
                tl.store(dgate_tok + row_offsets(rows, N, INDEX_64) + cols[None, :],
                         (drt * x).to(dgate_tok.dtype.element_ty), mask=mask)
            else:
                acc_gate += drt * x
            tl.store(dx_ptr + row_offsets(rows, stride_dxm, INDEX_64) + cols[None, :],
                     (gate * drt).to(dx_ptr.dtype.element_ty), mask=mask)
        elif WRITE_DX:
            tl.store(dx_ptr + row_offsets(rows, stride_dxm, INDEX_64) + cols[None, :],
                     drt.to(dx_ptr.dtype.element_ty), mask=mask)

        # A unit ends: its per-sample sums leave, as gradients or as one fp32 partial row.
        if (k == TPC - 1) & valid:
            if SPLIT:
                out = (sample * S + chunk).to(tl.int64) * N + cols
                if not SHIFT_PER_TOKEN:
                    tl.store(sample_part + out, tl.sum(acc_shift, axis=0), mask=col_ok)
                if not SCALE_PER_TOKEN:
                    tl.store(sample_part + sample_stride + out, tl.sum(acc_scale, axis=0), mask=col_ok)
                if HAS_GATE and not GATE_PER_TOKEN:
                    tl.store(sample_part + 2 * sample_stride + out, tl.sum(acc_gate, axis=0), mask=col_ok)
            else:
                out = sample.to(tl.int64) * N + cols
                if not SHIFT_PER_TOKEN:
                    tl.store(dshift_ptr + out, tl.sum(acc_shift, axis=0).to(dshift_ptr.dtype.element_ty),
                             mask=col_ok)
                if not SCALE_PER_TOKEN:
                    tl.store(dscale_ptr + out, tl.sum(acc_scale, axis=0).to(dscale_ptr.dtype.element_ty),
                             mask=col_ok)
                if HAS_GATE and not GATE_PER_TOKEN:
                    tl.store(dgate_ptr + out, tl.sum(acc_gate, axis=0).to(dgate_ptr.dtype.element_ty),
                             mask=col_ok)
            acc_shift = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u, k, sample, chunk = u_n, k_n, sample_n, chunk_n

    out = g * N + cols
    if HAS_WEIGHT:
        tl.store(channel_part + out, tl.sum(acc_w, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(channel_part + channel_stride + out, tl.sum(acc_b, axis=0), mask=col_ok)
    if ALPHA_PER_CHANNEL:
        tl.store(channel_part + 2 * channel_stride + out, tl.sum(acc_a, axis=0), mask=col_ok)
    else:
        tl.store(channel_part + 2 * channel_stride + pid, tl.sum(tl.sum(acc_a, axis=0), axis=0))


# --------------------------------------------------------------------------------------------------
# Launch plans.

@dataclass(frozen=True)
class FwdFlags:
    has_residual: bool
    has_gate: bool
    has_weight: bool
    has_bias: bool
    alpha_per_channel: bool


@dataclass(frozen=True)
class BwdFlags:
    has_residual: bool
    has_dr: bool
    has_gate: bool
    write_dx: bool
    has_weight: bool
    has_bias: bool
    alpha_per_channel: bool
    shift_per_token: bool
    scale_per_token: bool
    gate_per_token: bool


@dataclass(frozen=True)
class BackwardPlan:
    tile: P.Tile
    col_blocks: int
    programs: int          # programs per column block
    chunks: int            # S: each sample's tokens split into this many units
    tiles_per_chunk: int   # TPC
    units_per_program: int  # U
    grid: int
    index64: bool
    programs_per_sm: int
    spec: P.KernelSpec
    sample_stride: int     # fp32 elements per per-sample partial stream (B*S*D when split; 16-aligned)
    channel_stride: int    # fp32 elements per per-channel partial stream (16-aligned)

    @property
    def split(self) -> bool:
        return self.chunks > 1


BWD_MAX_BLOCK_N = 512
BWD_WARPS = 4
BWD_VECTORS = 1  # 16-byte vectors of each stream per thread and tile


def _divisible(values: dict[str, int]) -> tuple:
    return tuple(name for name, v in values.items() if v % 16 == 0)


@functools.lru_cache(maxsize=4096)
def plan_forward(B: int, L: int, D: int, dtype: torch.dtype, dtypes: tuple, flags: FwdFlags,
                 props: P.DeviceProps, wide: bool = False) -> P.ForwardPlan:
    """dtypes: (residual, gate, shift, scale, alpha, weight, bias) element types; wide: a strided
    operand's offsets reach 2^31 elements (_wide), so 64-bit indexing."""
    M = B * L
    P.check_rows(M)
    tile = P.streaming_tile(M, D, dtype, _FWD_MAX_BLOCK_N)
    index64 = P.needs_index64(M * D) or wide
    res_t, gate_t, shift_t, scale_t, alpha_t, w_t, b_t = dtypes
    # 16-byte vectors a thread loads: x, shift, scale (+ residual, gate), and the per-channel vectors,
    # each as wide as its dtype makes the tile's columns.
    cols_bytes = lambda t: P.cdiv(P.vector_width(dtype) * torch.empty((), dtype=t).element_size(), 16)  # noqa: E731
    vectors = (3 + 2 * flags.has_residual + sum(cols_bytes(t) for t, on in
               ((alpha_t, flags.alpha_per_channel), (w_t, flags.has_weight), (b_t, flags.has_bias)) if on))
    ints = {"M": M, "N": D, "L": L, "stride_xm": D, "stride_resm": D, "stride_hm": D, "stride_rm": D,
            "stride_gb": D, "stride_gl": D, "stride_shb": D, "stride_shl": D, "stride_scb": D, "stride_scl": D}
    ptrs = (("x_ptr", dtype), ("res_ptr", res_t), ("gate_ptr", gate_t), ("shift_ptr", shift_t),
            ("scale_ptr", scale_t), ("alpha_ptr", alpha_t), ("w_ptr", w_t), ("b_ptr", b_t), ("h_ptr", dtype),
            ("r_ptr", res_t))
    spec = P.KernelSpec(
        _modulate_fwd_kernel,
        tuple((n, P.pointer(t)) for n, t in ptrs) + tuple((n, "i32") for n in ints),
        (("HAS_RESIDUAL", flags.has_residual), ("HAS_GATE", flags.has_gate), ("HAS_WEIGHT", flags.has_weight),
         ("HAS_BIAS", flags.has_bias), ("ALPHA_PER_CHANNEL", flags.alpha_per_channel),
         ("TANH", tanh_mode(dtype, props)), ("INDEX_64", index64),
         ("BLOCK_M", tile.block_m), ("BLOCK_N", tile.block_n)),
        tuple(n for n, _ in ptrs) + _divisible(ints), tile.num_warps, P.streaming_maxnreg(vectors))
    return P.ForwardPlan(tile, P.cdiv(M, tile.block_m) * P.cdiv(D, tile.block_n), index64, spec)


def choose_split(B: int, T: int, programs: int) -> tuple[int, int, int, int]:
    """(S chunks per sample, tiles per chunk, units per program, programs) for B samples of T tiles
    over at most `programs` programs: the fewest chunks whose busiest program does at most ~10% more
    than an even share (splitting costs fp32 partials and a finishing pass)."""
    ideal = B * T / programs
    best = None
    for tpc in sorted({P.cdiv(T, s) for s in range(1, T + 1)}, reverse=True):
        S = P.cdiv(T, tpc)
        units = B * S
        U = P.cdiv(units, programs)
        busiest = U * tpc
        if best is None or busiest < best[0]:
            best = (busiest, S, tpc, U, P.cdiv(units, U))
        if busiest <= 1.1 * ideal + 1:
            return S, tpc, U, P.cdiv(units, U)
    return best[1:]


@functools.lru_cache(maxsize=4096)
def plan_backward(B: int, L: int, D: int, dtype: torch.dtype, dtypes: tuple, flags: BwdFlags,
                  props: P.DeviceProps, wide: bool = False) -> BackwardPlan:
    """dtypes: (r, gate, scale, alpha, weight, bias, shift) element types."""
    M = B * L
    P.check_rows(M)
    per_thread = P.vector_width(dtype) * BWD_VECTORS
    # Rows of one sample at most (a tile never spans two samples), columns to fill the warps.
    tile = P.tile_for(min(L, M), D, BWD_WARPS * 32 * per_thread, BWD_MAX_BLOCK_N, BWD_WARPS, per_thread)
    index64 = P.needs_index64(M * D) or wide
    r_t, gate_t, scale_t, alpha_t, w_t, b_t, shift_t = dtypes
    ints = {"N": D, "L": L, "S": 1, "TPC": 1, "U": 1, "units": 1, "stride_dhm": D, "stride_drm": D,
            "stride_rm": D, "stride_xm": D, "stride_drtm": D, "stride_dxm": D, "stride_gb": D, "stride_gl": D,
            "stride_scb": D, "stride_scl": D, "sample_stride": 16, "channel_stride": 16}  # strides: partials()
    ptrs = (("dh_ptr", dtype), ("dr_ptr", r_t), ("r_ptr", r_t), ("x_ptr", dtype), ("gate_ptr", gate_t),
            ("scale_ptr", scale_t), ("alpha_ptr", alpha_t), ("w_ptr", w_t), ("b_ptr", b_t), ("drt_ptr", r_t),
            ("dx_ptr", dtype), ("dscale_tok", scale_t), ("dgate_tok", gate_t), ("dshift_ptr", shift_t),
            ("dscale_ptr", scale_t), ("dgate_ptr", gate_t), ("part", torch.float32))
    T = P.cdiv(L, tile.block_m)
    col_blocks = P.cdiv(D, tile.block_n)

    def spec_for(split: bool) -> P.KernelSpec:
        return P.KernelSpec(
            _modulate_bwd_kernel,
            tuple((n, P.pointer(t)) for n, t in ptrs) + tuple((n, "i32") for n in ints),
            (("HAS_RESIDUAL", flags.has_residual), ("HAS_DR", flags.has_dr), ("HAS_GATE", flags.has_gate),
             ("WRITE_DX", flags.write_dx), ("HAS_WEIGHT", flags.has_weight), ("HAS_BIAS", flags.has_bias),
             ("ALPHA_PER_CHANNEL", flags.alpha_per_channel), ("SHIFT_PER_TOKEN", flags.shift_per_token),
             ("SCALE_PER_TOKEN", flags.scale_per_token), ("GATE_PER_TOKEN", flags.gate_per_token),
             ("SPLIT", split), ("TANH", tanh_mode(dtype, props)), ("INDEX_64", index64),
             ("BLOCK_M", tile.block_m), ("BLOCK_N", tile.block_n)),
            tuple(n for n, _ in ptrs) + _divisible(ints), tile.num_warps)

    per_sm = P.occupancy(spec_for(True).resources(props), tile.num_warps, props)
    if per_sm < 1:
        raise RuntimeError(f"dyt_modulate backward tile {tile} does not fit one SM of {props.name}")
    slots = max(1, (per_sm * props.sm_count) // col_blocks)
    S, tpc, U, programs = choose_split(B, T, slots)
    spec = spec_for(S > 1)
    grid = programs * col_blocks
    sample_stride = P.round_up(B * S * D if S > 1 else 1, 16)
    channel_stride = P.round_up(max(programs * D, grid), 16)
    return BackwardPlan(tile, col_blocks, programs, S, tpc, U, grid, index64, per_sm, spec, sample_stride,
                        channel_stride)


# --------------------------------------------------------------------------------------------------
# Bytes (the module docstring's table; the static report and the benchmarks count with these).

def min_bytes(direction: str, B: int, L: int, D: int, elem: int, mod_elem: int, alpha_bytes: int, *,
              residual: bool, gate: bool, per_token: bool = False) -> int:
    """Each input read once, each output written once: no affine, modulation tensors of mod_elem
    bytes per element, (B, D) per sample or (B, L, D) per token."""
    E, P_ = B * L * D, (B * L * D if per_token else B * D)
    if direction == "fwd":
        streams = 4 if residual else 2          # x, h (+ residual, r)
        mods = 3 if gate else 2                 # shift, scale (+ gate)
        return streams * E * elem + mods * P_ * mod_elem + alpha_bytes
    streams = 3 if not residual else 4 if not gate else 6   # see the table above
    # read scale (+ gate); write dshift, dscale (+ dgate); a per-token dshift is dh itself
    mods = (5 if gate else 3) - (1 if per_token else 0)
    return streams * E * elem + mods * P_ * mod_elem + 2 * alpha_bytes


def side_bytes(p: BackwardPlan, flags: BwdFlags, B: int, D: int) -> int:
    """The backward's fp32 partials, written by the main kernel and read back by the finishing one:
    per-channel rows per program (a scalar alpha: one number), and per-sample rows when split."""
    streams = int(flags.has_weight) + int(flags.has_bias) + int(flags.alpha_per_channel)
    channel = streams * p.programs * D + (0 if flags.alpha_per_channel else p.grid)
    sample = 0
    if p.split:
        sample = B * p.chunks * D * (int(not flags.shift_per_token) + int(not flags.scale_per_token)
                                     + int(flags.has_gate and not flags.gate_per_token))
    return 2 * 4 * (channel + sample)


# --------------------------------------------------------------------------------------------------
# Launchers.

_FWD = P.BoundedCache()  # launch configurations by (shape, dtypes, flags, device)
_BWD = P.BoundedCache()  # launch configurations by (shape, dtypes, flags, device)


def _forward_launch(key) -> P.Launch:
    B, L, D, dtype, *dtypes = key[:11]
    p = plan_forward(B, L, D, dtype, tuple(dtypes), FwdFlags(*key[11:16]), P.device_props(key[16]), key[17])
    return _FWD.add(key, P.launch_of(p, p.spec, p.grid))


def _backward_launch(key) -> P.Launch:
    B, L, D, dtype, *dtypes = key[:11]
    flags = BwdFlags(*key[11:21])
    p = plan_backward(B, L, D, dtype, tuple(dtypes), flags, P.device_props(key[21]), key[22])
    return _BWD.add(key, P.launch_of(p, p.spec, p.grid, _finish_plan(p, flags, B, D)))


def _finish_plan(p: BackwardPlan, flags: BwdFlags, B: int, D: int):
    """The finishing jobs, in the order the launcher passes gradients: dweight, dbias, dalpha (per
    channel: programs rows of D; a scalar alpha: one number per program), then when split dshift,
    dscale, dgate (per sample: chunks rows of D), each present and not per token."""
    channel = 3 * p.sample_stride
    jobs = [(channel, 1, p.programs, D)] if flags.has_weight else []
    if flags.has_bias:
        jobs.append((channel + p.channel_stride, 1, p.programs, D))
    jobs.append((channel + 2 * p.channel_stride, 1, p.programs, D) if flags.alpha_per_channel
                else (channel + 2 * p.channel_stride, 1, p.grid, 1))
    if p.split:
        for i, on in enumerate(_sample_sums(flags)):
            if on:
                jobs.append((i * p.sample_stride, B, p.chunks, D))
    return plan_finish(jobs)


def _sample_sums(flags: BwdFlags) -> tuple:
    """Which of dshift, dscale, dgate are per-sample sums (present, not per token)."""
    return (not flags.shift_per_token, not flags.scale_per_token, flags.has_gate and not flags.gate_per_token)


def _mod_strides(m: Tensor | None, L: int) -> tuple[Tensor | None, int, int]:
    """(tensor, sample stride, token stride) with unit channel stride; token stride 0 when per sample."""
    if m is None:
        return None, 0, 0
    if m.stride(-1) != 1:
        m = m.contiguous()
    if per_token(m, L):
        return m, m.stride(0), m.stride(1)
    return m, m.stride(0), 0


def _wide(B: int, L: int, D: int, rows: tuple, mods: tuple) -> bool:
    """Whether any operand's element offsets reach 2^31: the (rows, D) views, and the modulations as
    (sample stride, token stride) pairs (token stride 0 when per sample)."""
    spans = [P.row_span(t) for t in rows]
    spans += [(B - 1) * sb + (L - 1) * sl + D for sb, sl in mods]
    return P.needs_index64(*spans)


def _dt(t: Tensor | None, default: torch.dtype) -> torch.dtype:
    return default if t is None else t.dtype


def outputs_like(x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(h, r) as forward allocates them (dense); ops/library.py's fake implementations use it too."""
    r = None if residual is None else torch.empty_like(residual, memory_format=torch.contiguous_format)
    return torch.empty_like(x, memory_format=torch.contiguous_format), r


def writes_dx(x: Tensor, r: Tensor, gate: Tensor | None, has_residual: bool) -> bool:
    """Whether the backward writes dx apart from the norm input's gradient drt: with a residual,
    when a gate scales x or x and r differ in dtype; otherwise dx is drt itself."""
    return has_residual and (gate is not None or x.dtype != r.dtype)


def grads_like(x: Tensor, r: Tensor, alpha: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None,
               bias: Tensor | None, gate: Tensor | None, has_residual: bool, flags: tuple | None = None) -> list:
    """backward's gradients, allocated (dense; None where absent, dshift where shift is per token, dx
    where it is the residual's gradient): [dx, dresidual, dgate, dshift, dscale, dweight, dbias, dalpha].
    flags: (shift per token, scale per token, write dx), when known. ops/library.py's fakes use it."""
    B, L, D = x.shape
    dev = x.device
    shift_tok, scale_tok, write_dx = flags or (per_token(shift, L), per_token(scale, L),
                                               writes_dx(x, r, gate, has_residual))
    drt = torch.empty((B, L, D), dtype=r.dtype, device=dev)
    dx = torch.empty((B, L, D), dtype=x.dtype, device=dev) if write_dx else drt
    dshift = None if shift_tok else torch.empty(shift.shape, dtype=shift.dtype, device=dev)
    dscale = torch.empty(scale.shape, dtype=scale.dtype, device=dev)
    dgate = None if gate is None else torch.empty(gate.shape, dtype=gate.dtype, device=dev)
    dw = None if weight is None else torch.empty_like(weight)
    db = None if bias is None else torch.empty_like(bias)
    return [dx, drt if has_residual else None, dgate, dshift, dscale, dw, db, torch.empty_like(alpha)]


def forward(x: Tensor, alpha: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None,
            residual: Tensor | None, gate: Tensor | None, launch=None, slot: list | None = None
            ) -> tuple[Tensor, Tensor | None]:
    """(h, r) with one launch; r is None without a residual. `slot`, from functional.py, belongs to a
    validated argument signature (strides of the modulations included): [forward call, {has_dr:
    backward call}, whether x, residual and the vectors are contiguous and the modulations have unit
    channel stride, i.e. the launches read every tensor in place]."""
    if slot is not None and slot[0] is not None and launch is None:
        # A validated signature read in place: the tensors are their own rows, and the launch
        # configuration and every integer argument are the signature's, so a direct launch.
        cfg, ints, runners = slot[0]
        h = torch.empty_like(x)
        r = None if residual is None else torch.empty_like(residual)
        res = x if residual is None else residual
        g = x if gate is None else gate
        w = x if weight is None else weight
        b = x if bias is None else bias
        direct.launch(_modulate_fwd_kernel, cfg.grid, cfg.consts, cfg.options, runners,
                      (x, res, g, shift, scale, alpha, w, b, h, h if r is None else r, *ints),
                      (x, res, g, shift, scale, alpha, w, b))
        return h, r
    B, L, D = x.shape
    h, r = outputs_like(x, residual)
    if x.numel() == 0:
        return h, r
    x2, h2 = rows_view(x, D), h.view(-1, D)
    res2 = x2 if residual is None else rows_view(residual, D)
    r2 = h2 if r is None else r.view(-1, D)
    gate_t, sgb, sgl = _mod_strides(gate, L)
    shift_t, sshb, sshl = _mod_strides(shift, L)
    scale_t, sscb, sscl = _mod_strides(scale, L)
    wide = _wide(B, L, D, (x2, res2), ((sgb, sgl), (sshb, sshl), (sscb, sscl)))   # h2, r2: dense
    key = (B, L, D, x.dtype, _dt(residual, x.dtype), _dt(gate, x.dtype), shift.dtype, scale.dtype, alpha.dtype,
           _dt(weight, alpha.dtype), _dt(bias, alpha.dtype), residual is not None, gate is not None,
           weight is not None, bias is not None, alpha.numel() > 1, x.device, wide)
    cfg = _FWD.get(key) or _forward_launch(key)
    ints = (B * L, D, L, x2.stride(0), res2.stride(0), h2.stride(0), r2.stride(0), sgb, sgl, sshb, sshl, sscb, sscl)
    P.run(_modulate_fwd_kernel, cfg, launch,
          x2, res2, x2 if gate_t is None else gate_t, shift_t, scale_t, alpha,
          x2 if weight is None else weight, x2 if bias is None else bias, h2, r2, *ints)
    if slot is not None and slot[2] and launch is None and not wide:
        # read in place: the views above were the tensors themselves. The slot keeps its own runners
        # (direct.py): its integers are its own (the modulations' strides), not the configuration's,
        # and Triton specializes on them (divisibility by 16, the value 1).
        slot[0] = (cfg, ints, {})
    return h, r


def _layout(x, r, alpha, shift, scale, weight, bias, gate) -> tuple:
    """What a cached backward call assumes of the saved tensors, to check it against what autograd
    unpacks: x's, r's, scale's and gate's strides are in its integer arguments, the vectors are read
    at unit stride, and the kernel reads each in its dtype (a saved-tensor hook may unpack another);
    it writes dshift in shift's (`shift.data = ...half()` between the forward and the backward
    changes that under the graph: the saved tensor is the same object)."""
    return (x.stride(), r.stride(), alpha.is_contiguous(), weight is None or weight.is_contiguous(),
            bias is None or bias.is_contiguous(), scale.stride(), None if gate is None else gate.stride(),
            x.dtype, r.dtype, alpha.dtype, shift.dtype, scale.dtype, None if weight is None else weight.dtype,
            None if bias is None else bias.dtype, None if gate is None else gate.dtype)


def backward(dh: Tensor, dr: Tensor | None, x: Tensor, r: Tensor, alpha: Tensor, shift: Tensor, scale: Tensor,
             weight: Tensor | None, bias: Tensor | None, gate: Tensor | None, has_residual: bool, launch=None,
             slot: list | None = None):
    """(dx, dresidual, dgate, dshift, dscale, dweight, dbias, dalpha) with two launches, each shaped
    and typed like its input; None for absent inputs, and dshift None when shift is per token (its
    gradient is dh itself). r is the norm's input (x itself without a residual). `slot`: forward's."""
    B, L, D = x.shape
    dev = x.device
    if dh.is_neg():   # lazily negated gradients (autograd hands on torch.complex's): read them negated
        dh = dh.resolve_neg()
    if dr is not None and dr.is_neg():
        dr = dr.resolve_neg()
    # A saved-tensor hook may unpack x or r in another dtype than the forward's: x's is h's (dh's), r's
    # is dr's where it comes. (Other dtypes the launch plans read as they come.)
    if x.dtype != dh.dtype:
        xc = x.to(dh.dtype)
        x, r = xc, (xc if r is x else r)
    if dr is not None and r.dtype != dr.dtype:
        r = r.to(dr.dtype)
    call = None
    if slot is not None and launch is None and dh.is_contiguous() and (dr is None or dr.is_contiguous()):
        call = slot[1].get(dr is not None)
        if call is not None and call[6] != _layout(x, r, alpha, shift, scale, weight, bias, gate):
            # a saved-tensor hook registered on one tensor after the forward
            # (grad_fn._raw_saved_tensors[i].register_hooks) unpacked another layout than the call's
            call = None
    if call is not None:
        cfg, shift_tok, scale_tok, gate_tok, write_dx, ints, _, runners = call
    else:
        shift_tok, scale_tok = per_token(shift, L), per_token(scale, L)
        gate_tok = gate is not None and per_token(gate, L)
        write_dx = writes_dx(x, r, gate, has_residual)
    grads = grads_like(x, r, alpha, shift, scale, weight, bias, gate, has_residual, (shift_tok, scale_tok, write_dx))
    dx, dgate, dshift, dscale, dw, db, da = grads[0], *grads[2:]
    drt = grads[1] if has_residual else dx
    if call is not None:
        # A validated signature read in place (and a contiguous dh, dr): the tensors are their own
        # rows, every integer argument is the signature's.
        p = cfg.plan
        dh2, r2, drt2, dx2, gate_t, scale_t = dh, r, drt, dx, gate, scale
        dr2 = r if dr is None else dr
        x2 = x if gate is not None else r
    else:
        if x.numel() == 0:
            for t in grads[2:]:
                if t is not None:
                    t.zero_()
            return grads
        # The vectors are read at unit stride; the forward's checks made them so, but a saved-tensor
        # hook may unpack them otherwise (contiguous() is the tensor itself when it is).
        alpha, weight, bias = (None if t is None else t.contiguous() for t in (alpha, weight, bias))
        dh2, r2, drt2 = rows_view(dh, D), rows_view(r, D), drt.view(-1, D)
        dr2 = r2 if dr is None else rows_view(dr, D)
        x2 = rows_view(x, D) if gate is not None else r2
        dx2 = dx.view(-1, D)
        gate_t, sgb, sgl = _mod_strides(gate, L)
        scale_t, sscb, sscl = _mod_strides(scale, L)
        # drt2, dx2 and the per-token gradients are dense (B*L*D); a per-sample one's offsets are in the partials
        wide = _wide(B, L, D, (dh2, dr2, r2, x2), ((sgb, sgl), (sscb, sscl)))
        key = (B, L, D, x.dtype, r.dtype, _dt(gate, x.dtype), scale.dtype, alpha.dtype, _dt(weight, alpha.dtype),
               _dt(bias, alpha.dtype), shift.dtype, has_residual, dr is not None, gate is not None, write_dx,
               weight is not None, bias is not None, alpha.numel() > 1, shift_tok, scale_tok, gate_tok, dev, wide)
        cfg = _BWD.get(key) or _backward_launch(key)
        p = cfg.plan
        ints = (D, L, p.chunks, p.tiles_per_chunk, p.units_per_program, B * p.chunks,
                dh2.stride(0), dr2.stride(0), r2.stride(0), x2.stride(0), drt2.stride(0), dx2.stride(0),
                sgb, sgl, sscb, sscl, p.sample_stride, p.channel_stride)
        contiguous = dh.is_contiguous() and (dr is None or dr.is_contiguous())
        if slot is not None and slot[2] and launch is None and contiguous and not wide:
            slot[1][dr is not None] = (cfg, shift_tok, scale_tok, gate_tok, write_dx, ints,
                                       _layout(x, r, alpha, shift, scale, weight, bias, gate), {})   # own runners
    part = torch.empty(3 * (p.sample_stride + p.channel_stride), dtype=torch.float32, device=dev)
    args = (dh2, dr2, r2, x2, x2 if gate_t is None else gate_t, scale_t, alpha,
            x2 if weight is None else weight, x2 if bias is None else bias,
            drt2, dx2, dscale if scale_tok else drt2, dgate if gate_tok else drt2,
            part if dshift is None else dshift, part if scale_tok else dscale,
            part if dgate is None or gate_tok else dgate, part, *ints)
    if call is not None:
        direct.launch(_modulate_bwd_kernel, cfg.grid, cfg.consts, cfg.options, runners, args, args[:9])
    else:
        P.run(_modulate_bwd_kernel, cfg, launch, *args)
    dsts = [g for g in (dw, db, da) if g is not None]
    if p.split:
        dsts += [g for g in (dshift, None if scale_tok else dscale, None if gate_tok else dgate) if g is not None]
    launch_finish(cfg.finish, part, dsts, launch)
    return grads
