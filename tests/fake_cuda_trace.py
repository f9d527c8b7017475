"""Trace each kernel custom op's CUDA branch the way torch.compile does (AOTAutograd's functionalized
forward graph), on fake CUDA tensors, without a GPU: `python tests/fake_cuda_trace.py` prints one JSON
object, per case the kernel launches the graph holds (Triton kernel wrappers, which inductor compiles
and launches itself) and the `*_dynamic` ops it calls, or the error.

Static sizes must give the kernels (forward 1 launch, backward 2); symbolic sizes (a dynamic batch and
sequence length) the `*_dynamic` ops, which plan and launch at run time. Triton needs a driver to
read a kernel's signature while tracing (to tell which arguments it writes): bench/stub_driver.py's,
which compiles for sm_90 on the CPU, so this runs without TRITON_INTERPRET (tests/test_dynamic_shapes.py
starts it in its own process).
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _cases(fake):
    ops = torch.ops.dyt_kernels
    f32, BL, B = torch.float32, (0, 1), (0,)
    vec = lambda n=64: fake((n,), dtype=f32)  # noqa: E731
    x = lambda: fake((4, 7, 64), BL)  # noqa: E731
    mod = lambda: fake((4, 64), B)  # noqa: E731
    return {
        "dyt_fwd": (lambda *t: ops.dyt_fwd(*t, True), [x(), vec(1), vec(), vec()]),
        "dyt_fwd_channels_first": (lambda *t: ops.dyt_fwd(*t, False),
                                   [fake((4, 64, 7), (0, 2)), vec(1), vec(), vec()]),
        "dyt_bwd": (lambda *t: ops.dyt_bwd(*t, True), [x(), x(), vec(1), vec(), vec()]),
        "dyt_modulate_fwd": (lambda *t: ops.dyt_modulate_fwd(*t),
                             [x(), vec(1), mod(), mod(), vec(), vec(), x(), mod()]),
        "dyt_modulate_bwd": (lambda *t: ops.dyt_modulate_bwd(*t, True),
                             [x(), x(), x(), x(), vec(1), mod(), mod(), vec(), vec(), mod()]),
    }


def trace(dynamic: bool) -> dict:
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(shape, dyn=(), dtype=torch.bfloat16):
        sizes = [DimDynamic.DYNAMIC if dynamic and i in dyn else DimDynamic.STATIC for i in range(len(shape))]
        t = mode.from_tensor(torch.empty(shape, dtype=dtype),
                             symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
        with mode:
            return t.to("cuda")

    out = {}
    for name, (f, args) in _cases(fake).items():
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return gm

        try:
            with mode:
                aot_function(f, fw_compiler=keep)(*args)
            targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
            out[name] = {"kernels": sum("triton_kernel_wrapper" in t for t in targets),
                         "dynamic_ops": sorted({t for t in targets if "_dynamic" in t})}
        except Exception as e:  # noqa: BLE001 - reported to the test, which names it
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def main() -> None:
    from bench import stub_driver

    stub_driver.install()
    print(json.dumps({"static": trace(False), "dynamic": trace(True)}))


if __name__ == "__main__":
    main()
