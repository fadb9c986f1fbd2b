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

    Kernels compile for real (``GPUTarget("cuda", capability, 32)``, the wheel's ``ptxas``);
    loading a binary and launching it are no-ops that count the launch (``launches``) and, with
    ``keep_args``, keep every argument tuple (``args``: what the C launcher would have packed;
    off for timing, since holding the gradient tensor makes autograd copy it).  Everything Python does on a launch --
    Triton's binder and cache look-up, fastsfm's launch plans, allocations of the CPU tensors
    that stand in for CUDA ones -- runs as it would; what is missing is the driver call itself
    (``cuLaunchKernel`` and the C launcher's argument packing, about 2-3 us per launch).
    """

    def __init__(self, capability: int = 90, keep_args: bool = False):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)
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

    def launcher_cls(self, src, metadata):
        return self._launch

    def _launch(self, *args) -> None:
        self.launches += 1
        if self.keep_args:
            self.args.append(args)

    # its utils' calls
    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def unload_module(self, module) -> None:
        return None


@contextlib.contextmanager
def stub_driver(capability: int = 90, keep_args: bool = False) -> Iterator[StubDriver]:
    """Make a :class:`StubDriver` Triton's active driver for the ``with`` block (no GPU needed;
    Triton not in interpreter mode, see :func:`unavailable`)."""
    from triton.runtime.driver import driver

    stub = StubDriver(capability, keep_args)
    driver.set_active(stub)
    try:
        yield stub
    finally:
        driver.reset_active() if driver._default is not None else driver.set_active(None)
