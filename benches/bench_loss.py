"""Microbenchmark of the SFM loss: forward + backward time and peak memory.

Compares, in one run and on the same inputs: the fused Triton kernels (default backward,
which stores the (N, C) coefficients, and the recomputing one), the eager literal
reference (materialises N x C x D flows), the eager lean reference (N x C GEMM + autograd)
and ``torch.compile`` of the lean reference.  Also times ``torch.matmul`` on the three GEMMs
that fused forward+backward performs (S M^T forward, S M^T recomputed, G M), giving the
kernel's share of plain-GEMM throughput.

    python benches/bench_loss.py                 # CUDA: default sweep; CPU: small sweep, references only
    python benches/bench_loss.py --full          # C in {10,100,1000} x IPC in {1,10,50} x D in {384,768,1024}
    python benches/bench_loss.py --dtype float32 --out benches/out/loss.csv
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, peak_extra_bytes, print_table, time_ms, write_csv  # noqa: E402

from fastsfm.functional import flow_geometry, sfm_loss_from_geometry, sfm_loss_literal, sfm_rows_lean  # noqa: E402

GPU_SWEEP = [(10, 10, 768), (100, 10, 768), (1000, 1, 768), (1000, 10, 384), (1000, 10, 768), (1000, 10, 1024),
             (1000, 50, 768)]
CPU_SWEEP = [(10, 10, 128), (100, 1, 384), (100, 10, 384)]
LITERAL_LIMIT_BYTES = 8 << 30  # the literal path needs a few N x C x D float32 tensors


def _problem(c: int, ipc: int, d: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    means = 3.0 * torch.randn(d, generator=gen) + torch.randn(c, d, generator=gen)
    labels = torch.arange(c).repeat_interleave(ipc)
    feats = means[labels] + 0.5 * torch.randn(c * ipc, d, generator=gen)
    return feats.to(device, dtype), labels.to(device), means.to(device)


def bench_shape(c: int, ipc: int, d: int, dtype: torch.dtype, device: torch.device, compile_: bool) -> list[dict]:
    feats, labels, means = _problem(c, ipc, d, dtype, device)
    n = feats.shape[0]
    geo = flow_geometry(means)
    x = feats.clone().requires_grad_()

    def step(loss_fn):
        def run():
            x.grad = None
            loss_fn(x).backward()
        return run

    methods = {"lean (eager)": lambda f: sfm_rows_lean(f, labels, geo, 1e-8).mean()}
    if n * c * d * 4 * 6 <= LITERAL_LIMIT_BYTES:
        methods["literal (eager)"] = lambda f: sfm_loss_literal(f, labels, means).mean()
    if compile_:
        compiled = torch.compile(lambda f: sfm_rows_lean(f, labels, geo, 1e-8).mean(), dynamic=False)
        methods["lean (torch.compile)"] = compiled
    if device.type == "cuda":
        methods["triton (fused)"] = lambda f: sfm_loss_from_geometry(f, labels, geo, backend="triton",
                                                                      check_finite=False)
        methods["triton (recompute bwd)"] = lambda f: sfm_loss_from_geometry(
            f, labels, geo, backend="triton", check_finite=False, fused_backward="recompute")
    rows = []
    base = {"C": c, "IPC": ipc, "N": n, "D": d, "dtype": str(dtype).replace("torch.", "")}
    for name, fn in methods.items():
        run = step(fn)
        ms = time_ms(run, device)
        mem = peak_extra_bytes(run, device)
        rows.append({**base, "method": name, "fwd+bwd ms": ms, "peak extra MiB": None if mem is None else mem / 2**20})
    if device.type == "cuda":
        mt = means.to(dtype)
        g = torch.randn(n, c, device=device, dtype=dtype)
        gemm_ms = time_ms(lambda: torch.matmul(feats, mt.T), device) * 2 + time_ms(lambda: torch.matmul(g, mt), device)
        fused = next(r for r in rows if r["method"] == "triton (fused)")
        fused["3-GEMM matmul ms"] = gemm_ms
        fused["% of matmul"] = 100.0 * gemm_ms / fused["fwd+bwd ms"]
        for r in rows:
            r["speedup of triton"] = r["fwd+bwd ms"] / fused["fwd+bwd ms"]
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--full", action="store_true", help="the full C x IPC x D sweep")
    parser.add_argument("--shapes", type=str, default=None, help="C:IPC:D,... (overrides the sweep)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument("--out", type=Path, default=Path("benches/out/bench_loss.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # CPU half matmuls are not what anyone would run
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    elif args.full:
        shapes = list(itertools.product((10, 100, 1000), (1, 10, 50), (384, 768, 1024)))
    else:
        shapes = GPU_SWEEP if device.type == "cuda" else CPU_SWEEP
    print(f"# bench_loss on {device_name(device)}, torch {torch.__version__}, dtype {dtype}")
    rows = []
    for c, ipc, d in shapes:
        rows += bench_shape(c, ipc, d, dtype, device, compile_=not args.no_compile)
    print_table(rows)
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
