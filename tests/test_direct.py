"""Direct launches (dyt_kernels/ops/direct.py): the cached compiled kernel's own launcher in place of
Triton's JIT launcher, for launches whose integers are fixed by their configuration.

On CPU the plumbing is checked against a stand-in kernel that records every call: which launcher
runs, with which arguments, when a call falls back, and the fail-safe. On a GPU the real thing:
every eager fast path (dyt forward, backward and the finishing launch; modulate's finishing launch)
gives bitwise the results of the JIT launcher, and the direct path was really taken.
"""
import warnings

import pytest
import torch

from dyt_kernels.ops import direct


class _Compiled:
    """What Triton's JIT launcher returns (CompiledKernel in Triton 3.6 and 3.8): `run` is its launcher,
    taking (grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata, enter_hook,
    exit_hook, *args); indexing by grid gives Triton's runner, which reads grid[0], grid[1] and
    grid[2] as given, builds the launch metadata and passes the hook chains."""

    function, packed_metadata = "function", "packed"

    def __init__(self, log):
        self.log = log
        self.headers = []

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter, leave, *args):
        self.headers.append((stream, function, packed, metadata, enter, leave))
        self.log.append(("direct", (g0, g1, g2), args))

    def __getitem__(self, grid):
        def runner(*args):
            from triton import knobs
            self.run(grid[0], grid[1], grid[2], "current stream", self.function, self.packed_metadata,
                     {"grid": grid}, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)
        return runner


class _Kernel:
    def __init__(self):
        self.log = []

    def run(self, *args, grid, warmup, **options):
        self.log.append(("jit", grid, args, warmup, options))
        self.compiled = _Compiled(self.log)
        return self.compiled


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setattr(direct, "_current_device", lambda: 0)
    monkeypatch.setattr(direct, "_stream_function", lambda: lambda device: f"stream of device {device}")
    previous = direct.set_enabled(True)
    yield
    direct.set_enabled(previous)


def _launch(kernel, cache, inputs, args=("a", 3)):
    direct.launch(kernel, (7,), (True, 16), {"num_warps": 4}, cache, args, inputs)


def test_first_call_jit_then_direct_with_the_same_arguments(on):
    k, cache, t = _Kernel(), {}, torch.empty(8)
    _launch(k, cache, (t,))
    _launch(k, cache, (t,))
    assert k.log[0] == ("jit", (7,), ("a", 3, True, 16), False, {"num_warps": 4})
    # the grid padded to three dims; the constexprs follow the arguments, as the JIT launcher binds them
    assert k.log[1] == ("direct", (7, 1, 1), ("a", 3, True, 16))
    assert list(cache) == [0]


def test_direct_calls_the_launcher_with_no_metadata_while_no_hook_is_registered(on):
    k, cache, t = _Kernel(), {}, torch.empty(8)
    _launch(k, cache, (t,))
    _launch(k, cache, (t,))
    # the current stream of the current device, the compiled function and metadata; no launch
    # metadata or hooks (the C launcher skips None)
    assert k.compiled.headers == [("stream of device 0", "function", "packed", None, None, None)]


def test_a_registered_launch_hook_sends_direct_launches_through_tritons_runner(on):
    """A profiler's launch hook must see every launch, with its metadata: while a hook is registered
    the direct launch goes through Triton's runner, which builds the metadata and calls the chains."""
    from triton import knobs
    k, cache, t = _Kernel(), {}, torch.empty(8)
    _launch(k, cache, (t,))
    seen = []

    def hook(metadata):
        seen.append(metadata)
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _launch(k, cache, (t,))
        stream, function, packed, metadata, enter, leave = k.compiled.headers[-1]
        assert metadata == {"grid": (7, 1, 1)} and enter is knobs.runtime.launch_enter_hook and hook in enter.calls
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert k.log[-1] == ("direct", (7, 1, 1), ("a", 3, True, 16))
    _launch(k, cache, (t,))   # the hook removed: the lean call again
    assert k.compiled.headers[-1][3:] == (None, None, None)


def test_misaligned_input_takes_the_jit_launcher(on):
    k, cache = _Kernel(), {}
    aligned, odd = torch.empty(8), torch.empty(9)[1:]
    assert odd.data_ptr() % 16 != 0
    _launch(k, cache, (aligned,))
    _launch(k, cache, (aligned, odd))
    assert [e[0] for e in k.log] == ["jit", "jit"]
    _launch(k, cache, (odd,))   # never cached from a misaligned call either
    assert [e[0] for e in k.log] == ["jit", "jit", "jit"]


def test_runners_are_per_integer_values_where_the_configuration_does_not_fix_them(on, monkeypatch):
    k, cache, t = _Kernel(), {}, torch.empty(8)
    for ints in ((3, 16), (3, 16), (3, 32), (3, 16), (3, 32)):
        direct.launch(k, (7,), (True,), {}, cache, ("a", *ints), (t,), ints)
    assert [e[0] for e in k.log] == ["jit", "direct", "jit", "direct", "direct"]
    assert sorted(cache) == [(0, (3, 16)), (0, (3, 32))]
    monkeypatch.setattr(direct, "MAX_RUNNERS", 2)
    direct.launch(k, (7,), (True,), {}, cache, ("a", 3, 48), (t,), (3, 48))   # a third: the cache starts over
    assert list(cache) == [(0, (3, 48))]


def test_launch_configurations_pick_pointers_and_integers_from_the_spec():
    from dyt_kernels.ops import dyt as dyt_ops
    from dyt_kernels.ops import plan as P
    cfg = dyt_ops._forward_launch((64, 384, 384, torch.float32, torch.float32, torch.float32, torch.float32,
                                   True, True, False, False, torch.device("cpu"), False, 1))
    args = tuple(f"t{i}" for i in range(5)) + (64, 384, 384, 384, 384)
    assert cfg.pointers(args) == args[:5] and cfg.integers(args) == args[5:]
    spec = cfg.plan.spec
    bad = P.KernelSpec(spec.kernel, spec.signature[1:], spec.constexprs, spec.divisible, spec.num_warps)
    with pytest.raises(ValueError, match="_dyt_fwd_kernel: the spec's arguments"):
        P.launch_of(cfg.plan, bad, 1)
    assert P.picker([2])(("a", "b", "c")) == ("c",) and P.picker([])(("a",)) == ()


def test_runners_are_per_device(on, monkeypatch):
    k, cache, t = _Kernel(), {}, torch.empty(8)
    _launch(k, cache, (t,))
    monkeypatch.setattr(direct, "_current_device", lambda: 1)
    _launch(k, cache, (t,))
    _launch(k, cache, (t,))
    assert [e[0] for e in k.log] == ["jit", "jit", "direct"] and sorted(cache) == [0, 1]


def test_a_failing_runner_turns_direct_launches_off_and_relaunches(on):
    k, cache, t = _Kernel(), {}, torch.empty(8)
    _launch(k, cache, (t,))

    def broken(device, args, consts):
        raise TypeError("function takes exactly 12 arguments (14 given)")
    cache[0] = broken
    with pytest.warns(RuntimeWarning, match="direct kernel launches are off.*TypeError.*14 given"):
        _launch(k, cache, (t,))
    assert [e[0] for e in k.log] == ["jit", "jit"] and not direct.enabled() and not cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # one warning, not one per call
        _launch(k, cache, (t,))
    assert [e[0] for e in k.log] == ["jit", "jit", "jit"] and not cache


def test_off_means_jit_always(on):
    k, cache, t = _Kernel(), {}, torch.empty(8)
    direct.set_enabled(False)
    for _ in range(3):
        _launch(k, cache, (t,))
    assert [e[0] for e in k.log] == ["jit"] * 3 and not cache


def test_never_under_the_interpreter():
    from dyt_kernels.backend import INTERPRETER
    if not INTERPRETER:
        pytest.skip("compiled kernels here: direct launches are on by design")
    assert not direct.ENABLED and not direct.enabled()


_C_LAUNCH_SCRIPT = """
import copy, sys, torch, triton
from bench import stub_driver
stub_driver.install()
from triton.runtime import driver
calls = []
driver.active.utils.launch = lambda *a: calls.append(a)   # before any kernel compiles: its launcher binds it
from dyt_kernels.ops import direct, dyt as D
if not triton.__version__.startswith(direct.C_LAUNCH_VERSIONS):
    print("SKIP Triton", triton.__version__); sys.exit(0)
x, a, w, b = torch.randn(16, 8), torch.randn(1), torch.randn(8), torch.randn(8)
cfg = D._forward_launch((16, 8, 8, torch.float32, torch.float32, torch.float32, torch.float32, True, True,
                         False, False, torch.device("cpu"), False, 1))
args = (x, torch.empty_like(x), a, w, b, 16, 8, 8, 8, 8)
compiled = D._dyt_fwd_kernel.run(*args, *cfg.consts, grid=cfg.grid, warmup=False, **cfg.options)
assert direct.c_launch_of(compiled.run) is not None, "Triton 3.8's launcher not recognized"
# distinct stand-ins for the launcher's fixed fields, so a field passed in the wrong place shows
compiled.run.launch_cooperative_grid, compiled.run.launch_pdl = "cooperative", "pdl"
compiled.run.arg_annotations, compiled.run.kernel_signature = "annotations", "signature"
calls.clear()
direct.runner_of(compiled, cfg.grid)(0, args, cfg.consts)           # the C function called directly
compiled.run(*cfg.grid, 1, 1, 0, compiled.function, compiled.packed_metadata, None, None, None, *args, *cfg.consts)
assert len(calls) == 2, calls
assert calls[0] == calls[1], (calls[0], calls[1])
assert calls[0][15] == args + cfg.consts
for field, value in (("global_scratch_size", 64), ("profile_scratch_size", 64), ("gsan_enabled", True)):
    other = copy.copy(compiled.run)
    setattr(other, field, value)
    assert direct.c_launch_of(other) is None, field   # something to allocate: Triton's own __call__
other = copy.copy(compiled.run)
other.launch = lambda *a: None    # wrapped (tensor descriptors)
assert direct.c_launch_of(other) is None
print("OK")
"""


def test_the_c_launch_gets_what_tritons_launcher_would_pass():
    """Triton 3.8: a direct launch calls the driver's C launch function itself, skipping
    CudaLauncher.__call__'s Python; on the stub driver (the C function replaced by a recorder) both
    hand it the same arguments, and a launcher with scratch to allocate, a sanitizer or wrapped
    descriptors keeps Triton's own __call__. A subprocess: the stub driver replaces the active one."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _C_LAUNCH_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.stdout.strip() == "OK"


_SPECIALIZATION_SCRIPT = """
import torch
from bench import stub_driver
stub_driver.install()
import dyt_kernels as dk
from dyt_kernels.ops import direct
checked, make, launch = [], direct.runner_of, direct.launch

def runner_of(compiled, grid):
    run = make(compiled, grid)
    def tagged(device, args, consts):
        return run(device, args, consts)
    tagged.compiled = compiled
    return tagged

def checking_launch(kernel, grid, consts, options, cache, args, inputs=(), integers=None):
    runner = cache.get(0 if integers is None else (0, integers))
    if runner is not None and direct.is_aligned(*inputs):
        # the compiled kernel Triton's JIT would pick for these very arguments (its cache: no compile)
        want = kernel.run(*args, *consts, grid=grid, warmup=True, **options)
        checked.append((kernel.__name__, runner.compiled.hash == want.hash,
                        tuple(v for v in args if not isinstance(v, torch.Tensor))))
    return launch(kernel, grid, consts, options, cache, args, inputs, integers)

direct.runner_of, direct.launch = runner_of, checking_launch
D, B, L = 24, 2, 5
a, w, b = (torch.randn(n, requires_grad=True) for n in (1, D, D))

def dyt_case(x, channels_last=True):
    x = x.detach().requires_grad_()
    y = dk.dyt(x, a, w, b, channels_last=channels_last)
    torch.autograd.grad(y, (x, a, w, b), torch.randn(y.shape))

with dk.use_backend("triton"):
    for _ in range(3):   # fill each signature, then hit it: alternating signatures of one configuration
        dyt_case(torch.randn(B, L, 2 * D)[..., :D])           # rows of stride 48 (divisible by 16)
        dyt_case(torch.randn(B, L, 3 * D)[..., :D])           # stride 72 (not)
        dyt_case(torch.randn(L, B, 2 * D)[..., :D].transpose(0, 1))   # three levels
        dyt_case(torch.randn(L, B, 3 * D)[..., :D].transpose(0, 1))
        dyt_case(torch.randn(B, L, D))
        x, res = torch.randn(B, L, D, requires_grad=True), torch.randn(B, L, D, requires_grad=True)
        for mods in (torch.randn(B, 6 * D).chunk(6, -1)[:3], torch.randn(B, 3 * D).chunk(3, -1),
                     [torch.randn(B, D) for _ in range(3)], [torch.randn(B, 1, D) for _ in range(3)]):
            shift, scale, gate = (m.requires_grad_() for m in mods)
            h, r = dk.dyt_modulate(x, a, shift, scale, w, b, residual=res, gate=gate)
            torch.autograd.grad((h, r), (x, res, shift, scale, gate), (torch.randn(B, L, D), torch.randn(B, L, D)),
                                allow_unused=True)
bad = [c for c in checked if not c[1]]
names = sorted({c[0] for c in checked})
assert not bad, f"{len(bad)} of {len(checked)} direct launches ran a kernel specialized for other integers: {bad[:3]}"
assert len(checked) > 30 and {"_dyt_fwd_kernel", "_dyt_fwd_levels_kernel", "_dyt_bwd_kernel", "_dyt_bwd_levels_kernel",
                              "_modulate_fwd_kernel", "_modulate_bwd_kernel"} <= set(names), (len(checked), names)
print("OK", len(checked))
"""


def test_direct_launches_run_the_kernel_specialized_for_their_integers():
    """Triton specializes a kernel on its integer arguments (divisible by 16, equal to 1: baked in as a
    constant). A direct launch reuses a compiled kernel, so the one it runs must be the one Triton's
    JIT would pick for the very arguments. Signatures that share a launch configuration but not their
    integers (x's row stride, three-level strides, adaLN modulations chunked from projections of
    different widths) alternate here on the stub driver; every direct launch's kernel is checked
    against the JIT's choice (before, a signature's fast path could run another's: a misaligned
    access, or a stride of 1 baked in)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SPECIALIZATION_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK"), out.stdout


# --------------------------------------------------------------------------------------------------
# On a GPU: the direct path against the JIT launcher, bitwise.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need CUDA")


def _dyt_case(dtype, weight, bias):
    import dyt_kernels as dk
    x = torch.randn(4, 37, 384, device="cuda", dtype=dtype, requires_grad=True)
    a = torch.tensor([0.7], device="cuda", requires_grad=True)
    w = torch.randn(384, device="cuda", requires_grad=True) if weight else None
    b = torch.randn(384, device="cuda", requires_grad=True) if bias else None
    dy = torch.randn_like(x)
    leaves = [t for t in (x, a, w, b) if t is not None]

    def run():
        y = dk.dyt(x, a, w, b)
        return (y, *torch.autograd.grad(y, leaves, dy))
    return run


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight,bias", [(True, True), (False, False), (True, False)])
def test_direct_matches_jit_bitwise_on_gpu(dtype, weight, bias):
    from dyt_kernels.ops import dyt as dyt_ops
    _direct_matches_jit(_dyt_case(dtype, weight, bias))
    used = [c for c in list(dyt_ops._FWD.values()) + list(dyt_ops._BWD.values()) if c.runners]
    assert used, "no launch configuration holds a runner: the direct path was never taken"


def _direct_matches_jit(run):
    """run() through Triton's JIT launcher, then three times with direct launches (the first call
    caches the runners, the later ones use them): bitwise the same results, direct launches still on,
    and the signature fast path of these very calls (the cache starts empty) used its own runners."""
    from dyt_kernels import functional
    functional._VALIDATED.clear()
    previous = direct.set_enabled(False)
    try:
        ref = run()
        direct.set_enabled(True)
        for _ in range(3):
            got = run()
        assert direct.enabled(), "a direct launch failed and turned itself off (see the warning)"
        rows = [slot[2] for slot in functional._VALIDATED.slots() if slot[2] is not None]
        assert any(r.forward[4] and r.backward_runners for r in rows), "the signature fast path was not taken"
        for r, g in zip(ref, got):
            assert torch.equal(r, g)
    finally:
        direct.set_enabled(previous)


def _layout_case(layout):
    """x in a layout the signature fast path reads in place: head views of a fused qkv (three strided
    levels), NCHW and NHWC channels-first, a column slice; a second x of the same strides at another
    offset alternates with the first."""
    import dyt_kernels as dk
    B, L, H, d = 2, 33, 4, 64
    if layout == "head view":
        qkv = torch.randn(B, L, 3 * H * d, device="cuda", requires_grad=True)
        xs = [qkv.view(B, L, 3, H, d).permute(2, 0, 3, 1, 4)[i] for i in (0, 1)]
        C, cl, bases = d, True, [qkv, qkv]
    elif layout in ("NCHW", "NHWC"):
        fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        xs = [torch.randn(3, 96, 7, 9, device="cuda").contiguous(memory_format=fmt).requires_grad_() for _ in range(2)]
        C, cl, bases = 96, False, xs
    else:   # column slice: rows of stride 2C
        wide = torch.randn(B, L, 2 * 384, device="cuda", requires_grad=True)
        xs = [wide[..., :384], wide[..., 384:]]
        C, cl, bases = 384, True, [wide, wide]
    a = torch.rand(C, device="cuda", requires_grad=True)
    w, b = (torch.randn(C, device="cuda", requires_grad=True) for _ in range(2))
    dys = [torch.randn(x.shape, device="cuda") for x in xs]

    def run():
        out = []
        for x, base, dy in zip(xs, bases, dys):
            y = dk.dyt(x, a, w, b, channels_last=cl)
            out += [y, *torch.autograd.grad(y, [base, a, w, b], dy)]
        return out
    return run


@cuda
@pytest.mark.parametrize("layout", ["head view", "NCHW", "NHWC", "column slice"])
def test_direct_matches_jit_bitwise_for_in_place_layouts_on_gpu(layout):
    """The signature fast path over strided and channels-first x (ops/dyt.py InPlace): direct launches
    on the tensors themselves give bitwise the JIT launcher's results, and the signature's own
    runners were used."""
    _direct_matches_jit(_layout_case(layout))


@cuda
def test_misaligned_input_after_a_cached_runner_takes_the_jit_launcher_on_gpu():
    """A runner compiled for 16-byte-aligned pointers must never see a misaligned one: the same
    signature with x at a 4-byte offset (contiguous, so the validated fast path) goes through the JIT
    launcher and gives the torch backend's values."""
    import dyt_kernels as dk
    a, w, b = torch.tensor([0.7], device="cuda"), torch.randn(96, device="cuda"), torch.randn(96, device="cuda")
    aligned = torch.randn(8, 96, device="cuda")
    buf = torch.randn(8 * 96 + 1, device="cuda")
    odd = buf[1:].view(8, 96)
    assert odd.is_contiguous() and odd.data_ptr() % 16 != 0
    previous = direct.set_enabled(True)
    try:
        for _ in range(3):
            dk.dyt(aligned, a, w, b)   # caches the runner for aligned pointers
        got = dk.dyt(odd, a, w, b)
        torch.cuda.synchronize()
        assert direct.enabled()
    finally:
        direct.set_enabled(previous)
    with dk.use_backend("torch"):
        want = dk.dyt(odd, a, w, b)
    torch.testing.assert_close(got, want)


@cuda
def test_launch_hooks_see_every_direct_launch_on_gpu():
    """With a launch hook registered (as a profiler does), each dyt forward's one launch reaches it,
    with Triton's metadata, and the values stay the JIT launcher's."""
    from triton import knobs

    import dyt_kernels as dk
    x, a = torch.randn(64, 384, device="cuda"), torch.tensor([0.7], device="cuda")
    previous = direct.set_enabled(False)
    try:
        ref = dk.dyt(x, a)
        direct.set_enabled(True)
        dk.dyt(x, a)   # caches the runner
        names = []

        def hook(metadata):
            names.append(metadata.get()["name"])   # Triton's LazyDict
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            got = [dk.dyt(x, a) for _ in range(3)]
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        assert direct.enabled()
        assert names == ["_dyt_fwd_kernel"] * 3, names
        for g in got:
            assert torch.equal(g, ref)
    finally:
        direct.set_enabled(previous)


@cuda
def test_direct_modulate_finish_matches_jit_on_gpu():
    import dyt_kernels as dk
    x, res = (torch.randn(3, 64, 256, device="cuda", requires_grad=True) for _ in range(2))
    shift, scale, gate = (torch.randn(3, 256, device="cuda", requires_grad=True) for _ in range(3))
    a, w, b = (torch.randn(n, device="cuda", requires_grad=True) for n in (1, 256, 256))
    leaves = (x, res, shift, scale, gate, a, w, b)
    dh, dr = torch.randn_like(x), torch.randn_like(x)

    def run():
        h, r = dk.dyt_modulate(x, a, shift, scale, w, b, residual=res, gate=gate)
        return (h, r, *torch.autograd.grad((h, r), leaves, (dh, dr)))
    from dyt_kernels import functional
    functional._VALIDATED_MOD.clear()   # the slots checked below are these calls'
    previous = direct.set_enabled(False)
    try:
        ref = run()
        direct.set_enabled(True)
        for _ in range(3):
            got = run()
        assert direct.enabled()
        from dyt_kernels.ops import modulate as mod_ops
        assert any(c.runners for c in list(mod_ops._FWD.values()) + list(mod_ops._BWD.values()))
        slots = list(functional._VALIDATED_MOD.slots())
        assert any(s[0] is not None and s[0][2] for s in slots), "the signature's forward fast path was not taken"
        assert any(call[7] for s in slots for call in s[1].values()), "the signature's backward fast path was not taken"
        for r, g in zip(ref, got):
            assert torch.equal(r, g)
    finally:
        direct.set_enabled(previous)


# --------------------------------------------------------------------------------------------------
# What every launch path shares: constexprs passed positionally, finishing launches planned once.

def test_constexprs_go_positionally_in_parameter_order():
    from dyt_kernels.ops import dyt as dyt_ops
    from dyt_kernels.ops.plan import positional_constexprs
    kernel = dyt_ops._dyt_fwd_kernel
    consts, options = positional_constexprs(kernel, {"BLOCK_N": 8, "HAS_WEIGHT": True, "HAS_BIAS": False,
                                                     "ALPHA_PER_CHANNEL": False, "PER_ROW": False, "TANH": 1,
                                                     "INDEX_64": False, "BLOCK_M": 4, "num_warps": 2})
    assert consts == (True, False, False, False, 1, False, 4, 8) and options == {"num_warps": 2}
    with pytest.raises(ValueError, match="_dyt_fwd_kernel: the constexprs .*'M'.* must be its last parameters"):
        positional_constexprs(kernel, {"M": 3, "BLOCK_N": 8})


@pytest.mark.parametrize("jobs", [0, 7])
def test_finish_plan_takes_one_to_six_jobs(jobs):
    from dyt_kernels.ops.finish import plan_finish
    with pytest.raises(ValueError, match=f"1 to 6 jobs, got {jobs}"):
        plan_finish([(0, 1, 4, 8)] * jobs)


def test_finish_plan_deals_program_ids_in_job_order():
    from dyt_kernels.ops.finish import BLOCK_K, plan_finish
    fp = plan_finish([(0, 1, 5, 300), (320, 2, 3, 16), (400, 1, 9, 1)])
    blocks = -(-300 // BLOCK_K)
    assert fp.jobs == ((0, 5, 300, blocks), (320, 3, 16, blocks + 2), (400, 9, 1, blocks + 3))
    assert fp.grid == (blocks + 3,) and fp.consts[0] == 3


@pytest.mark.parametrize("shape", [(1, 7), (300, 33), (4096, 384), (5, 1)])
def test_partials_start_16_aligned(shape):
    """The finishing kernel is compiled (and inspected) with every job offset divisible by 16."""
    from dyt_kernels.ops import dyt as dyt_ops
    from dyt_kernels.ops import modulate as mod_ops
    M, N = shape
    for per_row in (False, True):
        key = (M, N, N if not per_row else max(M // 2, 1), torch.float32, torch.float32, torch.float32,
               torch.float32, True, True, False, per_row, torch.device("cpu"), False, 1)
        if per_row and M % key[2]:
            continue
        cfg = dyt_ops._backward_launch(key)
        assert all(off % 16 == 0 for off, *_ in cfg.finish.jobs), cfg.finish.jobs
    B, L, D = 3, M, N
    flags = (True, True, True, True, True, True, False, False, False, False)
    cfg = mod_ops._backward_launch((B, L, D, torch.float32, *[torch.float32] * 7, *flags, torch.device("cpu"),
                                    False))
    assert cfg.plan.sample_stride % 16 == 0 and cfg.plan.channel_stride % 16 == 0
    assert all(off % 16 == 0 for off, *_ in cfg.finish.jobs), cfg.finish.jobs
