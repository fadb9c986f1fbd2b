"""Shared helpers of the benchmark scripts: timing, peak memory, table and CSV output."""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median wall time of ``fn`` in ms: ``triton.testing.do_bench`` on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory ``fn`` allocates beyond what was live before it (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict]) -> None:
    """Markdown table (pasteable into RESULTS.md)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(k)) for k in keys) + " |")


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
