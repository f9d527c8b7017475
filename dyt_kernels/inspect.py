"""Compile every kernel ahead of time for Hopper (sm_90a) on the CPU and print what the code looks like.

    python -m dyt_kernels.inspect [--quick] [--json FILE]

For each representative case the launchers run with their real launch heuristic, but the launch is
recorded instead of executed; the recorded kernel is then compiled with `triton.compile` for
GPUTarget("cuda", 90, 32), specialized as the JIT would (16-byte aligned pointers, ints divisible by
16 marked so), and ptxas reports registers and spills. The table shows the widths of the global loads
and stores (v4.b32 = 16 bytes) and which tanh was emitted. A case whose compiled kernel is identical
to an earlier row's (same code, e.g. D=4096 and D=65536 share a tile) is not repeated. No GPU is needed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}


@dataclass
class Report:
    kernel: str
    case: str
    dtype: str
    block: str
    warps: int
    registers: int
    spill_bytes: int
    loads: dict = field(default_factory=dict)   # instruction -> count
    stores: dict = field(default_factory=dict)
    tanh: str = ""

    def vector_ok(self) -> bool:
        """16-byte accesses for the main streams: no 2-byte scalar accesses, and v4 loads and stores."""
        scalar16 = any(k.endswith((".b16", ".u16")) for k in list(self.loads) + list(self.stores))
        return (not scalar16 and any(".v4." in k for k in self.loads) and any(".v4." in k for k in self.stores))


@contextlib.contextmanager
def _recording():
    """Make the launchers record (kernel, grid, args, kwargs) instead of launching, as on an sm_90 GPU."""
    from .ops import dyt as dyt_ops, launch, modulate as mod_ops

    calls = []

    def wrap(kernel):
        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append((kernel, grid, args, kwargs))
        return _Grid()

    saved = [(m, name, getattr(m, name)) for m in (dyt_ops, mod_ops) for name in ("wrap_triton", "use_triton")]
    saved.append((launch, "interpreter_active", launch.interpreter_active))
    try:
        for m in (dyt_ops, mod_ops):
            m.wrap_triton, m.use_triton = wrap, (lambda x: True)
        launch.interpreter_active = lambda: False
        yield calls
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _compile(kernel, args, kwargs):
    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for name, value in zip(names, args):
        i = names.index(name)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TT_DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        else:
            signature[name] = "i64" if abs(int(value)) >= 2**31 else "i32"
            if int(value) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {}
    for name, value in kwargs.items():
        if name in ("num_warps", "num_stages"):
            options[name] = value
            continue
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    src = ASTSource(kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), kernel.__name__


def _ptxas(ptx: str) -> tuple[int, int]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def _count(ptx: str, op: str) -> dict:
    counts: dict = {}
    for m in re.findall(rf"\b{op}\.global[\w.]*", ptx):
        counts[m] = counts.get(m, 0) + 1
    return dict(sorted(counts.items()))


def dyt_case(rows: int, D: int, dtype: torch.dtype, nchw: tuple | None = None):
    """A thunk running DyT forward + backward on uninitialized CPU tensors of a representative shape."""
    def run():
        x = torch.empty(nchw if nchw else (rows, D), dtype=dtype)
        w = torch.empty(nchw[1] if nchw else D, dtype=torch.float32)
        a = torch.empty(1, dtype=torch.float32)
        y = torch.ops.dyt_kernels.dyt_fwd(x, a, w, w, nchw is None)
        torch.ops.dyt_kernels.dyt_bwd(y, x, a, w, w, nchw is None)
    return run


def modulate_case(B: int, L: int, D: int, dtype: torch.dtype, residual: bool, gate: bool):
    """A thunk running dyt_modulate forward + backward (per-sample shift/scale/gate, no affine)."""
    def run():
        x = torch.empty(B, L, D, dtype=dtype)
        mod = torch.empty(B, D, dtype=dtype)
        a = torch.empty(1, dtype=torch.float32)
        res, g = (x if residual else None), (mod if gate else None)
        h, r = torch.ops.dyt_kernels.dyt_modulate_fwd(x, a, mod, mod, None, None, res, g)
        torch.ops.dyt_kernels.dyt_modulate_bwd(h, h if residual else None, x, r if residual else x, a, mod,
                                               None, None, g, residual, False)
    return run


def representative_cases(quick: bool = False):
    """(case name, dtype, thunk): production hidden sizes, bf16 and fp32, every fused variant."""
    sizes = [384, 4096] if quick else [384, 1152, 3072, 4096, 16384, 65536]
    variants = ((False, False), (True, True)) if quick else ((False, False), (True, False), (True, True))
    for dtype in (torch.bfloat16, torch.float32):
        for D in sizes:
            yield f"dyt D={D}", dtype, dyt_case(64, D, dtype)
        yield "dyt NCHW C=96 56x56", dtype, dyt_case(0, 0, dtype, nchw=(2, 96, 56, 56))
        for residual, gate in variants:
            tag = ("+residual" + ("+gate" if gate else "")) if residual else ""
            for D in ([384, 3072] if quick else [384, 1152, 3072]):
                yield f"modulate L=256 D={D}{tag}", dtype, modulate_case(2, 256, D, dtype, residual, gate)


def inspect_kernels(quick: bool = False, cases=None) -> list[Report]:
    """Compile the kernels each case launches; `cases` defaults to representative_cases(quick)."""
    reports, seen = [], set()
    with _recording() as calls:
        for case, dtype, run in (representative_cases(quick) if cases is None else cases):
            del calls[:]
            run()
            for kernel, grid, args, kwargs in calls:
                compiled, name = _compile(kernel, args, kwargs)
                key = (name, compiled.hash)
                if key in seen:
                    continue
                seen.add(key)
                ptx = compiled.asm["ptx"]
                regs, spills = _ptxas(ptx)
                # Read off the PTX: the MUFU tanh, or libdevice's ex2.approx + rcp + polynomial form.
                tanh = ("tanh.approx.f32" if "tanh.approx.f32" in ptx else
                        "libdevice (ex2-based)" if "ex2.approx" in ptx else "none found")
                reports.append(Report(
                    kernel=name.strip("_"), case=case, dtype=_TT_DTYPES[dtype],
                    block=f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}", warps=kwargs.get("num_warps", 4),
                    registers=regs, spill_bytes=spills, loads=_count(ptx, "ld"), stores=_count(ptx, "st"), tanh=tanh))
    return reports


def _fmt(counts: dict) -> str:
    return " ".join(f"{k.split('global.', 1)[1]}x{v}" for k, v in counts.items())


def format_table(reports: list[Report]) -> str:
    head = "| kernel | case | dtype | tile | warps | regs | spill B | global loads | global stores | tanh |"
    rows = [head, "|" + "---|" * 10]
    for r in reports:
        rows.append(f"| {r.kernel} | {r.case} | {r.dtype} | {r.block} | {r.warps} | {r.registers} | "
                    f"{r.spill_bytes} | {_fmt(r.loads)} | {_fmt(r.stores)} | {r.tanh} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer hidden sizes (the test suite's set)")
    p.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
    args = p.parse_args(argv)
    reports = inspect_kernels(quick=args.quick)
    print(format_table(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    bad = [r for r in reports if r.spill_bytes or not r.vector_ok()]
    if bad:
        print(f"\n{len(bad)} kernel(s) spill or miss 16-byte accesses: " + ", ".join(f"{r.kernel} [{r.case}]" for r in bad))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
