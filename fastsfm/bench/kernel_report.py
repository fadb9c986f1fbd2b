"""Compile every specialisation of fastsfm's Triton kernels for NVIDIA GPUs, without a GPU.

GPUs are lent rarely, so what a CPU can prove about the kernels' machine code is proved here:
each launch the launchers of :mod:`fastsfm.kernels` make for a set of realistic calls
(:func:`scenarios`: fp32/bf16/fp16 features, class-contiguous and permuted rows, accumulate on
and off, one and several splits, both objectives, feature widths divisible by 16 or not) is
**intercepted** instead of run, its arguments are specialised exactly as Triton's JIT would
specialise them at run time (Triton's own binder: 16-byte-aligned pointers and integers
divisible by 16 marked as such, unit strides and ones turned into constants), and the kernel
is compiled with ``triton.compile`` for a ``GPUTarget`` (sm_90 and sm_80 by default) -- as
Triton's ``test_compile_only.py`` does.  ``ptxas -v`` (the one inside the triton wheel) gives
registers, spills and shared memory (``CompiledKernel.n_regs`` is only filled when a binary
is loaded on a GPU); the PTX gives the global loads and stores and how wide they are, and the
bytes each thread copies asynchronously (``cp.async``, the software pipeline of a
``tl.range(..., num_stages)`` loop).  Where the loop is pipelined, a program keeps ``STAGES - 1``
row tiles in flight; times the programs an SM holds (registers, shared memory, slots), that is
``in_flight_kb_sm``, the bytes a kernel keeps in flight per SM (by Little's law ~31 KB per SM
sustain ~3 TB/s on an H100 at ~1.3 us latency).

Requirements: Triton's NVIDIA backend (``triton.backends.nvidia``) with its bundled ``ptxas``,
Triton 3.4 or newer (its ``create_function_from_signature`` binder), and **Triton not in
interpreter mode**: the kernels must be ``JITFunction`` objects, so run this in a process
without ``TRITON_INTERPRET=1`` (``benches/compile_report.py``; the tests start one).
:func:`unavailable` says why not where one is missing.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from unittest import mock

import torch

__all__ = [
    "Launch",
    "KernelReport",
    "unavailable",
    "record_launches",
    "scenarios",
    "loss_step",
    "compile_launch",
    "report",
    "LOSS_SCENARIO",
    "GCA_SCENARIO",
    "gca_step",
    "TARGETS",
    "programs_per_sm",
]

TARGETS = (90, 80)
"""Compute capabilities compiled for by default: Hopper (H100/H200) and Ampere (A100)."""


@dataclass
class Launch:
    """One intercepted launch: the kernel, its grid, its arguments and the scenario that made it."""

    scenario: str
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class KernelReport:
    """Machine-code facts of one kernel specialisation on one architecture."""

    kernel: str
    scenario: str
    arch: str
    programs: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int
    global_loads: int
    vector_loads: int
    wide_loads: int
    global_stores: int
    vector_stores: int
    wide_stores: int
    async_bytes: int
    stages: int
    programs_per_sm: int
    in_flight_kb_sm: float
    signature: str

    def as_dict(self) -> dict:
        return asdict(self)


def unavailable() -> str | None:
    """Why kernels cannot be compiled for NVIDIA GPUs here (None when they can)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the kernels are interpreted functions; run in a process without it"
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as err:
        return f"the installed Triton has no NVIDIA backend or binder usable here ({err})"
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as err:  # noqa: BLE001 - any failure to locate the tool means no compile
        return f"Triton's ptxas cannot be located ({err})"
    if not ptxas or not os.path.exists(ptxas):
        return f"Triton's ptxas is missing ({ptxas})"
    return None


def _kernel_objects() -> dict[str, object]:
    from fastsfm.kernels import gca, sfm  # noqa: F401  (every family's launchers registered)
    from fastsfm.kernels.launch import LAUNCHERS

    return {launcher.kernel.fn.__name__: launcher.kernel for launcher in LAUNCHERS}


def record_launches(call: Callable[[], object], scenario: str) -> list[Launch]:
    """Run ``call()`` with every kernel's launch intercepted; return the launches it made (not run)."""
    launches: list[Launch] = []
    kernels = _kernel_objects()
    saved = {name: k.__dict__.get("run") for name, k in kernels.items()}

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(scenario, kernel, tuple(grid), args, kwargs))

        return run

    try:
        for kernel in kernels.values():
            kernel.run = recorder(kernel)
        call()
    finally:
        for name, kernel in kernels.items():
            if saved[name] is None:
                del kernel.run
            else:
                kernel.run = saved[name]
    return launches


LOSS_SCENARIO = "loss fwd+bwd"


def loss_step(classes: int, ipc: int, d: int, dtype: torch.dtype) -> None:
    """One forward+backward of the loss on the Triton path (shuffled labels), as ``SFMLoss`` runs it."""
    from fastsfm.loss import ops

    n = classes * ipc
    z = torch.zeros(n, d, dtype=dtype, requires_grad=True)
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(0)) % classes
    consts = ops.flow_constants(torch.randn(classes, d))
    plan = ops.label_plan(labels, classes, contiguous=False, dim=d)
    ops.dispatch(z, plan, consts, objective="flow", alpha=1.0, divisor=classes - 1.0, backend="triton").backward()


def _labels(classes: int, ipc: int, skewed: bool) -> torch.Tensor:
    """Class-sorted labels, IPC per class, or (``skewed``) half of all rows in class 0."""
    labels = torch.arange(classes).repeat_interleave(ipc)
    if skewed:
        labels[: len(labels) // 2] = 0
    return labels.sort().values


def scenarios(classes: int = 1000, ipc: int = 10) -> Iterator[tuple[str, Callable[[], object]]]:
    """``(name, call)`` of primitive calls covering every specialisation the launchers can produce
    -- class sums, epilogue and backward rows for fp32/bf16/fp16 features, class-contiguous and
    permuted rows, accumulate on and off, grouped classes (IPC ``ipc``), one class per item (IPC
    100) and sliced heavy classes, both objectives, feature widths divisible by 16 or not --, then
    one whole loss forward+backward (:data:`LOSS_SCENARIO`, D = 768) for bfloat16 features and for
    float32 ones (what the distillation step feeds the loss: the backbone's output cast up), then
    the fused GCA loss's forward+backward (:data:`GCA_SCENARIO`) at 16,384 rows for float32,
    bfloat16 and float16 rows of widths 128, 200 and 256.

    Tensors live on the CPU: only their dtypes, strides, alignment and sizes reach the compiler.
    """
    from fastsfm.loss import ops

    for d in (768, 200):  # a width divisible by 16 and one that is not
        consts = ops.flow_constants(torch.randn(classes, d))
        for rows_per_class, skewed in ((ipc, False), (100, False), (ipc, True)):
            labels = _labels(classes, rows_per_class, skewed)
            n = len(labels)
            shape = f"D={d} IPC={rows_per_class}" + (" skewed" if skewed else "")
            for contiguous in (True, False):
                plan = ops.label_plan(labels, classes, contiguous, dim=d)
                order = "contiguous" if contiguous else "permuted"
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    z = torch.zeros(n, d, dtype=dtype)
                    short = str(dtype).replace("torch.", "")
                    for accumulate in (False, True):
                        out = torch.zeros(classes, ops.sums_width(d)) if accumulate else None
                        name = f"sums {shape} {short} {order}" + (" accumulate" if accumulate else "")
                        yield name, partial(ops.class_sums, z, plan, classes, "triton", out)
                    for objective in ("flow", "decouple"):
                        grad = ops.TritonGrad(
                            torch.zeros(classes, ops.sums_width(d)), torch.zeros(1), 0, consts, objective, 0.1
                        )
                        name = f"backward {shape} {short} {order} {objective}"
                        yield name, partial(ops.grad_rows, grad, plan, torch.ones(1), dtype, "triton")
        column_major = torch.zeros(d, classes * ipc).T  # no unit stride
        plan = ops.label_plan(_labels(classes, ipc, False), classes, False, dim=d)
        yield f"sums D={d} float32 column-major", partial(ops.class_sums, column_major, plan, classes, "triton")
        for objective in ("flow", "decouple"):
            buf = torch.zeros(classes, ops.sums_width(d))
            yield (
                f"epilogue D={d} {objective}",
                partial(ops.epilogue, buf, consts, objective, 0.5, classes - 1.0, "triton"),
            )
    for dtype in (torch.bfloat16, torch.float32):
        yield (
            f"{LOSS_SCENARIO} C={classes} N={classes * ipc} D=768 {str(dtype).replace('torch.', '')}",
            partial(loss_step, classes, ipc, 768, dtype),
        )
    for d, dtype, tf32 in ((128, torch.float32, False), (128, torch.float32, True), (128, torch.bfloat16, False)) + (
        (200, torch.bfloat16, False),
        (256, torch.float16, False),
    ):
        name = f"{GCA_SCENARIO} rows=16384 D={d}{' tf32' if tf32 else ''} {str(dtype).replace('torch.', '')}"
        yield name, partial(gca_step, 16384, d, dtype, tf32)


GCA_SCENARIO = "gca fwd+bwd"


def gca_step(rows: int, d: int, dtype: torch.dtype, tf32: bool = False) -> None:
    """One forward+backward of the fused GCA loss (``uot``, one iteration: every kernel once or more)."""
    from fastsfm.config import GCAOptions
    from fastsfm.loss.gca_ops import gca_fused

    z = torch.randn(rows, d).to(dtype).requires_grad_(True)
    with mock.patch.object(torch, "empty", torch.zeros):  # intercepted launches write nothing: the glue
        gca_fused(z, GCAOptions(kind="uot", iterations=1, tf32=tf32)).backward()  # between passes reads zeros


def _specialise(launch: Launch, target) -> tuple[object, dict, dict, dict, str]:
    """``(source, options, signature, key)``: the launch specialised as Triton's JIT would specialise it."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    key = f"{launch.name}|{specialization}|{sorted(launch.kwargs.items())}"
    return ASTSource(kernel, signature, constexprs, attrs), options, signature, key


_ASYNC = re.compile(r"cp\.async\.(?:ca|cg)\.shared\.global\s*\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)")
_SM_REGISTERS, _SM_THREADS, _SM_PROGRAMS, _SM_SMEM = 65536, 2048, 32, 227 * 1024
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_ACCESS = re.compile(r"\b(ld|st)\.global(\.[a-z0-9]+)*")
_ELEM_BYTES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "f16": 2, "b32": 4, "u32": 4, "f32": 4, "s32": 4}
_ELEM_BYTES.update({"b64": 8, "u64": 8, "f64": 8, "s64": 8})


def _accesses(ptx: str, op: str) -> tuple[int, int, int]:
    """``(count, vectorised, 16-byte)`` global accesses of ``op`` (``ld`` or ``st``) in PTX."""
    total = vector = wide = 0
    for match in _ACCESS.finditer(ptx):
        if match.group(1) != op:
            continue
        parts = match.group(0).split(".")[2:]
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        size = next((_ELEM_BYTES[p] for p in parts if p in _ELEM_BYTES), 0)
        total += 1
        vector += lanes > 1
        wide += lanes * size >= 16
    return total, vector, wide


def _async_bytes(ptx: str) -> int:
    """Bytes one thread copies global -> shared with ``cp.async`` over all the copy sites of the PTX
    (prologue and loop body of a software-pipelined loop; 0: the kernel loads into registers)."""
    return sum(int(m.group(1), 0) for m in _ASYNC.finditer(ptx))


def programs_per_sm(registers: int, threads: int, shared: int) -> int:
    """Programs an SM holds at once: the register file, thread slots, block slots and shared memory."""
    by_regs = _SM_REGISTERS // max(registers * threads, 1)
    by_smem = _SM_SMEM // shared if shared else _SM_PROGRAMS
    return max(0, min(by_regs, _SM_THREADS // threads, _SM_PROGRAMS, by_smem))


def _ptxas(ptx: str, arch: str) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        done = subprocess.run(
            [knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    return done.stdout + done.stderr


def compile_launch(launch: Launch, capability: int) -> KernelReport:
    """Compile one intercepted launch for ``sm_<capability>`` and read its resources and accesses."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    src, options, signature, _ = _specialise(launch, target)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    log = _ptxas(ptx, arch)
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    smem = _PTXAS_SMEM.search(log)
    programs = math.prod(int(g) for g in launch.grid)
    loads, stores = _accesses(ptx, "ld"), _accesses(ptx, "st")
    registers = int(regs.group(1)) if regs else -1
    shared = max(int(smem.group(1)) if smem else 0, int(compiled.metadata.shared))
    threads = 32 * int(compiled.metadata.num_warps)
    stages = int(launch.kwargs.get("STAGES", 1))
    async_bytes = _async_bytes(ptx)
    resident = programs_per_sm(registers, threads, shared)
    tile = int(launch.kwargs.get("BLOCK_R", 0)) * int(launch.kwargs.get("BLOCK_D", 0))
    elem = launch.args[0].element_size() if isinstance(launch.args[0], torch.Tensor) else 4
    ahead = max(stages - 1, 0) * tile * elem if async_bytes else 0  # row tiles copied ahead per program
    return KernelReport(
        kernel=launch.name,
        scenario=launch.scenario,
        arch=arch,
        programs=programs,
        registers=registers,
        stack_frame=int(spill.group(1)) if spill else -1,
        spill_stores=int(spill.group(2)) if spill else -1,
        spill_loads=int(spill.group(3)) if spill else -1,
        shared_bytes=shared,
        global_loads=loads[0],
        vector_loads=loads[1],
        wide_loads=loads[2],
        global_stores=stores[0],
        vector_stores=stores[1],
        wide_stores=stores[2],
        async_bytes=async_bytes,
        stages=stages,
        programs_per_sm=resident,
        in_flight_kb_sm=ahead * resident / 1024,
        signature=", ".join(f"{k}: {v}" for k, v in signature.items() if v != "constexpr"),
    )


def report(capabilities: tuple[int, ...] = TARGETS, classes: int = 1000, ipc: int = 10) -> list[KernelReport]:
    """A row per launch of :func:`scenarios` and capability; each distinct specialisation is compiled once."""
    from triton.backends.compiler import GPUTarget

    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    compiled: dict[tuple[str, int], KernelReport] = {}
    out = []
    for name, call in scenarios(classes, ipc):
        for launch in record_launches(call, name):
            key = _specialise(launch, GPUTarget("cuda", capabilities[0], 32))[3]
            for cap in capabilities:
                if (key, cap) not in compiled:
                    compiled[(key, cap)] = compile_launch(launch, cap)
                programs = math.prod(int(g) for g in launch.grid)
                out.append(replace(compiled[(key, cap)], scenario=name, programs=programs))
    return out
