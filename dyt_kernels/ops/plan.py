"""Launch plans: block shapes, warps and grids as pure functions of (shape, dtype, device properties).

Every launcher, `python -m dyt_kernels.inspect` and the tests get their numbers from here, so what is
inspected is what runs. The rules (docs/PERFORMANCE.md explains the numbers):

- A tile is BLOCK_M rows x BLOCK_N channels with BLOCK_N a power of two that pads the hidden size by at
  most 1/8 (no whole-row-in-registers cliff: wide rows split across column blocks).
- Streaming kernels (forwards) give every program one tile of ~16 KB of the main input.
- Reduction kernels (backwards) are persistent: a column block's rows are split over just enough
  programs to fill every SM once (programs per SM from the compiled kernel's registers and shared
  memory, as the hardware schedules them), so the launch is one wave and the fp32 partial sums, one
  row per program, stay a few percent of the main traffic.
- Offsets are 32-bit unless a tensor reaches 2^31 elements (INDEX_64); row indices are always 32-bit.
"""
from __future__ import annotations

import functools
import operator
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

from . import direct

INT32_LIMIT = 2 ** 31


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    return cdiv(n, multiple) * multiple


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


@dataclass(frozen=True)
class DeviceProps:
    """What a launch plan needs to know about the GPU (defaults: an H100 SXM / H200, compute 9.0)."""
    name: str = "H100 SXM"
    sm_count: int = 132
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_programs_per_sm: int = 32
    smem_per_sm: int = 233472         # 228 KB, of which each resident program reserves smem_reserved
    smem_reserved: int = 1024
    capability: int = 90              # compile target for reading registers; 0 = the Triton interpreter

    @property
    def interpreter(self) -> bool:
        return self.capability == 0


HOPPER = DeviceProps()
# The interpreter runs each program instance as ~1 ms of numpy: plan as for a small GPU, enough
# programs to split every reduction (the tests rely on it) and few enough to stay fast.
INTERPRETER_PROPS = DeviceProps(name="Triton interpreter", sm_count=8, capability=0)


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int) -> DeviceProps:
    p = torch.cuda.get_device_properties(index)
    major, minor = torch.cuda.get_device_capability(index)
    return DeviceProps(
        name=p.name, sm_count=p.multi_processor_count,
        regs_per_sm=getattr(p, "regs_per_multiprocessor", 65536),
        max_warps_per_sm=getattr(p, "max_threads_per_multi_processor", 2048) // 32,
        smem_per_sm=getattr(p, "shared_memory_per_multiprocessor", 233472),
        capability=10 * major + minor,
    )


def device_props(device: torch.device) -> DeviceProps:
    if device.type == "cuda":
        return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROPS


@dataclass(frozen=True)
class Resources:
    registers: int
    shared: int
    spill_bytes: int


def occupancy(res: Resources, num_warps: int, props: DeviceProps) -> int:
    """Programs of num_warps warps one SM holds at once (registers allocated per warp in 256s)."""
    if props.interpreter:
        return 1
    regs_per_warp = cdiv(max(res.registers, 1) * 32, 256) * 256
    by_regs = props.regs_per_sm // (regs_per_warp * num_warps)
    by_warps = props.max_warps_per_sm // num_warps
    by_smem = props.smem_per_sm // (res.shared + props.smem_reserved)
    return max(0, min(by_regs, by_warps, by_smem, props.max_programs_per_sm))


def ptxas_path() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(ptx: str, arch: str = "sm_90a") -> Resources:
    """Registers and spill bytes as the bundled ptxas reports them for one kernel's PTX."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas_path(), "-v", "--gpu-name", arch, path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    smem = sum(int(v) for v in re.findall(r"(\d+) bytes smem", text))
    return Resources(regs, smem, spills)


@functools.lru_cache(maxsize=None)
def compile_kernel(kernel, signature: tuple, constexprs: tuple, divisible: tuple, num_warps: int, capability: int,
                   maxnreg: int | None = None):
    """triton.compile for the given target, specialized as the JIT specializes a launch: 16-byte
    aligned pointers and ints divisible by 16 marked so. Runs on a CPU (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = dict(signature)
    sig.update({name: "constexpr" for name, _ in constexprs})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    consts = {(names.index(n),): v for n, v in constexprs}
    src = ASTSource(kernel, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps} if maxnreg is None else {"num_warps": num_warps, "maxnreg": maxnreg}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


@functools.lru_cache(maxsize=None)
def _resources(kernel, signature: tuple, constexprs: tuple, divisible: tuple, num_warps: int,
               capability: int, maxnreg: int | None) -> Resources:
    compiled = compile_kernel(kernel, signature, constexprs, divisible, num_warps, capability, maxnreg)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    res = ptxas_report(compiled.asm["ptx"], arch)
    return Resources(res.registers, max(res.shared, compiled.metadata.shared), res.spill_bytes)


@dataclass(frozen=True)
class KernelSpec:
    """One specialization of a kernel: its argument types, constexprs and warps (hashable)."""
    kernel: object
    signature: tuple      # ((arg name, "*bf16" | "i32" | ...), ...) for every runtime argument
    constexprs: tuple     # ((name, value), ...)
    divisible: tuple      # names of pointer / int arguments known to be multiples of 16
    num_warps: int
    maxnreg: int | None = None  # register cap handed to ptxas (None: ptxas decides)

    def resources(self, props: DeviceProps) -> Resources:
        if props.interpreter:
            return Resources(0, 0, 0)
        return _resources(self.kernel, self.signature, self.constexprs, self.divisible, self.num_warps,
                          props.capability, self.maxnreg)

    def compiled(self, capability: int = 90):
        return compile_kernel(self.kernel, self.signature, self.constexprs, self.divisible, self.num_warps,
                              capability, self.maxnreg)

    def launch_kwargs(self) -> dict:
        kw = {**dict(self.constexprs), "num_warps": self.num_warps}
        if self.maxnreg is not None:
            kw["maxnreg"] = self.maxnreg
        return kw


TT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def pointer(dtype: torch.dtype) -> str:
    return "*" + TT_DTYPES[dtype]


def block_n_for(N: int, max_block_n: int) -> int:
    """Channels per tile: the widest power of two (<= max_block_n) that pads N by at most 1/8."""
    if N <= 16:
        return next_pow2(N)
    bn = min(next_pow2(N), max_block_n)
    while bn > 16 and cdiv(N, bn) * bn - N > N // 8:
        bn //= 2
    return bn


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int


def tile_for(M: int, N: int, elems: int, max_block_n: int, max_warps: int, elems_per_thread: int) -> Tile:
    """A tile of about `elems` elements: BLOCK_N from the hidden size, BLOCK_M rows to fill it (never
    more rows than M needs), one warp per 32*elems_per_thread elements (1 to max_warps)."""
    block_n = block_n_for(N, max_block_n)
    block_m = max(1, min(elems // block_n, next_pow2(M)))
    warps = max(1, min(max_warps, (block_m * block_n) // (32 * elems_per_thread)))
    return Tile(block_m, block_n, pow2_floor(warps))


def vector_width(dtype: torch.dtype) -> int:
    """Elements in one 16-byte access."""
    return 16 // torch.empty((), dtype=dtype).element_size()


STREAM_WARPS = 8
# Left alone, ptxas fits a streaming kernel into 32 registers (full occupancy) by sinking some loads
# below the math that uses earlier ones: a second memory round trip (seen in the modulate forward
# with a gated residual). A cap of 40 lets it issue every load first, at 48 of 64 warps per SM.
STREAM_MAXNREG = 40


def streaming_maxnreg(vectors: int) -> int:
    """The register cap for a streaming kernel whose threads load `vectors` 16-byte vectors: room for
    all of them (4 registers each) plus ~16 for addresses and math, never below STREAM_MAXNREG."""
    return max(STREAM_MAXNREG, cdiv(4 * vectors + 16, 8) * 8)


def streaming_tile(M: int, N: int, dtype: torch.dtype, max_block_n: int) -> Tile:
    """A forward's tile: exactly one 16-byte vector of the main input per thread (8 warps: 4 KB).

    With one vector per thread every load of the tile is independent and ptxas issues them all
    before the first use (with several rows per thread it interleaves them with the math: one
    memory round trip per row); per-channel vectors load as broadcast tiles in the same layout. The
    registers stay near 32, so an SM holds 64 warps: 32 KB of x in flight, Little's law's need.
    """
    vec = vector_width(dtype)
    return tile_for(M, N, STREAM_WARPS * 32 * vec, max_block_n, STREAM_WARPS, vec)


def needs_index64(*numels: int) -> bool:
    return max(numels, default=0) >= INT32_LIMIT


def row_span(t) -> int:
    """How far the element offsets of a (rows, cols) view with unit column stride reach: a strided
    view's rows can reach past 2^31 elements while rows * cols stays far below."""
    M, N = t.shape
    return 0 if M == 0 else (M - 1) * t.stride(0) + N


def check_rows(M: int) -> None:
    if M >= INT32_LIMIT:
        raise ValueError(f"x has {M} rows (elements / channels); at most 2^31 - 1 rows are supported")


def split_reduction(tiles: int, col_blocks: int, per_sm: int, props: DeviceProps) -> tuple[int, int]:
    """(programs per column block, tiles per program): one wave of the device's program slots."""
    slots = max(1, per_sm) * props.sm_count
    programs = max(1, min(tiles, slots // max(col_blocks, 1)))
    steps = cdiv(tiles, programs)
    return cdiv(tiles, steps), steps


@dataclass(frozen=True)
class ForwardPlan:
    """A streaming kernel's plan: one tile per program, over rows x cols."""
    tile: Tile
    grid: int
    index64: bool
    spec: KernelSpec
    rows: int = 0
    cols: int = 0


@dataclass(frozen=True)
class Launch:
    """What a launcher needs per call, computed once per (shape, dtypes, flags, device): the grid and
    the kernel's keyword arguments (constexprs and num_warps), next to the plan they came from."""
    plan: object
    grid: tuple
    kwargs: dict            # constexprs by name and the compile options (num_warps, maxnreg)
    consts: tuple = ()      # the constexpr values in the kernel's order (they are its last parameters)
    options: dict = field(default_factory=dict, hash=False, compare=False)   # the compile options alone
    finish: object = None   # a backward's finishing launch (finish.FinishPlan)
    runners: dict = field(default_factory=dict, hash=False, compare=False)   # direct.py's, by device
    pointers: object = None  # args -> the pointer arguments (tensors), from the spec's signature
    integers: object = None  # args -> the integer arguments


class BoundedCache(dict):
    """Values by a plain tuple key (cheap to hash on every call); bounded, so shapes that change every
    call (dynamic sequence lengths) cannot grow it without limit."""
    LIMIT = 4096

    def add(self, key, value):
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = value
        return value



def launch_of(plan, spec: KernelSpec, grid: int, finish=None) -> Launch:
    kwargs = spec.launch_kwargs()
    consts, options = positional_constexprs(spec.kernel, kwargs)
    names = [n for n, _ in spec.signature]
    if names + [n for n in spec.kernel.arg_names if n in kwargs] != list(spec.kernel.arg_names):
        raise ValueError(f"{spec.kernel.__name__}: the spec's arguments {names} are not its runtime parameters")
    pointers = [i for i, (_, t) in enumerate(spec.signature) if t.startswith("*")]
    integers = [i for i, (_, t) in enumerate(spec.signature) if not t.startswith("*")]
    return Launch(plan, (grid,), kwargs, consts, options, finish, pointers=picker(pointers),
                  integers=picker(integers))


def picker(indices: list[int]):
    """A function of a tuple giving the items at `indices` as a tuple (operator.itemgetter, in C)."""
    if not indices:
        return lambda args: ()
    if len(indices) == 1:
        i = indices[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*indices)


def positional_constexprs(kernel, kwargs: dict) -> tuple[tuple, dict]:
    """(constexpr values in parameter order, the rest): the kernel's constexprs are its last
    parameters, so a launch passes them positionally after the runtime arguments, which halves what
    Triton's launcher spends binding them by name."""
    names = list(kernel.arg_names)
    consts = [n for n in names if n in kwargs]
    if consts != names[len(names) - len(consts):]:
        raise ValueError(f"{kernel.__name__}: the constexprs {consts} must be its last parameters")
    return tuple(kwargs[n] for n in consts), {k: v for k, v in kwargs.items() if k not in consts}


def cached_launch(slot: list | None, index: int, cache: BoundedCache, key_of, make) -> Launch:
    """The launch configuration: from the call signature's slot (functional.py), else from the cache
    by key, else made (and remembered in both)."""
    launch = None if slot is None else slot[index]
    if launch is None:
        key = key_of()
        launch = cache.get(key) or make(key)
        if slot is not None:
            slot[index] = launch
    return launch


def run(kernel, cfg: Launch, launch, *args) -> None:
    """Launch `kernel` with a cached configuration: through `launch` (wrap_triton inside custom ops),
    or a direct launch keyed by the integer arguments (direct.py; Triton's JIT launcher the first
    time), or, with direct launches off, `kernel.run` (what `kernel[grid]` calls, minus a closure)."""
    if launch is not None:
        launch(kernel)[cfg.grid](*args, **cfg.kwargs)
    elif direct.enabled():
        direct.launch(kernel, cfg.grid, cfg.consts, cfg.options, cfg.runners, args, cfg.pointers(args),
                      cfg.integers(args))
    else:
        kernel.run(*args, *cfg.consts, grid=cfg.grid, warmup=False, **cfg.options)
