"""Launching fastsfm's Triton kernels: cached compiled specialisations, host arithmetic.

:class:`Launcher` is how every launcher of :mod:`fastsfm.kernels` launches: the first call of a
specialisation goes through Triton's JIT, later ones straight to the compiled kernel.
"""

from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime.driver import driver

__all__ = ["Launcher", "LaunchSpec", "LAUNCHERS", "interpreter_active"]

_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once: triton itself reads it at import


def interpreter_active() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return _INTERPRETER


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of ints.  The launchers' host arithmetic avoids ``triton.cdiv`` and
    ``triton.next_power_of_2``: in Triton 3.8 they are ``constexpr_function`` wrappers that unwrap
    every argument in Python (about 1 us per call)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` >= 1."""
    return 1 << max(n - 1, 0).bit_length()


class LaunchSpec:
    """One shape of launch: its grid, constexpr arguments and warps.

    The launchers make them in ``functools.lru_cache``'d functions of the integers that decide
    them, so a repeated call builds neither the grid nor the constexpr dict.  Hashed by identity:
    a :class:`Launcher` key holds the spec (the cache entry keeps it alive, so its identity is
    never reused), and equal specs made again after an eviction only cost one more JIT look-up.
    """

    __slots__ = ("grid", "constexprs", "values", "num_warps")

    def __init__(self, grid: tuple[int, int], constexprs: dict, num_warps: int = 4):
        self.grid, self.constexprs, self.num_warps = grid, constexprs, num_warps
        self.values = tuple(constexprs.values())


LAUNCHERS: list = []
"""Every :class:`Launcher` made (the kernels of :mod:`fastsfm.kernels`), in definition order."""


class Launcher:
    """A ``@triton.jit`` kernel launched through its cached compiled specialisations.

    ``launcher(key, spec, args)``: the first call of a ``key`` goes through Triton's JIT
    (``kernel[spec.grid](*args, **spec.constexprs, num_warps=...)``: binder, cache look-up,
    compile) and keeps the compiled kernel it returns; later calls with the same key call the
    compiled kernel's launcher (Triton's own ``CudaLauncher``) directly with the same argument
    list Triton's JIT passes (every parameter, in order), skipping the binder.  The key must hold
    the :class:`LaunchSpec` and everything else Triton specialises on that can vary between
    calls -- the device, tensor dtypes, whether a pointer is 16-byte aligned, integer arguments
    (their value decides ``== 1`` and divisibility by 16) -- the callers pass them
    (:func:`fastsfm.kernels.sfm.sums.class_sums` and friends).  Under the interpreter, while Dynamo
    traces (``torch.compile`` captures the plain JIT launch), and on Triton versions whose
    compiled kernels lack the launcher fields, every call goes through the JIT.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.cache: dict[tuple, object] = {}
        LAUNCHERS.append(self)

    def __call__(self, key: tuple, spec: LaunchSpec, args: tuple) -> None:
        if torch.compiler.is_compiling():  # Dynamo captures a plain JIT launch (its Triton support)
            self.kernel[spec.grid](*args, **spec.constexprs, num_warps=spec.num_warps)
            return
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self.kernel[spec.grid](*args, **spec.constexprs, num_warps=spec.num_warps)
            if not _INTERPRETER and all(hasattr(compiled, f) for f in ("run", "function", "packed_metadata")):
                self.cache[key] = compiled
            return
        kernel, grid, values = compiled, spec.grid, spec.values
        active = driver.active
        stream = active.get_current_stream(active.get_current_device())
        enter = knobs.runtime.launch_enter_hook
        hooked = enter is not None and getattr(enter, "calls", True)  # Triton 3.8: an empty HookChain
        meta = kernel.launch_metadata(grid, stream, *args, *values) if hooked else None
        kernel.run(
            grid[0],
            grid[1],
            1,
            stream,
            kernel.function,
            kernel.packed_metadata,
            meta,
            enter,
            knobs.runtime.launch_exit_hook,
            *args,
            *values,
        )


def _aligned(t: torch.Tensor) -> bool:
    """Whether Triton would take ``t``'s pointer as 16-byte aligned (a launch-cache key; not read
    while Dynamo traces, where :class:`Launcher` goes through the JIT)."""
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
