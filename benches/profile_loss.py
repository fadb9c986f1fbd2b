"""Where one fused SFM loss step (forward + backward) spends its time: device time per kernel and host time per call.

    python benches/profile_loss.py                      # CUDA: C = 1000, IPC 50, D = 768, bf16
    python benches/profile_loss.py --ipc 1 --dtype float32

``bench_loss.py`` times a step from the host's side, so on a slow host it measures Python and
launch overhead; this script separates the two:

* **device**: ``torch.profiler`` over ``--steps`` steps, every kernel's mean device time per
  step (Triton kernels and the small torch ops around them), their sum, and that sum as a
  multiple of a device-to-device copy of the same bytes (read the features, write their
  gradient) measured now;
* **host**: ``cProfile`` over the same number of steps, the functions with the most own time
  per step, and the host time per step with no synchronisation in the loop.

On CPU (``--smoke``: tiny sizes) the kernels run in Triton's interpreter, so only the shape of
the report means anything.  Prints the environment line; writes nothing unless ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from fastsfm import SFMLoss
from fastsfm.benchmark import environment, kernel_events, loss_problem, profiler, synchronize, time_ms


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


def _print(result: dict) -> None:
    print(f"N = {result['N']:,}: device {result['device us']:.1f} us per step", end="")
    print(f" ({result['x copy']:.2f}x a copy of {result['copy us']:.1f} us)" if result["x copy"] else "")
    for k in result["kernels"]:
        print(f"  {k['us']:9.2f} us  {k['name']}")
    print(f"host {result['host us']:.1f} us per step (cProfile on); most own time:")
    for h in result["host top"]:
        print(f"  {h['us']:9.2f} us  {h['function']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (Triton's interpreter)")
    parser.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.classes, args.ipc, args.dim, args.steps = 5, 2, 24, 2
    print(environment(device))
    result = profile_loss(args.classes, args.ipc, args.dim, getattr(torch, args.dtype), device, args.steps)
    _print(result)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
