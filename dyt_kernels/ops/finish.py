"""The finishing launch of every backward: fp32 partial sums -> gradients, in a fixed order, in one kernel.

A backward kernel leaves each reduced gradient (dweight, dbias, dalpha, and per-sample dshift, dscale,
dgate when a sample is split over programs) as fp32 partials, one row per program. This kernel sums
them and writes each gradient in its parameter's dtype: every job's partials live in one fp32 buffer,
job j's at element offset off_j as (OUTER_j, S_j, K_j), and it writes dst_j[o, k] = sum_s
part[off_j + (o*S_j + s)*K_j + k], summing s in tile order, so the same inputs give bitwise the same
gradients (no atomics). Up to six jobs share one launch; program ids are dealt out to the jobs in
order (job j owns ids end_{j-1} .. end_j - 1).

Host cost: everything but the tensors is fixed per launch configuration, so it is planned once
(`plan_finish`) and a call only fills in the buffer and the gradients (`launch_finish`).

Bytes: it reads the partials once (S*K*4 per job) and writes the gradients; the plan keeps S small.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import triton
import triton.language as tl

from . import direct
from .plan import cdiv, positional_constexprs

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
    part,                        # fp32 partials of every job
    dst0, off0, S0, K0, end0,    # job 0: part[off0:] as (OUTER, S, K) -> dst (OUTER, K); ids < end0
    dst1, off1, S1, K1, end1,    # job 1, ids end0 .. end1 - 1 (used if NUM_JOBS > 1), and so on
    dst2, off2, S2, K2, end2,
    dst3, off3, S3, K3, end3,
    dst4, off4, S4, K4, end4,
    dst5, off5, S5, K5, end5,
    NUM_JOBS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < end0:
        _sum_job(part + off0, dst0, S0, K0, pid, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 1:
        if (pid >= end0) & (pid < end1):
            _sum_job(part + off1, dst1, S1, K1, pid - end0, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 2:
        if (pid >= end1) & (pid < end2):
            _sum_job(part + off2, dst2, S2, K2, pid - end1, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 3:
        if (pid >= end2) & (pid < end3):
            _sum_job(part + off3, dst3, S3, K3, pid - end2, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 4:
        if (pid >= end3) & (pid < end4):
            _sum_job(part + off4, dst4, S4, K4, pid - end3, BLOCK_S, BLOCK_K)
    if NUM_JOBS > 5:
        if (pid >= end4) & (pid < end5):
            _sum_job(part + off5, dst5, S5, K5, pid - end4, BLOCK_S, BLOCK_K)


def programs(outer: int, K: int) -> int:
    return outer * cdiv(K, BLOCK_K)


@dataclass(frozen=True)
class FinishPlan:
    """A finishing launch without its tensors: per job (offset, S, K, end), the grid, and the
    constexprs, by name (kwargs) and positional (consts, then the options)."""
    jobs: tuple
    grid: tuple
    kwargs: dict = field(hash=False, compare=False)
    consts: tuple = ()
    options: dict = field(default_factory=dict, hash=False, compare=False)
    runners: dict = field(default_factory=dict, hash=False, compare=False)   # direct.py's, by device


def plan_finish(jobs) -> FinishPlan:
    """Jobs are (offset, outer, S, K): dst (outer, K) = part[offset:] as (outer, S, K) summed over S."""
    if not 0 < len(jobs) <= MAX_JOBS:
        raise ValueError(f"a finishing launch takes 1 to {MAX_JOBS} jobs, got {len(jobs)}")
    planned, end = [], 0
    for offset, outer, S, K in jobs:
        end += programs(outer, K)
        planned.append((offset, S, K, end))
    kwargs = dict(NUM_JOBS=len(jobs), BLOCK_S=BLOCK_S, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return FinishPlan(tuple(planned), (end,), kwargs, *positional_constexprs(_finish_kernel, kwargs))


def launch_finish(fp: FinishPlan, part, dsts, launch=None) -> None:
    """The planned launch on this call's fp32 partials `part` and gradients `dsts` (one per job, in
    order); `launch` wraps the kernel (None, or wrap_triton inside custom ops)."""
    args = [part]
    for dst, ints in zip(dsts, fp.jobs):
        args.append(dst)
        args += ints
    args += (part, 0, 0, 1, fp.grid[0]) * (MAX_JOBS - len(fp.jobs))   # unused job slots
    if launch is None:
        # Every integer is the plan's and every pointer a fresh allocation: a direct launch (direct.py).
        direct.launch(_finish_kernel, fp.grid, fp.consts, fp.options, fp.runners, args)
    else:
        launch(_finish_kernel)[fp.grid](*args, **fp.kwargs)
