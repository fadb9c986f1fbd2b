"""Where one fused SFM loss step (forward + backward) spends its time: device, host, and the copy roofline.

    python benches/profile_loss.py                      # CUDA: C = 1000, IPC 50, D = 768, bf16, + the loss check
    python benches/profile_loss.py --host               # CPU, no GPU: host cost per call, launches stubbed
    python benches/profile_loss.py --ipc 1 --dtype float32 --no-check

Three parts (each prints a table; ``--out`` writes everything as JSON):

* **host** (``--host``, any machine, no GPU needed): one ``SFMLoss`` forward+backward (Triton
  path, C = 1000, N = 10,000, D = 768, bf16) with Triton's real Python launch path and only the
  driver call stubbed (:class:`fastsfm.bench.stub_driver.StubDriver`: kernels compiled for sm_90,
  launches counted, not run), beside an empty ``torch.autograd.Function`` forward+backward (the
  floor of any autograd loss) -- host microseconds per call, medians of ``--repeats`` batches,
  the launches per call, and the same call with every launch forced through Triton's JIT binder
  (the lean path's gain).  The issue's target: <= 50 us and <= 3x the floor on the development CPU.
* **device** (CUDA): ``torch.profiler`` over ``--steps`` steps, every kernel's mean device time per
  step, their sum, and that sum as a multiple of a device-to-device copy of the same bytes;
  ``cProfile`` of the host over the same steps.
* **check** (CUDA, unless ``--no-check``; about 2 minutes on an H100), in order of value, ``--out``
  rewritten after every row: copy and read-only ceilings at N = 50,000; the whole loss
  (forward+backward) as a CUDA-graph replay at N = 1,000 / 10,000 / 50,000, beside its kernels'
  sum (the launch gaps), and host time per forward+backward split into Python (the cached
  launches' driver calls made no-ops) and the driver calls; the class sums at IPC 1/10/50,
  sorted and shuffled labels, bf16 and fp32, as microseconds per launch from a CUDA graph of
  back-to-back launches over feature buffers larger than L2, with TB/s and the error against
  float64.

``--smoke`` runs tiny sizes on CPU in Triton's interpreter (device part) and the host part, so
only the shape of the report means anything.  Prints the environment line; writes nothing
unless ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

if "--host" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)  # the host part compiles kernels for real (stubbed launches)
elif "--smoke" in sys.argv and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from fastsfm import SFMLoss
from fastsfm.bench.benchmark import (
    cuda_graph,
    environment,
    kernel_events,
    loss_problem,
    print_table,
    time_ms,
)
from fastsfm.bench.timing import synchronize
from fastsfm.loss import ops
from fastsfm.memory import profiler


def profile_loss(c: int, ipc: int, d: int, dtype: torch.dtype, device: torch.device, steps: int = 50) -> dict:
    """Device time per kernel and host time per call of one ``SFMLoss`` (Triton) forward + backward.

    Returns ``{"N", "kernels": [{"name", "us"}...], "device us", "copy us", "x copy",
    "host us", "host top": [{"function", "us"}...]}``, times per step.
    """
    n = c * ipc
    feats, labels, centers = loss_problem(n, c, d, dtype, device, order="contiguous")
    x = feats.requires_grad_()
    module = SFMLoss(centers, backend="triton")

    def step() -> None:
        x.grad = None
        module(x, labels).backward()

    step()  # validation, label plan, compilation
    synchronize(device)
    with profiler(device) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    kernels = sorted(
        ({"name": e.key[:60], "us": e.self_device_time_total / steps} for e in kernel_events(prof)),
        key=lambda k: -k["us"],
    )
    device_us = sum(k["us"] for k in kernels)
    copy_out = torch.empty_like(feats)
    copy_us = 1e3 * time_ms(lambda: copy_out.copy_(feats), device)

    host = cProfile.Profile()
    began = time.perf_counter()
    host.enable()
    for _ in range(steps):
        step()
    host.disable()
    host_us = 1e6 * (time.perf_counter() - began) / steps
    synchronize(device)
    stats = pstats.Stats(host).stats
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
    return {
        "N": n,
        "kernels": kernels,
        "device us": device_us,
        "copy us": copy_us,
        "x copy": device_us / copy_us if copy_us > 0 else None,
        "host us": host_us,
        "host top": [
            {"function": f"{Path(f).name}:{line}({fn})", "us": 1e6 * v[2] / steps} for (f, line, fn), v in top
        ],
    }


class _Empty(torch.autograd.Function):
    """The floor of an autograd loss: a forward allocating its 0-dim output, a backward returning the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` batches of ``calls`` calls of ``fn``, in microseconds per call."""
    for _ in range(max(calls // 10, 3)):
        fn()
    batches = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append(1e6 * (time.perf_counter() - began) / calls)
    return statistics.median(batches)


def host_cost(c: int = 1000, ipc: int = 10, d: int = 768, calls: int = 300, repeats: int = 7) -> dict:
    """Host microseconds per ``SFMLoss`` forward+backward with launches stubbed (no GPU), beside an
    empty ``autograd.Function`` and beside every launch through Triton's JIT binder."""
    from fastsfm.bench import kernel_report
    from fastsfm.bench.stub_driver import stub_driver
    from fastsfm.kernels.launch import LAUNCHERS

    reason = kernel_report.unavailable()
    if reason:
        return {"skipped": reason}
    interpreter = ops.interpreter_active
    ops.interpreter_active = lambda: True  # let the triton backend take CPU tensors: nothing runs on them
    try:
        with stub_driver() as stub:
            feats, labels, centers = loss_problem(c * ipc, c, d, torch.bfloat16)
            x = feats.requires_grad_()
            module = SFMLoss(centers, backend="triton", validate="never")  # stubbed sums hold no counts

            def step() -> None:
                x.grad = None
                module(x, labels).backward()

            step()  # compiles the three kernels for sm_90 (seconds)
            before = stub.launches
            step()
            launches = stub.launches - before
            lean = _per_call_us(step, calls, repeats)
            launchers = LAUNCHERS
            saved = [dict(ln.cache) for ln in launchers]
            for ln in launchers:  # every launch through the JIT: an empty cache, never filled
                ln.cache = _NoCache()
            jit = _per_call_us(step, calls // 3, repeats)
            for ln, cache in zip(launchers, saved, strict=True):
                ln.cache = cache
    finally:
        ops.interpreter_active = interpreter
    y = torch.zeros((), requires_grad=True)

    def empty() -> None:
        y.grad = None
        _Empty.apply(y).backward()

    floor = _per_call_us(empty, calls, repeats)
    return {
        "C": c,
        "N": c * ipc,
        "D": d,
        "launches per call": launches,
        "host us": lean,
        "empty autograd.Function us": floor,
        "x floor": lean / floor,
        "through the JIT binder us": jit,
    }


class _NoCache(dict):
    """A launch cache that never keeps anything (every launch goes through Triton's JIT)."""

    def __setitem__(self, key, value) -> None:
        return None


def _print(result: dict) -> None:
    print(f"N = {result['N']:,}: device {result['device us']:.1f} us per step", end="")
    print(f" ({result['x copy']:.2f}x a copy of {result['copy us']:.1f} us)" if result["x copy"] else "")
    for k in result["kernels"]:
        print(f"  {k['us']:9.2f} us  {k['name']}")
    print(f"host {result['host us']:.1f} us per step (cProfile on); most own time:")
    for h in result["host top"]:
        print(f"  {h['us']:9.2f} us  {h['function']}")


def _graph_us(fn, reps: int) -> float:
    """Microseconds per call of ``fn`` replayed ``reps`` times back to back in one CUDA graph."""
    graph = cuda_graph(fn, reps)
    graph.replay()
    torch.cuda.synchronize()
    began = torch.cuda.Event(enable_timing=True)
    ended = torch.cuda.Event(enable_timing=True)
    began.record()
    for _ in range(5):
        graph.replay()
    ended.record()
    torch.cuda.synchronize()
    return 1e3 * began.elapsed_time(ended) / (5 * reps)


def loss_check(device: torch.device, c: int = 1000, d: int = 768, save=lambda out: None) -> dict:
    """The loss GPU check (module docstring): ceilings, the graphed loss, class sums per IPC/order/dtype;
    ``save(out)`` after each row, so a run cut short by its time limit keeps what it measured."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    out: dict = {"ceilings": [], "loss": [], "class sums": []}
    big = torch.empty(50_000, d, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(big)
    nbytes = big.numel() * big.element_size()
    copy_us = _graph_us(lambda: dst.copy_(big), 20)
    read_us = _graph_us(lambda: big.sum(dtype=torch.float32), 20)
    out["ceilings"] = [
        {"what": "copy (read+write)", "us": copy_us, "TB/s": 2 * nbytes / copy_us / 1e6},
        {"what": "read (sum)", "us": read_us, "TB/s": nbytes / read_us / 1e6},
    ]
    save(out)
    for n in (1_000, 10_000, 50_000):
        feats, labels, centers = loss_problem(n, c, d, torch.bfloat16, device, order="shuffled")
        x = feats.requires_grad_()
        module = SFMLoss(centers, backend="triton")
        module(x, labels).backward()

        def step(x=x, module=module, labels=labels) -> None:
            x.grad = None
            module(x, labels).backward()

        graphed = _graph_us(step, 10)
        with profiler(device) as prof:
            for _ in range(10):
                step()
            synchronize(device)
        kernels = sum(e.self_device_time_total for e in kernel_events(prof)) / 10
        floor_us = 2 * n * d * 2 / 3.35e6  # one read + one write of N x D bf16 at an H100's 3.35 TB/s
        out["loss"].append({"N": n, "graph us": graphed, "kernels us": kernels, "HBM floor us": floor_us})
        if n == 10_000:
            out["host"] = [_host_split(step)]
        save(out)
    for ipc in (1, 10, 50):
        n = c * ipc
        for dtype in (torch.bfloat16, torch.float32):
            copies = max(2, -(-4 * l2 // (n * d * torch.finfo(dtype).bits // 8)))  # > L2 in total
            for order in ("contiguous", "shuffled"):
                feats, labels, _ = loss_problem(n, c, d, dtype, device, order=order)
                zs = [feats.clone() for _ in range(copies)]
                plan = ops.label_plan(labels, c, order == "contiguous", dim=d)
                bufs = [ops.class_sums(z, plan, c, "triton") for z in zs]
                want = torch.zeros(c, d, device=device, dtype=torch.float64).index_add_(0, labels, feats.double())
                err = ((bufs[0][:, :d].double() - want).abs().max() / want.abs().max()).item()
                turn = iter(range(10**9))

                def launch(zs=zs, bufs=bufs, plan=plan, turn=turn) -> None:  # the next buffer each launch
                    k = next(turn) % len(zs)
                    ops.class_sums(zs[k], plan, c, "triton", out=bufs[k])

                us = _graph_us(launch, 2 * copies)
                size = n * d * feats.element_size()
                row = {"IPC": ipc, "dtype": str(dtype)[6:], "order": order, "us": us, "TB/s": size / us / 1e6}
                out["class sums"].append(row | {"rel. error": err})
                save(out)
    return out


def _host_split(step) -> dict:
    """Host microseconds per forward+backward on this machine, split into Python (every cached
    launch's driver call replaced by a no-op) and the driver calls (the difference)."""
    from fastsfm.kernels.launch import LAUNCHERS

    total = _per_call_us(step, 300, 5)
    compiled = [kernel for launcher in LAUNCHERS for kernel in launcher.cache.values()]
    saved = [kernel._run for kernel in compiled]
    for kernel in compiled:
        kernel._run = lambda *args: None
    try:
        python = _per_call_us(step, 300, 5)
    finally:
        for kernel, run in zip(compiled, saved, strict=True):
            kernel._run = run
    torch.cuda.synchronize()
    return {"host us per fwd+bwd": total, "Python us": python, "driver calls us": total - python}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7, help="host part: batches whose median is reported")
    parser.add_argument("--host", action="store_true", help="only the host part (CPU, launches stubbed)")
    parser.add_argument("--no-check", action="store_true", help="skip the loss GPU check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    print(environment(device))
    result: dict = {}
    if args.host or device.type == "cpu":
        if args.smoke and not args.host:  # the host part needs triton compiled, not interpreted: a child
            cmd = [sys.executable, __file__, "--host", "--smoke"]
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            print(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout, end="")
        else:
            sizes = {"c": 20, "ipc": 2, "d": 64, "calls": 20, "repeats": 2} if args.smoke else {}
            result["host"] = host_cost(**sizes)
            print_table([result["host"]])
        if args.host:
            _write(result, args.out)
            return result
    if args.smoke:
        args.classes, args.ipc, args.dim, args.steps = 5, 2, 24, 2
    result["device"] = profile_loss(args.classes, args.ipc, args.dim, getattr(torch, args.dtype), device, args.steps)
    _print(result["device"])
    _write(result, args.out)
    if device.type == "cuda" and not args.no_check:

        def save(check: dict) -> None:
            _write({**result, "check": check}, args.out)

        result["check"] = loss_check(device, args.classes, args.dim, save)
        for name, rows in result["check"].items():
            print(f"\n{name}:")
            print_table(rows)
    _write(result, args.out)
    return result


def _write(result: dict, path: Path | None) -> None:
    if path is not None:
        from fastsfm.io import atomic_write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)


if __name__ == "__main__":
    main()
