"""A Triton driver with the GPU taken out, so the host path of a launch can be timed on a CPU.

Everything Triton's JIT launcher does in Python runs for real: binding, specialization, the cache
lookup, the compiled kernel's runner, and the Python half of Triton's CUDA launcher (CudaLauncher,
where it calls a generic C launch function, as in Triton 3.8; Triton 3.6 compiles a C launcher per
kernel, and there the whole launcher is a no-op). Kernels are compiled for sm_90 (ptxas ships
with Triton), as on an H100. What is stubbed is what needs a GPU: loading the module
(`load_binary`), the device queries, and the C launch function, i.e. the argument packing and the
cuLaunchKernel call, which cost the same for every path. `install()` also routes CPU tensors to the Triton path of dyt_kernels, plans launches
for an H100, and answers direct.py's device query. Outputs are never written: this is for timing.
"""
from __future__ import annotations

import inspect

import torch

H100_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                   "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _Utils:
    @staticmethod
    def launch(*args):   # the C launch function: argument packing and cuLaunchKernel
        return None

    @staticmethod
    def build_signature_metadata(kernel_signature):   # read only by the C launch function
        return tuple(kernel_signature)

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024      # module, function, registers, spills, max threads per block

    def get_device_properties(self, device):
        return dict(H100_PROPERTIES)


class _Launcher:
    """The launcher's place where Triton's would compile C: takes the launch, does nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        return None


def _launcher(src, metadata):
    """Triton's own CudaLauncher where it is Python over utils.launch (stubbed), else the no-op."""
    from triton.backends.nvidia import driver as nvidia
    if "utils.launch" not in inspect.getsource(nvidia.CudaLauncher.__init__):
        return _Launcher(src, metadata)
    if getattr(nvidia, "PyKernelArg", 0) is None:
        # The argument descriptors come from Triton's C utilities (which link libcuda); the stubbed
        # launch function never reads them, so plain tuples stand in.
        nvidia.PyKernelArg = lambda nested_tuple, type: (nested_tuple, type)
        nvidia.ARG_CONSTEXPR, nvidia.ARG_KERNEL, nvidia.ARG_TUPLE = 0, 1, 2
    return nvidia.CudaLauncher(src, metadata)


def _driver():
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class StubDriver(CudaDriver):
        def __init__(self):   # CudaDriver's would load libcuda
            self.utils = _Utils()
            self.launcher_cls = _launcher
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
    functional.use_triton = lambda x, name=None: x.dtype != torch.float64
    P.device_props = lambda device: P.HOPPER
    direct._current_device = lambda: 0
