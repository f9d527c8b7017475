"""@triton.jit building blocks shared by every kernel family: the tanh forms, tile offsets, vector loads.

Kept free of host logic: the launch plan (plan.py) decides block shapes, the op files launch.
"""
from __future__ import annotations

import triton
import triton.language as tl

# tanh forms, chosen per output dtype by `tanh_mode` (a constexpr TANH in every kernel):
TANH_APPROX = 0  # tanh.approx.f32: one MUFU op, relative error ~2^-11, far below bf16/fp16 rounding
TANH_F32 = 1     # odd minimax polynomial below |z| = 0.9, 1 - 2/(1 + 2^(2z log2 e)) above: one MUFU.EX2
#                  and one fast division, within 4 * 2^-24 of tanh everywhere (tests pin it); also what
#                  the interpreter runs for every dtype, since it has no inline PTX.

# tanh z = z + z^3 P(z^2) on |z| < 0.9: P fitted by the project (Lawson iterations toward minimax
# relative error; 0.8 ulp in fp32 evaluation). Above 0.9, 1 - 2/(1 + e^2z): e^2z overflowing to inf
# gives exactly 1, and the 2/(1 + e) term is below 0.29, so the 2-ulp errors PTX allows ex2.approx and
# div.full cost at most 3.3 * 2^-24 (tests/test_tanh.py emulates them; the bound tested is 4 * 2^-24).
TANH_POLY_LIMIT = 0.9
TANH_POLY = (0.0013039478, -0.00686003, 0.020904105, -0.053721484, 0.1333036, -0.33333212)  # P5 .. P0
TWO_LOG2E = 2.8853900817779268  # 2 / ln 2
# The same numbers as compile-time constants for the kernels.
_LIMIT = tl.constexpr(TANH_POLY_LIMIT)
_P5, _P4, _P3, _P2, _P1, _P0 = (tl.constexpr(c) for c in TANH_POLY)
_TWO_LOG2E = tl.constexpr(TWO_LOG2E)

@triton.jit
def tanh_f32(z, MODE: tl.constexpr):
    """tanh of an fp32 tensor in the form MODE names (TANH_APPROX or TANH_F32)."""
    if MODE == 0:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        a = tl.abs(z)
        a2 = a * a
        p = (((((_P5 * a2 + _P4) * a2 + _P3) * a2 + _P2) * a2 + _P1) * a2 + _P0) * a2
        small = a + a * p
        big = 1.0 - 2.0 / (1.0 + tl.math.exp2(a * _TWO_LOG2E))
        t = tl.where(a < _LIMIT, small, big)
        # copysign(t, z): t is tanh|z| >= +0 here, so OR-ing in z's sign bit gives tanh(-0) = -0 too,
        # where negating on z < 0 gave +0 (one LOP3 in SASS, where the select was a compare and a select)
        t = (t.to(tl.uint32, bitcast=True) | (z.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32,
                                                                                              bitcast=True)
    return t


@triton.jit
def row_offsets(rows, stride, INDEX_64: tl.constexpr):
    """Element offsets of `rows` (int32) at `stride`, as a column: 32-bit unless INDEX_64."""
    if INDEX_64:
        off = rows.to(tl.int64) * stride
    else:
        off = rows * stride
    return off[:, None]


@triton.jit
def level_row_offsets(rows, stride_2, n2, n1, stride_1, stride_0, INDEX_64: tl.constexpr):
    """Element offsets of `rows` of a view whose rows are three strided levels (row = (i0*n1 + i1)*n2
    + i2, offset i0*stride_0 + i1*stride_1 + i2*stride_2), as a column: attention's head views of a
    fused qkv projection, read in place. The divisions are 32-bit (rows < 2^31)."""
    i2 = rows % n2
    q = rows // n2
    i1 = q % n1
    i0 = q // n1
    if INDEX_64:
        off = i0.to(tl.int64) * stride_0 + i1.to(tl.int64) * stride_1 + i2.to(tl.int64) * stride_2
    else:
        off = i0 * stride_0 + i1 * stride_1 + i2 * stride_2
    return off[:, None]


@triton.jit
def x_row_offsets(rows, stride_2, n2, n1, stride_1, stride_0, X_LEVELS: tl.constexpr, INDEX_64: tl.constexpr):
    """Row offsets of x: one strided level (X_LEVELS = 1, `stride_2` its stride) or three."""
    if X_LEVELS == 3:
        off = level_row_offsets(rows, stride_2, n2, n1, stride_1, stride_0, INDEX_64)
    else:
        off = row_offsets(rows, stride_2, INDEX_64)
    return off


@triton.jit
def channel_cols(block, BLOCK_N: tl.constexpr):
    """Column indices of column block `block`, marked contiguous so loads can be 16 bytes wide."""
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)


@triton.jit
def load_tile(ptr, row_off, cols, mask):
    """A (rows, cols) tile as fp32; masked lanes read 0."""
    return tl.load(ptr + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_channels(ptr, cols, col_ok, BLOCK_M: tl.constexpr):
    """A per-channel vector as a full (BLOCK_M, BLOCK_N) tile with row stride 0.

    It then has the tile's own register layout (16-byte loads, no shared-memory reshuffle); the
    repeated rows are served by L1.
    """
    zero_rows = tl.zeros((BLOCK_M,), dtype=tl.int32)[:, None]
    mask = (zero_rows == 0) & col_ok[None, :]
    return tl.load(ptr + zero_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_row_vector(ptr, ch, ch_ok):
    """A per-channel vector indexed by row (channels-first, one channel per row), as a (BLOCK_M, 1)
    column that broadcasts along the row: one register per row a thread holds."""
    return tl.load(ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[:, None]
