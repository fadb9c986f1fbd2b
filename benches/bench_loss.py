"""Microbenchmark of the SFM loss, forward + backward: fused Triton vs eager PyTorch vs torch.compile.

Per shape, in one run and on the same inputs (N = C x IPC x views rows, views stacked as in
a distillation step, so labels are not class-contiguous):

* ``triton (fused)``: :class:`fastsfm.SFMLoss` on the Triton backend (labels validated once,
  as in a training loop);
* ``torch (eager)``: the same module on the PyTorch backend (``index_add`` + autograd);
* ``torch (compile)``: ``torch.compile`` of that PyTorch path;
* ``reference (eager)``: the literal oracle (one masked mean per class), where it fits.

Reported: median time, extra peak memory (beyond the inputs and the N x D gradient, CUDA
only), achieved bandwidth counting one read and one write of N x D, its share of the HBM
floor (from ``--hbm-tbps``, default the H100 SXM's 3.35 TB/s), and, measured in the same
run, a plain ``copy_`` of N x D (the practical floor: the same bytes read and written).  For
the fused loss on CUDA also the time of one CUDA-graph replay of forward+backward (``graph
ms``): the GPU's own time without the Python-side launch overhead.

    python benches/bench_loss.py                         # CUDA: C=1000 sweep; CPU: small shapes
    python benches/bench_loss.py --dtypes bfloat16 --shapes 1000:50:1:768
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from fastsfm import SFMLoss
from fastsfm.bench.benchmark import cuda_graph, environment, print_table, time_ms, write_csv
from fastsfm.loss.reference import sfm_reference
from fastsfm.memory import peak_extra_bytes

GPU_SWEEP = list(itertools.product([1000], [1, 10, 50], [1, 4], [384, 768, 1024]))
CPU_SWEEP = list(itertools.product([50], [1, 10], [1, 2], [64, 384]))
REFERENCE_LIMIT = 4e9  # C x N x D element reads of the literal path (one masked mean per class)


def _problem(c: int, ipc: int, views: int, d: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    centers = 3.0 * torch.randn(d, generator=gen) + torch.randn(c, d, generator=gen)
    labels = torch.arange(c).repeat_interleave(ipc).repeat(views)
    feats = centers[labels] + 0.5 * torch.randn(len(labels), d, generator=gen)
    return feats.to(device, dtype), labels.to(device), centers.to(device)


def _graph_ms(run, x: torch.Tensor, device: torch.device) -> float:
    """Median time of replaying ``run`` captured in a CUDA graph."""
    graph = cuda_graph(lambda: (setattr(x, "grad", None), run()))
    return time_ms(graph.replay, device)


def bench_shape(
    c: int, ipc: int, views: int, d: int, dtype: torch.dtype, device: torch.device, compile_: bool, hbm_tbps: float
) -> list[dict]:
    feats, labels, centers = _problem(c, ipc, views, d, dtype, device)
    n = feats.shape[0]
    x = feats.clone().requires_grad_()
    methods = {}
    if device.type == "cuda":
        methods["triton (fused)"] = SFMLoss(centers, backend="triton")
    methods["torch (eager)"] = SFMLoss(centers, backend="torch")
    if compile_:
        torch._dynamo.reset()  # a fresh compile per shape, never the recompile-limit fallback to eager
        methods["torch (compile)"] = torch.compile(SFMLoss(centers, backend="torch", validate="never"), dynamic=False)
    if c * n * d <= REFERENCE_LIMIT:
        methods["reference (eager)"] = lambda f, y: sfm_reference(f, y, centers)

    def step(loss_fn):
        def run():
            x.grad = None
            loss_fn(x, labels).backward()

        return run

    moved = 2 * n * d * feats.element_size()  # read the features, write their gradient
    copy_out = torch.empty_like(feats)
    copy_ms = time_ms(lambda: copy_out.copy_(feats), device)
    base = {"C": c, "IPC": ipc, "views": views, "N": n, "D": d, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for name, fn in methods.items():
        run = step(fn)
        run()  # validation, plan, compilation
        ms = time_ms(run, device)
        extra = peak_extra_bytes(run, device)
        row = {
            **base,
            "method": name,
            "fwd+bwd ms": ms,
            "GB/s": moved / ms / 1e6,
            "copy ms": copy_ms,
            "extra MiB": None if extra is None else (extra - n * d * feats.element_size()) / 2**20,
        }
        if device.type == "cuda":
            row["% of HBM floor"] = 100.0 * (moved / (hbm_tbps * 1e12) * 1e3) / ms
        rows.append(row)
    if "triton (fused)" in methods:
        rows[0]["graph ms"] = _graph_ms(step(methods["triton (fused)"]), x, device)
    first = rows[0]["fwd+bwd ms"]
    for row in rows:
        row["x slower than " + rows[0]["method"]] = row["fwd+bwd ms"] / first
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma list (default: bfloat16,float32 on CUDA, float32 on CPU)")
    parser.add_argument("--shapes", default=None, help="C:IPC:views:D,... (overrides the sweep)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth of the device (H100 SXM: 3.35)")
    parser.add_argument("--out", type=Path, default=Path("benches/out/bench_loss.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = args.dtypes or ("bfloat16,float32" if device.type == "cuda" else "float32")
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    else:
        shapes = GPU_SWEEP if device.type == "cuda" else CPU_SWEEP
    print(f"# bench_loss: {environment(device)}")
    rows = []
    for dtype_name in dtypes.split(","):
        for c, ipc, views, d in shapes:
            rows += bench_shape(
                c, ipc, views, d, getattr(torch, dtype_name), device, not args.no_compile, args.hbm_tbps
            )
    print_table(rows)
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
