"""Kernel tests run the Triton kernels on CPU through the interpreter unless a GPU is present.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, i.e. when dyt_kernels is imported,
so it is set here, before any project import.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def on_device():
    """Tensor factories default to the test device (CUDA when present), for tests that call the ops on
    tensors they make with torch.randn & co.: on a GPU machine the Triton backend refuses CPU tensors."""
    with torch.device(DEVICE):
        yield


@pytest.fixture
def one_rank_group():
    """An in-process gloo process group of one rank, for DTensor and the distributed wrappers on CPU."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def serial_interpreter(monkeypatch):
    """Triton's interpreter patches triton.language globally while it runs a kernel, so two threads
    interpreting at once break each other ('Did you forget to add @triton.jit ?'); on the CPU the
    kernels run one at a time, while everything around them (checks, signatures, slots, Functions)
    interleaves. On a GPU the launches themselves race."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        import threading

        from triton.runtime import interpreter
        lock, run = threading.Lock(), interpreter.GridExecutor.__call__

        def serial(self, *args, **kwargs):
            with lock:
                return run(self, *args, **kwargs)
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", serial)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_sessionstart(session):
    """Refuse, by name, an interpreter that cannot run the kernels' loops: Triton 3.6's interpreter
    turns a loop bound held in a runtime integer into a 1-element array and calls int() on it, which
    numpy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"); every kernel
    test would fail with that message. Triton 3.8's interpreter, or numpy below 2.4, runs them."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n):
        acc = 0.0
        for _ in range(n):
            acc += 1.0
        tl.store(out_ptr, acc)

    out = torch.zeros(1)
    try:
        _count[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 - any failure here means no kernel test can run
        pytest.exit(f"the Triton interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run "
                    f"a loop over a runtime integer ({type(e).__name__}: {e}); use triton >= 3.8 (torch 2.14) or "
                    f"numpy < 2.4 for the CPU kernel tests", returncode=3)
    if out.item() != 3.0:
        pytest.exit(f"the Triton interpreter counted {out.item()} iterations of range(3)", returncode=3)


@pytest.fixture
def launches_keep_their_signature(monkeypatch):
    """Every direct.launch call checked against the others that use the same runners: a runner calls
    the kernel compiled for its first call's pointer dtypes (Triton specializes on them, beside the
    integers and the alignment direct.py keys and checks), so one runner dict (per integer tuple,
    where the configuration does not fix them) must only ever see one tuple of argument dtypes.
    Under the interpreter the kernels read every dtype as it comes; on a GPU a runner handed another
    would read or write the wrong bytes. The eager slots and finishing launches call direct.launch on
    any device, so this is checked on the CPU too."""
    from dyt_kernels.ops import direct
    seen, real = {}, direct.launch

    def launch(kernel, grid, consts, options, cache, args, inputs=(), integers=None):
        facts = tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args)
        first = seen.setdefault((id(cache), integers), (cache, facts))[1]   # (the dict kept alive: its id stays its)
        assert facts == first, f"one runner, two argument signatures:\n{first}\n{facts}"
        return real(kernel, grid, consts, options, cache, args, inputs, integers)
    monkeypatch.setattr(direct, "launch", launch)
    return seen
