"""No host synchronisation and no data-dependent host logic in the ops' eager path: what lets a CUDA
graph capture a training step whole (torch.cuda.graph refuses a sync; a branch on a tensor's value is
frozen at capture).

On a GPU such a read is a device-to-host copy; on the CPU it is invisible, so it is caught where it
starts: a dispatch mode records the aten ops that hand a tensor's value to the host (`.item()`,
`bool(t)`, `torch.equal`, `nonzero`, ...) and `Tensor.tolist` / `numpy` / `__array__` are wrapped,
outside the Triton launches (the interpreter reads its arguments through numpy; a GPU launch reads
nothing). As in test_launches.py the ops are told no mode is active, so the path measured is the one
a call takes with none. Every call is made twice: the first works its launches out, the second comes
through the signature's cached slot; a capture sees the second kind, after warm-up steps.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dyt_kernels as dk
from dyt_kernels import dyt, dyt_modulate, functional, use_backend
from dyt_kernels.backend import INTERPRETER
from helpers import MOD_CASES, modulate_case_inputs

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="watches the eager path on CPU tensors through the interpreter")

# aten ops whose result the host reads (a device-to-host copy on CUDA), or whose output size depends on
# values (which the host must learn before allocating).
HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
              "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "allclose", "repeat_interleave",
              "bincount", "histc"}


class _Reads(TorchDispatchMode):
    def __init__(self, seen: list):
        super().__init__()
        self.seen, self.in_launch = seen, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_launch and name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads():
    """Yields the list of host reads made inside the block, outside Triton launches."""
    import triton.runtime.interpreter as interp
    seen: list = []
    mode = _Reads(seen)
    run = interp.InterpretedFunction.run

    def launch(self, *args, **kwargs):
        mode.in_launch += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.in_launch -= 1

    def reading(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if not mode.in_launch:
                seen.append(name)
            return original(self, *args, **kwargs)
        return original, wrapper

    wrapped = {name: reading(name) for name in ("tolist", "numpy", "__array__")}
    interp.InterpretedFunction.run = launch
    for name, (_, wrapper) in wrapped.items():
        setattr(torch.Tensor, name, wrapper)
    modes, functional._dispatch_modes = functional._dispatch_modes, lambda: 0
    try:
        with mode:
            yield seen
    finally:
        functional._dispatch_modes = modes
        interp.InterpretedFunction.run = run
        for name, (original, _) in wrapped.items():
            setattr(torch.Tensor, name, original)


def test_the_watch_sees_what_a_sync_would_be():
    """The detector itself: each kind of host read it is meant to catch is caught, and a launch's own
    reads are not."""
    t = torch.randn(4)
    with host_reads() as seen:
        t.sum().item()
        bool(t[0] > 0)
        torch.equal(t, t)
        t.nonzero()
        t.tolist()
    assert seen == ["_local_scalar_dense", "_local_scalar_dense", "equal", "nonzero", "tolist"], seen   # bool(t): item()
    x = torch.randn(4, 8)
    with use_backend("triton"), host_reads() as seen:
        dyt(x, torch.tensor([0.5]))
    assert seen == [], seen


def _twice(fn):
    """fn() twice (first call, then the cached slot's), each with its host reads."""
    reads = []
    for _ in range(2):
        with host_reads() as seen:
            fn()
        reads.append(list(seen))
    return reads


DYT_CASES = {
    "(N, C) alpha1 w+b": ((64, 96), True, dict(per_channel=False, affine=True)),
    "3-D alphaC": ((2, 8, 96), True, dict(per_channel=True, affine=True)),
    "no affine": ((64, 96), True, dict(per_channel=False, affine=False)),
    "NCHW": ((2, 6, 5, 7), False, dict(per_channel=True, affine=True)),
    "NHWC-stored": ((2, 6, 5, 7), False, dict(per_channel=False, affine=True, nhwc=True)),
    "head view": ((2, 4, 3, 2, 8), True, dict(per_channel=False, affine=True, head_view=True)),
}


@pytest.mark.parametrize("case", list(DYT_CASES))
def test_dyt_forward_and_backward_read_nothing_on_the_host(case):
    shape, channels_last, o = DYT_CASES[case]
    if o.get("head_view"):   # (B, L, 3, H, d) qkv -> q as (B, H, L, d): three strided levels
        qkv = torch.randn(shape, requires_grad=True)
        x = qkv.permute(2, 0, 3, 1, 4)[0]
        leaf = qkv
    else:
        x = torch.randn(shape)
        if o.get("nhwc"):
            x = x.contiguous(memory_format=torch.channels_last)
        leaf = x.requires_grad_()
    C = x.shape[-1] if channels_last else x.shape[1]
    alpha = (torch.rand(C if o["per_channel"] else 1) + 0.2).requires_grad_()
    w, b = (torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)) if o["affine"] else (None, None)
    inputs = [t for t in (leaf, alpha, w, b) if t is not None]

    def step():
        y = dyt(x, alpha, w, b, channels_last=channels_last)
        torch.autograd.grad(y, inputs, torch.ones_like(y))
        with torch.no_grad():
            dyt(x, alpha, w, b, channels_last=channels_last)
    with use_backend("triton"):
        assert _twice(step) == [[], []]


@pytest.mark.parametrize("case", list(MOD_CASES))
def test_dyt_modulate_forward_and_backward_read_nothing_on_the_host(case):
    x, alpha, shift, scale, w, b, residual, gate = modulate_case_inputs(case)
    inputs = [t for t in (x, alpha, shift, scale, w, b, residual, gate) if t is not None]

    def step():
        out = dyt_modulate(x, alpha, shift, scale, w, b, residual=residual, gate=gate)
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.autograd.grad(outs, inputs, [torch.ones_like(t) for t in outs])
    with use_backend("triton"):
        assert _twice(step) == [[], []]


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_a_dyt_models_training_step_reads_nothing_on_the_host(name):
    """The forward (text encoder included), loss and backward of the DyT PixArt-α / FLUX, as
    bench/models.py's eager-graphs step captures them, make no host read, first step included. The prompts
    are tokenized once, outside the step, as there. (The optimizer step runs outside the watch:
    AdamW(capturable=True), which the captured step uses, exists on CUDA only, and the CPU AdamW
    reads its step count on the host.)"""
    from tiny_models import PROMPTS, tiny, timesteps
    torch.manual_seed(0)
    model = tiny(name, "dyt")
    assert any(isinstance(m, (dk.DyT, dk.ModulatedDyT)) for m in model.modules())
    enc = model.text_encoder
    ids, mask = enc.tokenizer(PROMPTS, device="cpu")
    x, t = torch.randn(len(PROMPTS), 1, 16, 16), timesteps(name, len(PROMPTS))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reads = []
    with use_backend("triton"):
        for _ in range(3):   # the first step (launches worked out), then two through the cached slots
            opt.zero_grad(set_to_none=True)
            with host_reads() as seen:
                out = model(x, t, enc.encode(ids, mask))
                (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
            reads.append(list(seen))
            opt.step()
    assert reads == [[], [], []], reads
