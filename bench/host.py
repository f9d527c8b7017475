"""Host time per call: what the Python path of each op costs, beside F.layer_norm and the eager DyT.

At the seed's shapes a norm pass is a few µs of GPU time, so in eager training what the host spends
issuing it decides the speed. Tiny tensors, one CPU thread, every op in the same run:

    CPU, --stub driver (the default)
          Triton's own launcher with the GPU taken out (bench/stub_driver.py): kernels compiled for
          sm_90, Triton's JIT launcher and our direct launches run for real, only module loading and
          the C launch call are no-ops. What remains is everything a GPU's host does per call but
          cuLaunchKernel itself (the same for every path, eager ATen ops included, which here run on
          CPU tensors). Each "ours" row also comes through Triton's JIT launcher.
    CPU, --stub interpreter
          every Triton launch a no-op (TRITON_INTERPRET=1, the interpreter's launcher stubbed): the
          project's own Python alone. `python -m bench host --stub interpreter` sets TRITON_INTERPRET
          itself; it must be set before dyt_kernels is imported.
    CUDA  real launches; the GPU work per call is tiny, so the time is the host's (Triton's launcher
          included). The device is synchronized once per batch of calls. Each "ours" row comes twice:
          with direct launches (the default, ops/direct.py) and through Triton's JIT launcher.

Modes: fwd (inputs that require grad, so the op records its backward), no_grad (the same forward
under torch.no_grad, as in sampling), fwd+bwd (forward, then torch.autograd.grad of every input).
Each number is the best of `rounds` batches of `calls` calls (the minimum filters out other load on
the machine), in µs per call.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from . import report
from .runctl import Stop, stop_on_sigterm

OPS = ("dyt", "dyt channels-first", "dyt head view", "dyt_modulate", "DyT module")
# Each op's baseline: its "vs eager" column divides by this provider's time in the same mode.
EAGER = {"dyt": "eager DyT (4 ops)", "dyt channels-first": "eager DyT, w[:, None, None]",
         "dyt head view": "eager DyT (4 ops)",
         "dyt_modulate": "eager DyT + modulate", "DyT module": "eager DyT module"}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--calls", type=int, default=200, help="calls per timed batch")
    ap.add_argument("--rounds", type=int, default=30, help="timed batches per function; the best counts")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--device", default=None, help="cuda when available, else cpu (launches stubbed)")
    ap.add_argument("--stub", default="driver", choices=("driver", "interpreter"),
                    help="on CPU: stub Triton's driver (its launcher runs) or the interpreter's launcher")


def _cases(device: torch.device) -> dict:
    import torch.nn.functional as F

    import dyt_kernels as dk

    def leaf(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    x, a, w, b, dy = leaf(16, 8), leaf(1), leaf(8), leaf(8), torch.randn(16, 8, device=device)
    lw, lb = leaf(8), leaf(8)
    xm, res = leaf(2, 8, 8), leaf(2, 8, 8)
    shift, scale, gate = leaf(2, 8), leaf(2, 8), leaf(2, 8)
    dh = [torch.randn(2, 8, 8, device=device) for _ in range(2)]

    def eager_mod():
        r = res + gate[:, None] * xm
        return (w * torch.tanh(a * r) + b) * (1 + scale[:, None]) + shift[:, None], r

    def ours_mod():
        return dk.dyt_modulate(xm, a, shift, scale, w, b, residual=res, gate=gate)

    mod_inputs = (xm, a, shift, scale, w, b, res, gate)
    ours_m, eager_m, ln_m = _modules(device)
    # channels_last=False: an (N, C, H, W) activation as ConvNeXt's stem and downsampling norms see it
    xc, dyc = leaf(2, 8, 2, 4), torch.randn(2, 8, 2, 4, device=device)

    def eager_cf():
        return w[:, None, None] * torch.tanh(a * xc) + b[:, None, None]
    # QK-norm on attention's head view of a fused qkv projection: (B, H, L, d) = (2, 2, 4, 8), strided
    qkv = leaf(2, 4, 3 * 2 * 8)
    q = qkv.view(2, 4, 3, 2, 8).permute(2, 0, 3, 1, 4)[0]
    dq = torch.randn(2, 2, 4, 8, device=device)
    return {
        ("dyt", "fwd", "ours"): lambda: dk.dyt(x, a, w, b),
        ("dyt", "fwd", "eager DyT (4 ops)"): lambda: w * torch.tanh(a * x) + b,
        ("dyt", "fwd", "F.layer_norm"): lambda: F.layer_norm(x, (8,), lw, lb),
        ("dyt", "no_grad", "ours"): lambda: _no_grad(dk.dyt, x, a, w, b),
        ("dyt", "no_grad", "eager DyT (4 ops)"): lambda: _no_grad(lambda: w * torch.tanh(a * x) + b),
        ("dyt", "no_grad", "F.layer_norm"): lambda: _no_grad(F.layer_norm, x, (8,), lw, lb),
        ("dyt", "fwd+bwd", "ours"): lambda: torch.autograd.grad(dk.dyt(x, a, w, b), (x, a, w, b), dy),
        ("dyt", "fwd+bwd", "eager DyT (4 ops)"): lambda: torch.autograd.grad(w * torch.tanh(a * x) + b,
                                                                            (x, a, w, b), dy),
        ("dyt", "fwd+bwd", "F.layer_norm"): lambda: torch.autograd.grad(F.layer_norm(x, (8,), lw, lb),
                                                                       (x, lw, lb), dy),
        ("dyt channels-first", "fwd", "ours"): lambda: dk.dyt(xc, a, w, b, channels_last=False),
        ("dyt channels-first", "fwd", "eager DyT, w[:, None, None]"): eager_cf,
        ("dyt channels-first", "no_grad", "ours"): lambda: _no_grad(dk.dyt, xc, a, w, b, channels_last=False),
        ("dyt channels-first", "no_grad", "eager DyT, w[:, None, None]"): lambda: _no_grad(eager_cf),
        ("dyt channels-first", "fwd+bwd", "ours"): lambda: torch.autograd.grad(
            dk.dyt(xc, a, w, b, channels_last=False), (xc, a, w, b), dyc),
        ("dyt channels-first", "fwd+bwd", "eager DyT, w[:, None, None]"): lambda: torch.autograd.grad(
            eager_cf(), (xc, a, w, b), dyc),
        ("dyt head view", "fwd", "ours"): lambda: dk.dyt(q, a, w, b),
        ("dyt head view", "fwd", "eager DyT (4 ops)"): lambda: w * torch.tanh(a * q) + b,
        ("dyt head view", "no_grad", "ours"): lambda: _no_grad(dk.dyt, q, a, w, b),
        ("dyt head view", "no_grad", "eager DyT (4 ops)"): lambda: _no_grad(lambda: w * torch.tanh(a * q) + b),
        ("dyt head view", "fwd+bwd", "ours"): lambda: torch.autograd.grad(dk.dyt(q, a, w, b), (qkv, a, w, b), dq),
        ("dyt head view", "fwd+bwd", "eager DyT (4 ops)"): lambda: torch.autograd.grad(w * torch.tanh(a * q) + b,
                                                                                      (qkv, a, w, b), dq),
        ("dyt_modulate", "fwd", "ours"): ours_mod,
        ("dyt_modulate", "fwd", "eager DyT + modulate"): eager_mod,
        ("dyt_modulate", "no_grad", "ours"): lambda: _no_grad(ours_mod),
        ("dyt_modulate", "no_grad", "eager DyT + modulate"): lambda: _no_grad(eager_mod),
        ("dyt_modulate", "fwd+bwd", "ours"): lambda: torch.autograd.grad(ours_mod(), mod_inputs, dh),
        ("dyt_modulate", "fwd+bwd", "eager DyT + modulate"): lambda: torch.autograd.grad(eager_mod(), mod_inputs,
                                                                                         dh),
        ("DyT module", "fwd", "ours"): lambda: ours_m(x),
        ("DyT module", "fwd", "eager DyT module"): lambda: eager_m(x),
        ("DyT module", "fwd", "nn.LayerNorm"): lambda: ln_m(x),
        ("DyT module", "fwd+bwd", "ours"): lambda: torch.autograd.grad(ours_m(x), (x, *ours_m.parameters()), dy),
        ("DyT module", "fwd+bwd", "eager DyT module"): lambda: torch.autograd.grad(eager_m(x),
                                                                                 (x, *eager_m.parameters()), dy),
        ("DyT module", "fwd+bwd", "nn.LayerNorm"): lambda: torch.autograd.grad(ln_m(x), (x, *ln_m.parameters()), dy),
    }


def _modules(device: torch.device):
    """The modules a model calls: dyt_kernels.DyT, the DyT paper's module (four torch ops over its
    parameters, as models without fused kernels write it) and nn.LayerNorm, each over 8 channels.
    Module calls add nn.Module.__call__ and parameter reads to the functional ops' cost."""
    from torch import nn

    import dyt_kernels as dk

    class EagerDyT(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.alpha = nn.Parameter(torch.full((1,), 0.5, device=device))
            self.weight = nn.Parameter(torch.ones(channels, device=device))
            self.bias = nn.Parameter(torch.zeros(channels, device=device))

        def forward(self, x):
            return self.weight * torch.tanh(self.alpha * x) + self.bias

    return dk.DyT(8, device=device), EagerDyT(8), nn.LayerNorm(8, device=device)


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


def _jit_launcher(fns: dict) -> dict:
    """On CUDA, every "ours" function again with direct launches off (ops/direct.py): what Triton's
    JIT launcher costs per call beside the cached compiled kernel's runner."""
    from dyt_kernels.ops import direct

    def without_direct(fn):
        def run():
            previous = direct.set_enabled(False)
            try:
                return fn()
            finally:
                direct.set_enabled(previous)
        return run
    return {(op, mode, "ours, JIT launcher"): without_direct(fn) for (op, mode, who), fn in fns.items()
            if who == "ours"}


def measure(device: torch.device, calls: int, rounds: int, jit_rows: bool = False, progress=None) -> list[dict]:
    """The rows of every function, best of `rounds` batches; `progress(rows, rounds_done)` after each
    round, so that a run stopped part-way (a stage's timeout) still leaves the rounds it finished."""
    import dyt_kernels as dk

    fns = _cases(device)
    if jit_rows:
        fns.update(_jit_launcher(fns))
    best = {key: float("inf") for key in fns}
    with dk.use_backend("triton"):
        for fn in fns.values():
            for _ in range(20):
                fn()
        for done in range(1, rounds + 1):   # interleaved, so slow phases of the machine hit every function alike
            for key, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best[key] = min(best[key], (time.perf_counter() - t0) / calls * 1e6)
            if progress is not None:
                progress(_rows(best), done)
    return _rows(best)


def _rows(best: dict) -> list[dict]:
    """One row per function timed at least once; vs_eager None while its op's baseline is untimed."""
    rows = []
    for (op, mode, who), us in best.items():
        if us == float("inf"):
            continue
        eager = best[(op, mode, EAGER[op])]
        rows.append({"op": op, "mode": mode, "provider": who, "us_per_call": us,
                     "vs_eager": us / eager if eager != float("inf") else None})
    return rows


def _stub_launches() -> None:
    import triton.runtime.interpreter as interp
    interp.InterpretedFunction.run = lambda self, *args, **kwargs: None


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stub = getattr(args, "stub", "driver") if device.type == "cpu" else None
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if stub == "interpreter":
        if not interpreting:
            raise SystemExit("bench host --stub interpreter needs TRITON_INTERPRET=1 before dyt_kernels is "
                             "imported (python -m bench host --stub interpreter sets it)")
        _stub_launches()
    elif stub == "driver":
        if interpreting:
            raise SystemExit("bench host --stub driver times Triton's own launcher: unset TRITON_INTERPRET "
                             "(or use --stub interpreter)")
        from . import stub_driver
        stub_driver.install()
    env = report.collect_env(device)
    note = {"interpreter": "Triton launches stubbed in the interpreter (CPU): the project's own host path",
            "driver": "Triton's launcher with a stub driver (CPU, kernels compiled for sm_90): all of the host "
                      "path but cuLaunchKernel",
            None: "real launches on the GPU (Triton's launcher included)"}[stub]
    section = {"config": {"device": str(device), "calls": args.calls, "rounds": args.rounds, "note": note,
                          "stub": stub},
               "rows": []}
    out_dir = Path(args.out) if args.out else report.RESULTS_DIR

    def save(rows: list[dict], done: int) -> None:
        section["rows"], section["rounds_done"] = rows, done
        report.write_section(out_dir, env, "host", section, render=False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with stop_on_sigterm():
            measure(device, args.calls, args.rounds, jit_rows=stub != "interpreter", progress=save)
    except Stop:
        section["stopped"] = (f"stopped by SIGTERM (stage timeout) after {section.get('rounds_done', 0)} of "
                              f"{args.rounds} rounds")
        print(section["stopped"])
    finally:
        torch.set_num_threads(threads)
    paths = report.write_section(out_dir, env, "host", section)
    print(f"host time per call ({note}):")
    for r in section["rows"]:
        ratio = "" if r["vs_eager"] is None else f"{r['vs_eager']:.2f}x eager"
        print(f"  {r['op']:<13} {r['mode']:<8} {r['provider']:<22} {r['us_per_call']:7.1f} us  {ratio}")
    print(f"wrote {paths['json']}")
    return section
