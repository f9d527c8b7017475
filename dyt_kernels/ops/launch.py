"""What every kernel family shares: the launch heuristic, the tanh forms, the 2-D row layout.

Launch shapes come from `tile_config` and `reduction_programs` only. A program owns a BLOCK_M x BLOCK_N
tile (rows x channels) sized by bytes, so any hidden size works: BLOCK_N is capped, wide rows are
split across programs, and narrow rows are stacked BLOCK_M deep. Row counts stay runtime arguments.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..backend import interpreter_active

# tanh forms, picked per launch by `tanh_mode`:
TANH_EXP = 0     # exp-based (+ odd series near 0): the interpreter runs neither PTX nor libdevice
TANH_ACCURATE = 1  # libdevice tanh, ~1-2 ulp in fp32: for fp32 outputs
TANH_APPROX = 2  # tanh.approx.f32, one MUFU op, rel. error ~2^-11: plenty below bf16/fp16 rounding

MAX_BLOCK_N = 1024


def tanh_mode(dtype: torch.dtype) -> int:
    if interpreter_active():
        return TANH_EXP
    return TANH_ACCURATE if dtype == torch.float32 else TANH_APPROX


@triton.jit
def tanh_f32(z, MODE: tl.constexpr):
    """tanh of an fp32 tensor in the form MODE names (see TANH_* in launch.py)."""
    if MODE == 2:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32,
                                      is_pure=True, pack=1)
    elif MODE == 1:
        t = libdevice.tanh(z)
    else:
        # tanh|z| = (1 - e) / (1 + e), e = exp(-2|z|): no overflow. Below |z| = 1/8 the subtraction
        # loses bits, so use the odd series z - z^3/3 + 2z^5/15 - 17z^7/315 (truncation < 2e-10 rel.).
        a = tl.abs(z)
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        z2 = a * a
        small = a * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0))))
        t = tl.where(a < 0.125, small, big)
        t = tl.where(z < 0, -t, t)
    return t


@triton.jit
def tile_coords(pid, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column indices of program pid's tile, tiles laid row-major over an (M, N) grid."""
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    rows = (pid // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def block_n_for(N: int, max_block_n: int = MAX_BLOCK_N) -> int:
    """Channels per tile: the widest power of two (<= max_block_n) that pads N by at most 1/8."""
    if N <= 64:
        return triton.next_power_of_2(N)
    bn = min(triton.next_power_of_2(N), max_block_n)
    while bn > 16 and triton.cdiv(N, bn) * bn - N > N // 8:
        bn //= 2
    return bn


def tile_config(M: int, N: int, elem_size: int, tile_bytes: int = 16384, max_block_n: int = MAX_BLOCK_N):
    """(BLOCK_M, BLOCK_N, num_warps) for an M x N problem whose main input has elem_size bytes.

    tile_bytes of the main input per program (16 KB forward; less in backward, which keeps several
    fp32 accumulators live); one warp per 256 elements, at most 8, so a thread holds 8-32 elements
    in 16-byte vectors.
    """
    block_n = block_n_for(int(N), max_block_n)  # a symbolic hidden size (torch.compile) specializes here
    elems = max(tile_bytes // elem_size, block_n)
    block_m = max(1, elems // block_n)
    if isinstance(M, int):
        # Few rows: don't pad the tile past them. A symbolic row count (torch.compile's dynamic
        # shapes) skips this rather than specializing the graph on it; the masks keep it correct.
        block_m = min(block_m, triton.next_power_of_2(max(M, 1)))
    num_warps = max(1, min(8, (block_m * block_n) // 256))
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduction_programs(device: torch.device, steps: int, other_programs: int) -> int:
    """How many programs split a reduction axis of `steps` tiles (each writes one fp32 partial).

    On a GPU: enough for ~4 programs per SM in total, so the partial buffers stay small. Under the
    interpreter every program costs ~1 ms, so a handful.
    """
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    if not isinstance(steps, int) or not isinstance(other_programs, int):
        return target  # symbolic sizes: the launcher clamps G with cdiv, which stays symbolic
    return max(1, min(steps, triton.cdiv(target, max(other_programs, 1))))


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t viewed as (rows, n) with unit stride along n, copying only when no such view exists."""
    if t.dim() == 2 and (t.stride(1) == 1 or n == 1):
        return t
    try:
        v = t.view(-1, n)
    except RuntimeError:
        v = t.reshape(-1, n)
    if v.stride(1) != 1 and n != 1:
        v = v.contiguous()
    return v
