"""A Triton driver with the GPU taken out, so the host path of a launch can be timed on a CPU.

Everything Triton's JIT launcher does in Python runs for real: binding, specialization, the cache
lookup, the compiled kernel's runner. Kernels are compiled for sm_90 (ptxas ships with Triton), as
on an H100. What is stubbed is what needs a GPU: loading the module (`load_binary`), the device
queries, and the C launcher (a no-op callable), i.e. the cuLaunchKernel call, which costs the same
for every path. `install()` also routes CPU tensors to the Triton path of dyt_kernels, plans launches
for an H100, and answers direct.py's device query. Outputs are never written: this is for timing.
"""
from __future__ import annotations

import torch

H100_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                   "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024      # module, function, registers, spills, max threads per block

    def get_device_properties(self, device):
        return dict(H100_PROPERTIES)


class _Launcher:
    """The C launcher's place: takes what Triton's launcher would hand cuLaunchKernel, does nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        return None


def _driver():
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class StubDriver(CudaDriver):
        def __init__(self):   # CudaDriver's would load libcuda
            self.utils = _Utils()
            self.launcher_cls = _Launcher
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    return StubDriver()


def install() -> None:
    """Make Triton launch through the stub, and dyt_kernels send CPU tensors to its Triton path."""
    from triton.runtime import driver

    from dyt_kernels import backend, functional
    from dyt_kernels.ops import direct
    from dyt_kernels.ops import plan as P
    if backend.INTERPRETER:
        raise RuntimeError("the stub driver times Triton's own launcher: unset TRITON_INTERPRET")
    driver.set_active(_driver())
    functional.use_triton = lambda x: x.dtype != torch.float64
    P.device_props = lambda device: P.HOPPER
    direct._current_device = lambda: 0
