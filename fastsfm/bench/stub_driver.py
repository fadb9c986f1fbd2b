"""Triton's driver with only the GPU calls stubbed: host-side measurements and launch checks on a CPU.

Used by ``benches/profile_loss.py --host`` (host microseconds per loss call without a GPU) and by
the tests of the cached launch path (:class:`fastsfm.kernels.Launcher`).  Needs Triton's NVIDIA
backend and its ``ptxas`` (:func:`fastsfm.bench.kernel_report.unavailable`), not in interpreter mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["StubDriver", "stub_driver"]


class StubDriver:
    """Triton's active driver with only the GPU calls stubbed, for host-side measurements on a CPU.

    Kernels compile for real (``GPUTarget("cuda", capability, 32)``, the wheel's ``ptxas``), and
    every compiled kernel launches through Triton's own ``CudaLauncher.__call__`` (its scratch
    and profiler checks included); only the C call it ends in (``utils.launch``: argument packing
    and ``cuLaunchKernel``, about 2-3 us per launch) and loading a binary are no-ops.  The stubbed
    launch counts itself (``launches``) and, with ``keep_args``, keeps every argument tuple
    (``args``: ``(gridX, gridY, gridZ, stream, function, cooperative, pdl, packed metadata,
    launch metadata, enter hook, exit hook, global scratch, profile scratch, annotations,
    signature, kernel arguments)``; off for timing, since holding the gradient tensor makes
    autograd copy it).  Everything Python does on a launch -- Triton's binder and cache look-up,
    fastsfm's launch plans, allocations of the CPU tensors that stand in for CUDA ones -- runs as
    it would.
    """

    def __init__(self, capability: int = 90, keep_args: bool = False):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaLauncher

        self.target = GPUTarget("cuda", capability, 32)
        self.launcher_cls = CudaLauncher  # Triton's own, whose C call is :meth:`launch`
        self.launches, self.keep_args = 0, keep_args
        self.args: list[tuple] = []
        self.utils = self

    # the driver's calls
    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def allocate_default_profile_scratch(self, size, align, stream):
        return None

    # its utils' calls
    def launch(self, *args) -> None:
        """The C launcher (what ``CudaLauncher.__call__`` ends in): counted, not run."""
        self.launches += 1
        if self.keep_args:
            self.args.append(args)

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def unload_module(self, module) -> None:
        return None

    def build_signature_metadata(self, signature) -> tuple:
        """The C module's signature record (what the stubbed C launcher would read): the types."""
        return tuple(signature)


class _KernelArg:
    """Stands in for the C module's ``PyKernelArg`` (an argument's annotation), which
    ``CudaLauncher`` builds once per compiled kernel."""

    def __init__(self, nested_tuple, type):
        self.nested_tuple, self.type = nested_tuple, type

    def __eq__(self, other) -> bool:
        return isinstance(other, _KernelArg) and (self.nested_tuple, self.type) == (other.nested_tuple, other.type)


_C_NAMES = {"PyKernelArg": _KernelArg, "ARG_CONSTEXPR": 0, "ARG_KERNEL": 1, "ARG_TUPLE": 2}
"""What Triton's NVIDIA driver module takes from its compiled C module (which links ``libcuda``)."""


@contextlib.contextmanager
def stub_driver(capability: int = 90, keep_args: bool = False) -> Iterator[StubDriver]:
    """Make a :class:`StubDriver` Triton's active driver for the ``with`` block (no GPU needed;
    Triton not in interpreter mode, see :func:`unavailable`)."""
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime.driver import driver

    stub = StubDriver(capability, keep_args)
    saved = {name: getattr(nvidia, name) for name in _C_NAMES}
    for name, value in _C_NAMES.items():
        if saved[name] is None:  # the C module was never loaded (no libcuda): its stand-ins
            setattr(nvidia, name, value)
    driver.set_active(stub)
    try:
        yield stub
    finally:
        driver.reset_active() if driver._default is not None else driver.set_active(None)
        for name, value in saved.items():
            setattr(nvidia, name, value)
