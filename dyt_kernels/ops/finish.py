"""The finishing launch of every backward: fp32 partial sums -> gradients, in a fixed order, in one kernel.

A backward kernel leaves each reduced gradient (dweight, dbias, dalpha, and per-sample dshift, dscale,
dgate when a sample is split over programs) as fp32 partials, one row per program. This kernel sums
them and writes each gradient in its parameter's dtype: job j reads src_j as (OUTER_j, S_j, K_j) and
writes dst_j[o, k] = sum_s src_j[o, s, k], summing s in tile order, so the same inputs give bitwise
the same gradients (no atomics). Up to six jobs share one launch; program ids are dealt out to the
jobs in order (job j owns ids end_{j-1} .. end_j - 1).

Bytes: it reads the partials once (S*K*4 per job) and writes the gradients; the plan keeps S small.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .plan import cdiv

MAX_JOBS = 6
BLOCK_S = 16
BLOCK_K = 128
NUM_WARPS = 4


@triton.jit
def _sum_job(src, dst, S, K, pid, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    k_blocks = tl.cdiv(K, BLOCK_K)
    outer = pid // k_blocks
    cols = (pid % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    base = src + outer.to(tl.int64) * S * K
    acc = tl.zeros((BLOCK_S, BLOCK_K), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        mask = (rows < S)[:, None] & col_ok[None, :]
        acc += tl.load(base + rows[:, None] * K + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(dst + outer.to(tl.int64) * K + cols, total.to(dst.dtype.element_ty), mask=col_ok)


@triton.jit
def _finish_kernel(
    src0, dst0, S0, K0, end0,   # job 0: src (OUTER, S, K) fp32 partials -> dst (OUTER, K); ids < end0
    src1, dst1, S1, K1, end1,   # job 1, ids end0 .. end1 - 1 (used if NUM_JOBS > 1), and so on
    src2, dst2, S2, K2, end2,
    src3, dst3, S3, K3, end3,
    src4, dst4, S4, K4, end4,
    src5, dst5, S5, K5, end5,
    NUM_JOBS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < end0:
        _sum_job(src0, dst0, S0, K0, pid, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 1:
        if (pid >= end0) & (pid < end1):
            _sum_job(src1, dst1, S1, K1, pid - end0, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 2:
        if (pid >= end1) & (pid < end2):
            _sum_job(src2, dst2, S2, K2, pid - end1, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 3:
        if (pid >= end2) & (pid < end3):
            _sum_job(src3, dst3, S3, K3, pid - end2, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 4:
        if (pid >= end3) & (pid < end4):
            _sum_job(src4, dst4, S4, K4, pid - end3, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 5:
        if (pid >= end4) & (pid < end5):
            _sum_job(src5, dst5, S5, K5, pid - end4, BLOCK_S, BLOCK_K)


def programs(outer: int, K: int) -> int:
    return outer * cdiv(K, BLOCK_K)


def finish(jobs: list[tuple], launch) -> None:
    """One launch that completes every job, each (src, dst, outer, S, K): dst (outer, K) = src
    (outer, S, K) summed over S, both flat; `launch` wraps the kernel (None, or wrap_triton)."""
    if not jobs:
        return
    args, end = [], 0
    for src, dst, outer, S, K in jobs:
        end += outer * cdiv(K, BLOCK_K)
        args += (src, dst, S, K, end)
    args += (args[0], args[1], 0, 1, end) * (MAX_JOBS - len(jobs))
    (_finish_kernel if launch is None else launch(_finish_kernel))[(end,)](*args, NUM_JOBS=len(jobs), BLOCK_S=BLOCK_S, BLOCK_K=BLOCK_K,
                                    num_warps=NUM_WARPS)
