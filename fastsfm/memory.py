"""Peak memory of a piece of work, on a GPU or a CPU, and the profiler that measures it on a CPU.

:func:`peak_bytes` is what the run planner's probes (:mod:`fastsfm.distill.plan`), the demo and the
benchmarks measure: the bytes of tensors allocated beyond what was live before, at their peak --
CUDA's allocator statistics, or on a CPU the largest running total (``Total Allocated``) of
the profiler's allocation events, less the total before the first of them.  Neither is the
process's resident set: they count tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

import torch

__all__ = ["peak_bytes", "peak_extra_bytes", "profiler", "quiet_stderr"]


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (output written by C++ code, not Python's)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def profiler(device: torch.device, **kwargs: object) -> Iterator[torch.profiler.profile]:
    """``torch.profiler.profile`` of CPU activity (and CUDA's on a GPU).  On CPU the profiler's C++ side
    prints start/stop lines and a failed CUDA probe to file descriptor 2 on every use; they are
    dropped there so that logs stay readable."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with quiet_stderr() if torch.device(device).type == "cpu" else contextlib.nullcontext():
        with torch.profiler.profile(activities=activities, **kwargs) as prof:
            yield prof


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory ``fn`` allocates beyond what was live before it (None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors ``fn`` allocates beyond what was live before it, on ``device``."""
    if torch.device(device).type == "cuda":
        return peak_extra_bytes(fn, device)
    with profiler(torch.device("cpu"), profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder, quiet_stderr():
        trace = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as fh:
            events = json.load(fh)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    before = (
        memory[0]["Total Allocated"] - memory[0]["Bytes"]
    )  # the running total also counts earlier profiles' tensors
    return max(0, max(m["Total Allocated"] for m in memory) - before)
