"""Shared helpers of the benchmark scripts (``benches/``) and the acceptance run: timing of
callables, CUDA graphs, kernel events, the environment header, Markdown tables and CSV output,
and the loss problems the benches and the tests share.  The timed distillation step (and peak
memory) is :mod:`fastsfm.bench.timing`."""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

# Still importable from here: a ready GPU step probe written against an earlier layout imports
# them as fastsfm.bench.benchmark.distill_setup and .run_step.
from .timing import distill_setup, run_step  # noqa: F401

__all__ = [
    "time_ms",
    "cuda_graph",
    "kernel_events",
    "ceilings",
    "BackboneFlops",
    "backbone_flops",
    "write_csv",
    "markdown_table",
    "print_table",
    "device_name",
    "environment",
    "loss_problem",
    "in_child",
]


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median wall time of ``fn`` in ms: ``triton.testing.do_bench`` on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cuda_graph(fn: Callable[[], object], times: int = 1) -> torch.cuda.CUDAGraph:
    """``fn`` called ``times`` times back to back, captured in one CUDA graph (after a warm-up
    call on a side stream, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(times):
            fn()
    return graph


def kernel_events(prof: torch.profiler.profile) -> list:
    """The device-side entries of ``prof.key_averages()`` (kernels, copies, fills) with device time: a
    CPU range (an op, an autograd Function) repeats its kernels' time, and the profiler's own buffer
    requests are not the program's work.  Empty for a CPU-only profile."""
    return [
        e
        for e in prof.key_averages()
        if e.device_type != torch.autograd.DeviceType.CPU
        and e.self_device_time_total > 0
        and e.key != "Activity Buffer Request"
    ]


def ceilings(device: torch.device, copy_bytes: int = 2**31, matrix: int = 8192) -> dict[str, float]:
    """Measured now: device-to-device copy bandwidth (bytes read + written) and the bf16
    matrix-product rate, the two ceilings a profile's kernels are set against."""
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    a = torch.randn(matrix, matrix, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ a, device)
    return {
        "copy TB/s (measured)": round(2 * copy_bytes / copy_ms / 1e9, 2),
        "bf16 TFLOP/s (measured)": round(2 * matrix**3 / mm_ms / 1e9, 1),
    }


class BackboneFlops(NamedTuple):
    """FLOPs per image of a frozen backbone at its input size (``torch.utils.flop_counter``)."""

    forward: float
    backward: float
    """To the pixels only: the backbone is frozen, so no weight-gradient products run."""
    attention: float
    """The part of both in scaled-dot-product attention kernels (0 where the counter has no formula
    for the backend, as for the CPU's)."""


def backbone_flops(backbone, device: torch.device) -> BackboneFlops:
    """:class:`BackboneFlops` of ``backbone`` (counted on two images)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(2, 3, backbone.input_size, backbone.input_size, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        out = backbone(x)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    attention = sum(
        flops
        for counter in (forward, backward)
        for op, flops in counter.get_flop_counts().get("Global", {}).items()
        if "attention" in str(op)
    )
    return BackboneFlops(forward.get_total_flops() / 2, backward.get_total_flops() / 2, attention / 2)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else ("-" if value is None else str(value))


def markdown_table(rows: list[dict], keys: list[str] | None = None) -> str:
    """A Markdown table of ``rows`` (columns: ``keys``, default every key in first-seen order)."""
    keys = keys or list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def print_table(rows: list[dict], keys: list[str] | None = None) -> None:
    """Print :func:`markdown_table` (pasteable into RESULTS.md)."""
    print(markdown_table(rows, keys), flush=True)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment(device: torch.device) -> str:
    """Device, library versions and date: the header every benchmark prints and RESULTS.md records."""
    import datetime
    import platform

    import triton

    return (
        f"{device_name(device)}, torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}, {datetime.date.today().isoformat()}"
    )


def loss_problem(
    n: int, c: int, d: int, dtype=torch.float32, device="cpu", seed: int = 0, order: str = "shuffled"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loss problem: features (N, D) in ``dtype``, labels (N,) and centres (C, D) float64, N >= C.

    Every class has a row, the others are drawn at random (unequal counts); ``order`` is
    ``"shuffled"`` or ``"contiguous"`` (class-sorted rows).  A large shared offset, as real
    backbone features have, exercises the cancellation in the flows.  Tests and the GPU check use it.
    """
    gen = torch.Generator().manual_seed(seed)
    offset = 3.0 * torch.randn(d, generator=gen, dtype=torch.float64)
    centers = offset + torch.randn(c, d, generator=gen, dtype=torch.float64)
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    labels = labels.sort().values if order == "contiguous" else labels[torch.randperm(n, generator=gen)]
    feats = centers[labels] + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return feats.to(device=device, dtype=dtype), labels.to(device), centers.to(device)


def _child(queue, path: str, name: str, args: tuple) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    queue.put(getattr(module, name)(*args))


def in_child(path: str, name: str, *args):
    """``name(*args)`` of the script at ``path``, run in a fresh (spawned) process: what it measures of
    its process -- peak RSS -- is its own.  Works whether the script was run or imported by path."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, str(path), name, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result
