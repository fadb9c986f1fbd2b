"""Microbenchmark of the GCA losses, forward + backward: fused Triton vs the authors' dense formulation.

Per shape (rows = 2n projections of width D), in one run and on the same inputs:

* ``fused (triton)``: :func:`fastsfm.gca_loss` on the Triton backend (O(rows * D) memory; CUDA, or
  the interpreter under ``TRITON_INTERPRET=1``);
* ``dense (eager)``: the authors' formulation (``nerdslab/gca``, ``gca_loss_cifar.py``) restated
  below in our words: dense K, multiplicative Sinkhorn scalings u = a / (K v), v = b / (K^T u)
  under autograd, the plan P, cross-entropy of log P;
* ``dense (compile)``: ``torch.compile`` of that function (up to ``--compile-max-rows``).

Reported: median fwd+bwd time, extra peak memory (CUDA), what autograd keeps for the backward
(any device), the FLOPs the fused path spends
(2 rows^2 D per pass: 2T + 1 forward passes, 2T adjoint passes, one gradient pass of two
products plus its rank-2P product) and its share of the device's peak (the H100 SXM's
dense bf16 989, TF32 494 and fp32 67 TFLOP/s), and the speed-up and memory ratio against
``dense (eager)``.  Rows are written to ``--out`` (JSON or CSV by suffix) after every shape.

    python benches/bench_gca.py                              # CUDA: rows 1024..16384, D 128/256
    python benches/bench_gca.py --rows 16384 --dims 128 --dtypes bfloat16 --kind uot
    TRITON_INTERPRET=1 python benches/bench_gca.py --smoke   # CPU: tiny shapes, the interpreter
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from fastsfm import gca_loss
from fastsfm.bench.benchmark import environment, print_table, time_ms, write_csv
from fastsfm.config import GCAKind, GCAOptions, choices
from fastsfm.io import atomic_write_json
from fastsfm.loss.ops import interpreter_active
from fastsfm.memory import peak_extra_bytes

GPU_ROWS, GPU_DIMS = (1024, 4096, 8192, 16384), (128, 256)
SMOKE_ROWS, SMOKE_DIMS = (16, 34), (8,)
PEAK_TFLOPS = {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0, "tf32": 494.0}


def dense_formulation(z: torch.Tensor, o: GCAOptions) -> torch.Tensor:
    """The authors' dense formulation of ``o.kind`` (interleaved pairs): what ``gca_loss_cifar.py``
    computes and keeps for autograd, restated (tests/loss/test_gca.py checks the definition)."""
    rows = z.shape[0]
    x = F.normalize(z.float(), dim=1)
    cost = 1 - (x @ x.T).clamp(min=1e-7)
    eye = torch.eye(rows, device=z.device)
    cost = cost.max() * eye + (1 - eye) * cost
    kernel = torch.exp(-cost / o.epsilon)
    a = torch.full((rows,), 1.0 if o.kind == "ince" else 1.0 / rows, device=z.device)
    u, v = a, a
    p1, p2 = (r / (r + o.epsilon) for r in o.relax)
    for _ in range(o.iterations):
        if o.kind == "uot":
            u = (a / (kernel @ v + 1e-16)) ** p1
            v = (a / (kernel.T @ u + 1e-16)) ** p2
        else:
            u = a / (kernel @ v)
            v = a / (kernel.T @ u)
    plan = torch.diag(u) @ kernel @ torch.diag(v)
    targets = torch.arange(rows, device=z.device) ^ 1
    ce = F.cross_entropy(plan.log(), targets)
    if o.kind == "ince":
        return ce
    if o.kind == "rince":
        return ce**o.q / o.q
    mask = F.one_hot(targets, rows).float()
    attract = -((plan[mask.bool()] / u) ** o.q) / o.q
    repel = (o.lam * (mask / u).sum(1)) ** o.q / o.q
    return (o.r2 * (attract + repel) + o.r1 * ce).mean()


def fused_flops(rows: int, dim: int, iterations: int) -> float:
    """FLOPs of one fused forward+backward (matrix products only)."""
    passes = 2 * iterations + 1
    rank = -(-passes // 16) * 16
    products = passes + 2 * iterations + 2  # forward, adjoint, the gradient pass's S and G X
    return 2.0 * rows * rows * (dim * products + 2 * rank)


def saved_bytes(fn, z: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of ``fn(z)`` (distinct storages), on any device."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(z)
    return sum(storages.values())


def bench_shape(rows: int, dim: int, dtype: torch.dtype, options: GCAOptions, device, args) -> list[dict]:
    gen = torch.Generator().manual_seed(rows + dim)
    z = torch.randn(rows, dim, generator=gen).to(device, dtype).requires_grad_(True)
    methods = {}
    if device.type == "cuda" or args.interpreter:
        methods["fused (triton)"] = lambda t: gca_loss(t, **options.__dict__, backend="triton")
    methods["dense (eager)"] = lambda t: dense_formulation(t, options)
    if args.compile and rows <= args.compile_max_rows:
        torch._dynamo.reset()
        methods["dense (compile)"] = torch.compile(lambda t: dense_formulation(t, options), dynamic=False)
    short = str(dtype).replace("torch.", "")
    flops = fused_flops(rows, dim, options.iterations)
    out = []
    for name, fn in methods.items():

        def run(fn=fn):
            z.grad = None
            fn(z).backward()

        try:
            run()  # compile, autotune-free JIT
            ms = time_ms(run, device, reps=args.reps)
            extra = peak_extra_bytes(run, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            out.append(
                {"rows": rows, "D": dim, "dtype": short, "kind": options.kind, "method": name, "fwd+bwd ms": "OOM"}
            )
            continue
        row = {"rows": rows, "D": dim, "dtype": short, "kind": options.kind, "method": name, "fwd+bwd ms": ms}
        row["extra MiB"] = None if extra is None else extra / 2**20
        row["saved MiB"] = saved_bytes(fn, z) / 2**20
        if name.startswith("fused"):
            row["TFLOP/s"] = flops / ms / 1e9
            if device.type == "cuda":
                peak = PEAK_TFLOPS["tf32" if options.tf32 and short == "float32" else short]
                row["% of peak"] = 100.0 * flops / (peak * 1e9) / ms
        out.append(row)
    eager = next((r for r in out if r["method"] == "dense (eager)" and r["fwd+bwd ms"] != "OOM"), None)
    for row in out:
        if eager and row["fwd+bwd ms"] != "OOM":
            row["x faster than eager"] = eager["fwd+bwd ms"] / row["fwd+bwd ms"]
            if row.get("extra MiB") and eager.get("extra MiB"):
                row["memory / eager"] = row["extra MiB"] / eager["extra MiB"]
    return out


def _write(rows: list[dict], path: Path, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        atomic_write_json(path, {"environment": header, "rows": rows})
    else:
        write_csv(rows, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default=None, help="comma list of 2n (default: 1024..16384 on CUDA)")
    parser.add_argument("--dims", default=None, help="comma list of D (default: 128,256 on CUDA)")
    parser.add_argument("--dtypes", default=None, help="comma list (default: bfloat16,float32)")
    parser.add_argument("--kind", choices=choices(GCAKind), default="ince")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--tf32", action="store_true", help="float32 rows: TF32 products on the fused path")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--compile-max-rows", type=int, default=8192, help="largest rows compiled (slow to compile)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU rehearsal), no compile")
    parser.add_argument("--out", type=Path, default=Path("benches/out/bench_gca.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.interpreter = device.type == "cpu" and interpreter_active()
    if args.smoke:
        args.compile, args.reps = False, 1
    rows_list = args.rows or ",".join(map(str, SMOKE_ROWS if args.smoke else GPU_ROWS))
    dims = args.dims or ",".join(map(str, SMOKE_DIMS if args.smoke else GPU_DIMS))
    options = GCAOptions(kind=args.kind, iterations=args.iterations, tf32=args.tf32)
    header = environment(device)
    print(f"# bench_gca: {header}; kind {args.kind}, {args.iterations} iterations, eps {options.epsilon}")
    rows = []
    for dtype_name in (args.dtypes or "bfloat16,float32").split(","):
        for n in (int(v) for v in rows_list.split(",")):
            for d in (int(v) for v in dims.split(",")):
                rows += bench_shape(n, d, getattr(torch, dtype_name), options, device, args)
                _write(rows, args.out, header)
    print_table(rows)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
