"""The static performance report: what the sm_90 code of every kernel shows, and what it predicts.

    python -m dyt_kernels.inspect [--quick] [--json FILE] [--dump DIR]

For each case the launch plans are built exactly as the launchers build them (ops/*.plan_*, an H100's
properties), each kernel is compiled ahead of time for sm_90a on the CPU (`plan.KernelSpec.compiled`:
no GPU needed) and its PTX and SASS are read:

    launches        kernels per call (forward 1; backward the main kernel + the finishing one)
    bytes           the minimum (each input read once, each output written once) and what the
                    launches move, the fp32 partial sums included ("side")
    regs, spill     ptxas's report; programs/SM from registers and shared memory; waves of the grid
    round trips     per loop iteration (or per program, without a loop): how many times a thread
                    waits on a load of its own before issuing the next; 1 means every load first
    in flight       main-stream bytes one SM has requested at once (resident programs x a tile)
    instr, MUFU     SASS instructions and special-function ops per element and thread
    est. % copy     perfmodel.py's estimate of min bytes / time / copy bandwidth

--dump DIR writes every kernel's PTX and SASS as <kernel>-<case>.ptx / .sass. Numbers are estimates
until a GPU measures them (bench/gpu_check.sh records them beside the measurements).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton

from . import perfmodel
from .ops import dyt as dyt_ops
from .ops import finish as finish_ops
from .ops import modulate as mod_ops
from .ops import plan as P

F32 = torch.float32


# --------------------------------------------------------------------------------------------------
# Reading the compiled code.

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def sass_text(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTRUCTION.finditer(text)]


def _registers(operands: str) -> set[int]:
    regs = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?\b", operands):
        regs.add(int(m.group(1)))
        if m.group(2):
            regs.add(int(m.group(1)) + 1)
    return regs


def load_bytes(opcode: str) -> int:
    m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", opcode)
    return _WIDTH[m.group(1)] if m else 4


def main_loop(ins: list) -> list | None:
    """The loop body (a backward branch's range) holding the most global loads, or None."""
    loops = []
    for addr, op, args in ins:
        m = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            loops.append([x for x in ins if start <= x[0] <= addr])
    return max(loops, key=lambda body: sum(op.startswith("LDG") for _, op, _ in body)) if loops else None


def conditional_block(body: list) -> set[int]:
    """Addresses of the largest region a forward branch skips inside the loop (the block that runs
    once per unit in the modulate backward)."""
    best: set[int] = set()
    end = body[-1][0]
    for addr, op, args in body:
        m = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if m and addr < int(m.group(1), 16) <= end:
            region = {a for a, _, _ in body if addr < a < int(m.group(1), 16)}
            best = max(best, region, key=len)
    return best


def round_trips(ins: list) -> int:
    """Waves of global loads: a new one starts when a load issues after a wait on an earlier load of
    the same pass (an instruction reading a register a pending load writes)."""
    pending: set[int] = set()
    waves, in_wave = 0, False
    for _, op, args in ins:
        parts = [p.strip() for p in args.split(",")]
        if op.startswith("LDG"):
            if _registers(",".join(parts[1:])) & pending:
                in_wave = False
            if not in_wave:
                waves, in_wave = waves + 1, True
            m = re.match(r"R(\d+)", parts[0])
            if m:
                first = int(m.group(1))
                pending |= set(range(first, first + max(1, load_bytes(op) // 4)))
            continue
        writes_none = op.startswith(("STG", "STS", "ST.", "RED", "ATOM", "BAR", "BRA", "EXIT", "RET"))
        used = _registers(args if writes_none else ",".join(parts[1:])) & pending
        if used:
            in_wave = False
            pending -= used
        m = None if writes_none else re.match(r"R(\d+)", parts[0])
        if m:
            pending.discard(int(m.group(1)))
    return waves


@dataclass
class CodeFacts:
    kernel: str
    registers: int
    spill_bytes: int
    shared: int
    loads: dict            # SASS global load opcode -> count
    stores: dict
    div64: int             # div/rem .s64/.u64 in the PTX
    tanh: str
    has_loop: bool
    round_trips: int       # per loop iteration, or per program without a loop
    instructions: int      # per iteration (without the once-per-unit block), or per program
    unit_block: int        # instructions of the once-per-unit block inside the loop
    prologue: int          # instructions outside the loop
    mufu: int              # per iteration, or per program

    def vector_ok(self) -> bool:
        """16-byte main-stream accesses: 128-bit loads and stores, no 2-byte scalar ones."""
        narrow = any(".U16" in k or ".S16" in k for k in list(self.loads) + list(self.stores))
        return not narrow and any(".128" in k for k in self.loads) and any(".128" in k for k in self.stores)


def code_facts(spec: P.KernelSpec, capability: int = 90) -> tuple[CodeFacts, str, str]:
    """(facts, PTX, SASS) of one kernel specialization."""
    compiled = spec.compiled(capability)
    ptx = compiled.asm["ptx"]
    res = P.ptxas_report(ptx, f"sm_{capability}a")
    sass = sass_text(compiled)
    ins = parse_sass(sass)
    body = main_loop(ins)
    count = lambda prefix: {op: n for op, n in sorted(  # noqa: E731
        {op: sum(1 for _, o, _ in ins if o == op) for _, op, _ in ins if op.startswith(prefix)}.items())}
    tanh = ("tanh.approx.f32" if "tanh.approx.f32" in ptx else "polynomial + ex2.approx" if "ex2.approx" in ptx
            else "none")
    if body:
        block = conditional_block(body)
        main = [x for x in body if x[0] not in block]
        facts = CodeFacts(spec.kernel.__name__.strip("_"), res.registers, res.spill_bytes,
                          max(res.shared, compiled.metadata.shared), count("LDG"), count("STG"),
                          len(re.findall(r"\b(?:div|rem)(?:\.\w+)*\.[su]64\b", ptx)), tanh, True,
                          round_trips(main), len(main), len(block), len(ins) - len(body),
                          sum(op.startswith("MUFU") for _, op, _ in main))
    else:
        facts = CodeFacts(spec.kernel.__name__.strip("_"), res.registers, res.spill_bytes,
                          max(res.shared, compiled.metadata.shared), count("LDG"), count("STG"),
                          len(re.findall(r"\b(?:div|rem)(?:\.\w+)*\.[su]64\b", ptx)), tanh, False,
                          round_trips(ins), len(ins), 0, 0, sum(op.startswith("MUFU") for _, op, _ in ins))
    return facts, ptx, sass


# --------------------------------------------------------------------------------------------------
# Cases and rows.

@dataclass(frozen=True)
class Case:
    op: str                 # "dyt" or "modulate"
    name: str
    dtype: torch.dtype
    shape: tuple            # (M, N) for dyt, (B, L, D) for modulate
    residual: bool = False  # modulate: residual + gate

    @property
    def label(self) -> str:
        return f"{self.op} {P.TT_DTYPES[self.dtype]} {self.name}"


REPORT_CASES = (
    Case("dyt", "16384x384", torch.bfloat16, (16384, 384)),
    Case("dyt", "8192x4096", torch.bfloat16, (8192, 4096)),
    Case("dyt", "4096x16384", torch.bfloat16, (4096, 16384)),
    Case("dyt", "4096x8192", F32, (4096, 8192)),
    Case("modulate", "1024x16x384", torch.bfloat16, (1024, 16, 384)),
    Case("modulate", "1024x16x384 +res+gate", torch.bfloat16, (1024, 16, 384), True),
    Case("modulate", "2x4096x4096", torch.bfloat16, (2, 4096, 4096)),
    Case("modulate", "2x4096x4096 +res+gate", torch.bfloat16, (2, 4096, 4096), True),
)
QUICK_CASES = (REPORT_CASES[0], REPORT_CASES[1], REPORT_CASES[3], REPORT_CASES[5], REPORT_CASES[7])


@dataclass
class Row:
    case: str
    direction: str
    launches: int
    min_bytes: int
    moved_bytes: int
    registers: int
    spill_bytes: int
    programs_per_sm: int
    waves: float
    round_trips: int
    inflight_kb: float
    instr_per_elem: float
    mufu_per_elem: float
    est_fraction: float
    limit: str
    tile: str
    kernels: list = field(default_factory=list)   # CodeFacts as dicts, main kernel first

    @property
    def side_pct(self) -> float:
        return 100.0 * (self.moved_bytes - self.min_bytes) / self.min_bytes


def _resident(grid: int, per_sm: int, sm_count: int) -> tuple[int, int]:
    """(programs resident per busy SM, SMs with work) for a grid the hardware deals out round-robin."""
    sms = min(grid, sm_count)
    return max(1, min(per_sm, -(-grid // sm_count))), sms


def _finish_spec(jobs: int) -> P.KernelSpec:
    args = [("part", "*fp32")]
    for j in range(finish_ops.MAX_JOBS):
        args += [(f"dst{j}", "*fp32"), (f"off{j}", "i32"), (f"S{j}", "i32"), (f"K{j}", "i32"), (f"end{j}", "i32")]
    # Offsets are multiples of 16 elements where the launchers lay the partials out (plan_partials).
    divisible = tuple(n for n, t in args if t.startswith("*") or n.startswith("off"))
    return P.KernelSpec(finish_ops._finish_kernel, tuple(args),
                        (("NUM_JOBS", jobs), ("BLOCK_S", finish_ops.BLOCK_S), ("BLOCK_K", finish_ops.BLOCK_K)),
                        divisible, finish_ops.NUM_WARPS)


def _finish_cost(side: int, outputs: int, gpu: perfmodel.GPUModel) -> perfmodel.LaunchCost:
    # Small and latency-bound: each thread reads a few 16-byte rows of partials.
    return perfmodel.LaunchCost("finish", side // 2 + outputs, 0.0, 0.0, 0.0, gpu.sm_count)


def _streaming_row(case: Case, direction: str, spec: P.KernelSpec, grid: int, tile: P.Tile, min_b: int,
                   main_streams: int, elems: int, gpu, props, facts_cache) -> Row:
    facts, *_ = facts_cache(spec)
    per_sm = P.occupancy(P.Resources(facts.registers, facts.shared, 0), tile.num_warps, props)
    resident, sms = _resident(grid, per_sm, props.sm_count)
    threads = 32 * tile.num_warps
    per_thread = tile.block_m * tile.block_n / threads
    vec_bytes = min(16, per_thread * case.dtype.itemsize)
    inflight = resident * threads * main_streams * vec_bytes
    cost = perfmodel.LaunchCost(facts.kernel, min_b, inflight, facts.instructions * tile.num_warps * grid,
                                facts.mufu * tile.num_warps * grid, sms)
    est = perfmodel.estimate([cost], min_b, gpu)
    return Row(case.label, direction, 1, min_b, min_b, facts.registers, facts.spill_bytes, per_sm,
               grid / (per_sm * props.sm_count), facts.round_trips, inflight / 1024,
               facts.instructions / per_thread, facts.mufu / per_thread, est["fraction_of_copy"],
               est["limits"][0], f"{tile.block_m}x{tile.block_n}/{tile.num_warps}w", [asdict(facts)])


def _persistent_row(case: Case, spec: P.KernelSpec, grid: int, per_sm_plan: int, tile: P.Tile, iterations: float,
                    unit_fraction: float, min_b: int, side: int, outputs: int, main_streams: int, jobs: int,
                    gpu, props, facts_cache) -> Row:
    facts, *_ = facts_cache(spec)
    fin, *_ = facts_cache(_finish_spec(jobs))
    resident, sms = _resident(grid, per_sm_plan, props.sm_count)
    threads = 32 * tile.num_warps
    per_thread = tile.block_m * tile.block_n / threads
    inflight = resident * threads * main_streams * per_thread * case.dtype.itemsize
    per_program = facts.prologue + iterations * (facts.instructions + unit_fraction * facts.unit_block)
    main = perfmodel.LaunchCost(facts.kernel, min_b + side // 2 - outputs, inflight,
                                per_program * tile.num_warps * grid, iterations * facts.mufu * tile.num_warps * grid,
                                sms)
    est = perfmodel.estimate([main, _finish_cost(side, outputs, gpu)], min_b, gpu)
    return Row(case.label, "bwd", 2, min_b, min_b + side, facts.registers, facts.spill_bytes, per_sm_plan,
               grid / (per_sm_plan * props.sm_count), facts.round_trips, inflight / 1024,
               (facts.instructions + unit_fraction * facts.unit_block) / per_thread, facts.mufu / per_thread,
               est["fraction_of_copy"], "+".join(est["limits"]), f"{tile.block_m}x{tile.block_n}/{tile.num_warps}w",
               [asdict(facts), asdict(fin)])


def dyt_rows(case: Case, gpu, props, facts_cache) -> list[Row]:
    M, N = case.shape
    elem = case.dtype.itemsize
    flags = dyt_ops.Flags(True, True, False, False)   # DyT's defaults: weight, bias, one alpha
    # Parameters in x's dtype, as `python -m bench kernels` draws them (a module moved with .to(dtype)),
    # so the prediction is for the kernel build the benchmark times.
    params = (case.dtype,) * 3
    fp = dyt_ops.plan_forward(M, N, N, case.dtype, params, flags, props)
    bp = dyt_ops.plan_backward(M, N, N, case.dtype, params, flags, props)
    fwd = _streaming_row(case, "fwd", fp.spec, fp.grid, fp.tile,
                         dyt_ops.min_bytes("fwd", M, N, elem, elem, elem * N, elem * N), 1, M * N, gpu, props,
                         facts_cache)
    bwd_min = dyt_ops.min_bytes("bwd", M, N, elem, elem, elem * N, elem * N)
    bwd = _persistent_row(case, bp.spec, bp.grid, bp.programs_per_sm, bp.tile, bp.steps, 0.0, bwd_min,
                          dyt_ops.side_bytes(bp, flags), elem * (1 + 2 * N), 2, 3, gpu, props, facts_cache)
    return [fwd, bwd]


def modulate_rows(case: Case, gpu, props, facts_cache) -> list[Row]:
    B, L, D = case.shape
    dt, elem, res = case.dtype, case.dtype.itemsize, case.residual
    ff = mod_ops.FwdFlags(res, res, False, False, False)    # PixArt-alpha / FLUX: no affine, one alpha
    # every tensor in x's dtype, alpha too, as the benchmark draws them (weight and bias are absent)
    fp = mod_ops.plan_forward(B, L, D, dt, (dt,) * 7, ff, props)
    bf = mod_ops.BwdFlags(res, res, res, res, False, False, False, False, False, False)
    bp = mod_ops.plan_backward(B, L, D, dt, (dt,) * 7, bf, props)
    fwd_min = mod_ops.min_bytes("fwd", B, L, D, elem, elem, elem, residual=res, gate=res)
    fwd = _streaming_row(case, "fwd", fp.spec, fp.grid, fp.tile, fwd_min, 2 if res else 1, B * L * D, gpu, props,
                         facts_cache)
    bwd_min = mod_ops.min_bytes("bwd", B, L, D, elem, elem, elem, residual=res, gate=res)
    iterations = bp.units_per_program * bp.tiles_per_chunk
    outputs = elem + (B * D * elem * (3 if res else 2) if bp.split else 0)
    jobs = 1 + ((3 if res else 2) if bp.split else 0)
    bwd = _persistent_row(case, bp.spec, bp.grid, bp.programs_per_sm, bp.tile, iterations, 1.0 / bp.tiles_per_chunk,
                          bwd_min, mod_ops.side_bytes(bp, bf, B, D), outputs, 4 if res else 2, jobs, gpu, props,
                          facts_cache)
    return [fwd, bwd]


def report(cases=REPORT_CASES, gpu: perfmodel.GPUModel = perfmodel.H100, dump: str | None = None) -> list[Row]:
    props = P.HOPPER
    cache: dict = {}

    def facts_cache(spec: P.KernelSpec):
        if spec not in cache:
            cache[spec] = code_facts(spec, props.capability)
        return cache[spec]

    rows = []
    for case in cases:
        made = (dyt_rows if case.op == "dyt" else modulate_rows)(case, gpu, props, facts_cache)
        rows += made
        if dump:
            os.makedirs(dump, exist_ok=True)
            for row in made:
                for facts_dict in row.kernels:
                    spec = next(s for s in cache if cache[s][0].kernel == facts_dict["kernel"]
                                and asdict(cache[s][0]) == facts_dict)
                    stem = f"{facts_dict['kernel']}-{case.op}-{P.TT_DTYPES[case.dtype]}-{case.name}-{row.direction}"
                    stem = re.sub(r"[^\w.+-]", "_", stem)
                    Path(dump, stem + ".ptx").write_text(cache[spec][1])
                    Path(dump, stem + ".sass").write_text(cache[spec][2])
    return rows


def predict(case: Case, gpu: perfmodel.GPUModel = perfmodel.H100) -> dict:
    """{"fwd" | "bwd" | "fwd_bwd": {"time_us", "fraction_of_copy"}} for one case: what the GPU
    benchmark should measure (its fwd_bwd is a training step's two passes)."""
    rows = report((case,), gpu)
    out, total_bytes, total_s = {}, 0, 0.0
    for r in rows:
        seconds = r.min_bytes / (r.est_fraction * gpu.copy_bw)
        out[r.direction] = {"time_us": seconds * 1e6, "fraction_of_copy": r.est_fraction}
        total_bytes, total_s = total_bytes + r.min_bytes, total_s + seconds
    out["fwd_bwd"] = {"time_us": total_s * 1e6, "fraction_of_copy": total_bytes / total_s / gpu.copy_bw}
    return out


def format_table(rows: list[Row]) -> str:
    head = ("| case | dir | launches | min MB | moved MB (side) | regs | spill | prog/SM | waves | round trips "
            "| KB in flight/SM | instr/elem | MUFU/elem | est. % of copy | limit | tile |")
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.direction} | {r.launches} | {r.min_bytes / 1e6:.1f} | {r.moved_bytes / 1e6:.1f} "
            f"({r.side_pct:.1f}%) | {r.registers} | {r.spill_bytes} | {r.programs_per_sm} | {r.waves:.2f} | "
            f"{r.round_trips} | {r.inflight_kb:.0f} | {r.instr_per_elem:.1f} | {r.mufu_per_elem:.2f} | "
            f"{100 * r.est_fraction:.0f}% | {r.limit} | {r.tile} |")
    return "\n".join(lines)


def problems(rows: list[Row]) -> list[str]:
    """The hard facts that must hold (tests/test_inspect.py asserts them too)."""
    out = []
    for r in rows:
        for k in r.kernels:
            if k["spill_bytes"]:
                out.append(f"{r.case} {r.direction}: {k['kernel']} spills {k['spill_bytes']} B")
            if k["div64"]:
                out.append(f"{r.case} {r.direction}: {k['kernel']} has 64-bit division")
        if r.round_trips != 1:
            out.append(f"{r.case} {r.direction}: {r.round_trips} load round trips")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="five cases (the test suite's set)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--dump", metavar="DIR", help="write each kernel's PTX and SASS into DIR")
    p.add_argument("--gpu", choices=("H100", "H200"), default="H100", help="the model's constants (perfmodel.py)")
    args = p.parse_args(argv)
    gpu = perfmodel.H100 if args.gpu == "H100" else perfmodel.H200
    rows = report(QUICK_CASES if args.quick else REPORT_CASES, gpu, args.dump)
    print(f"Static report, sm_90a, model: {gpu.name} ({gpu.copy_bw / 1e12:.2f} TB/s copy, {gpu.latency_ns:.0f} ns, "
          f"{gpu.sm_count} SMs, {gpu.launch_us} us per launch). Estimates until a GPU measures them.\n")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": asdict(gpu), "rows": [{**asdict(r), "side_pct": r.side_pct} for r in rows]}, f,
                      indent=1)
    bad = problems(rows)
    for line in bad:
        print("PROBLEM:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
