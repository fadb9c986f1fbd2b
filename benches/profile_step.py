"""Where one SFM distillation step's time goes, for the first minutes of a lent GPU (<= 4 minutes).

    python benches/profile_step.py --out benches/out/profile_step.json     # one H100/H200
    python benches/profile_step.py --smoke                                 # tiny, on CPU (in the tests)

At C = 1000 and C = 100, IPC 1, DINOv2-B/14 (random weights: time does not depend on them) at
224 px crops of 256 px images, bf16:

0. **what a step saves for its backward**, per image and fixed, and projected at each C
   (``--memory-only``: this alone, on a CPU too);
1. **the step**: median seconds of timed steps (each reads its loss back), the chunk size, the
   same step replayed as a CUDA graph (``--cuda-graph``; the median includes its warm-up and
   capture steps), the host's enqueue time of one step, and the share of the tensor cores' dense bf16 peak
   (``--peak-tflops``, 989 for an H100) at the step's FLOPs (forward + input-gradient backward);
   the graph and its memory pool are freed before the next section (:func:`graphed_step_ms`);
2. **stages alone** at n = C images, forward + backward each: render, augment, backbone, loss
   (device-synchronised wall time; the rest of a step is Adam and the host);
3. **the top 25 kernels** of one step by device time (the backward's kernels included: they are
   launched from autograd's thread), and issue 21's **budgets** read from all of them: the
   backbone's matrix-product rate, attention's time, the elementwise traffic (at the copy
   bandwidth measured first), the small stages, the host's share;
4. **alternatives**, each beside what the step uses: the pyramid rendered with ``F.interpolate``
   (atomic backward) vs the one matrix product; ``grid_sample`` (atomic backward) vs the
   separable crop; the render's and the crop's products in IEEE float32 vs TF32 (a bf16 step's);
   the backbone with its weights pre-cast once vs cast by autocast at every forward, and eager
   vs ``torch.compile`` (compile time reported; ``--compile``); each SDPA backend
   at 257 (CLS + 256 patches) and 256 tokens; the real side's float32 backbone forward (the
   statistics pass) in IEEE float32 vs TF32.

Prints the environment line and the tables; ``--out`` writes everything as JSON.  Never touches
tracked files.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastsfm import rng
from fastsfm.bench.benchmark import (
    BackboneFlops,
    backbone_flops,
    ceilings,
    environment,
    kernel_events,
    print_table,
    time_ms,
)
from fastsfm.bench.timing import distill_setup, run_step, step_seconds, synchronize
from fastsfm.config import DistillConfig
from fastsfm.distill.objectives.graphed import WARMUP_STEPS, GraphedStep
from fastsfm.memory import profiler
from fastsfm.models.backbones import load_backbone
from fastsfm.models.precision import tf32_matmuls

KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "cublas", "triton_tem")),
)
"""Fragments (lower case) of the kernel names of each class; attention first (efficient attention's
kernels are CUTLASS's, flash kernels' names can hold an architecture's)."""
OTHER = "elementwise and other"


def kernel_class(name: str) -> str:
    """The :data:`KERNEL_CLASSES` class of a kernel name, else :data:`OTHER`."""
    low = name.lower()
    return next((kind for kind, parts in KERNEL_CLASSES if any(p in low for p in parts)), OTHER)


def budgets(
    events, flops: BackboneFlops, classes: int, stages: list[dict], copy_tbs: float, host_ms: float, step_ms: float
) -> list[dict]:
    """Issue 21's stage budgets read from one profiled step: its kernels' device time per class
    (:func:`kernel_class`), the backbone's matrix-product FLOPs, the copy bandwidth measured now
    (the elementwise traffic at that bandwidth is an upper bound of its bytes), the stages alone."""
    ms = dict.fromkeys([kind for kind, _ in KERNEL_CLASSES] + [OTHER], 0.0)
    for e in events:
        ms[kernel_class(e.key)] += e.self_device_time_total / 1e3
    matrix = (flops.forward + flops.backward - flops.attention) * classes
    small = sum(s["ms"] for s in stages if s["stage"] != "backbone")
    rows = [
        (
            "backbone matrix products, TFLOP/s",
            matrix / ms["matrix products"] / 1e9 if ms["matrix products"] else None,
            ">= 650",
        ),
        ("matrix products, device ms", ms["matrix products"], "-"),
        ("attention, device ms", ms["attention"], "<= 35"),
        ("elementwise and other, device ms", ms[OTHER], "-"),
        (
            "elementwise and other, MB per image at the copy bandwidth",
            ms[OTHER] * copy_tbs * 1e3 / classes,
            "<= 170 (the backbone's)",
        ),
        ("render + augment + loss alone, ms", small, "<= 8 (with Adam)"),
        ("host enqueue / step time", host_ms / step_ms, "< 1 (hidden)"),
    ]
    return [{"budget": name, "measured": value, "target at C = 1000": target} for name, value, target in rows]


def _fwd_bwd_ms(fn, inputs: list[torch.Tensor], device: torch.device) -> float:
    """Milliseconds of ``fn(*inputs)`` forward + backward (an upstream gradient of ones)."""

    def run() -> None:
        for x in inputs:
            x.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    return time_ms(run, device)


def free_device(device: torch.device) -> None:
    """Return what the last section left to the caching allocator (between sections: a section's
    graph pool or chunk buffers must not crowd the next one out of memory)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def graphed_step_ms(objective, synset, optim, steps: int, device: torch.device) -> float:
    """Median milliseconds of the step replayed as a CUDA graph (``--cuda-graph``; warm-up and
    capture steps included in the samples), the graph released and its pool freed before returning."""
    wrapped = GraphedStep(objective)
    try:
        return 1e3 * statistics.median(step_seconds(wrapped, synset, optim, WARMUP_STEPS + 1 + steps, device))
    finally:
        wrapped.release()
        del wrapped
        free_device(device)


def step_section(
    backbone,
    flops: BackboneFlops,
    classes: int,
    resolution: int,
    device: torch.device,
    steps: int,
    peak: float,
    copy_tbs: float | None,
) -> dict:
    synset, optim, objective = distill_setup(backbone, DistillConfig(ipc=1, resolution=resolution), classes, device)
    seconds = statistics.median(step_seconds(objective, synset, optim, steps, device))
    synchronize(device)
    began = time.perf_counter()
    loss = objective.step(synset, optim, steps + 1)
    enqueue = time.perf_counter() - began
    float(loss)
    optim.finish_step()
    with profiler(device) as prof:
        run_step(objective, synset, optim, steps + 2)
        synchronize(device)
    events = kernel_events(prof)
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:25]
    tflops = (flops.forward + flops.backward) * classes / seconds / 1e12
    graphed = graphed_step_ms(objective, synset, optim, steps, device) if device.type == "cuda" else None
    stages = stage_section(objective, synset, classes, device)
    return {
        "C": classes,
        "chunk": objective.chunk_size,
        "step ms": 1e3 * seconds,
        "CUDA-graph step ms": graphed,
        "host enqueue ms": 1e3 * enqueue,
        "TFLOP/s": tflops,
        "% of peak": 100 * tflops / peak,
        "top kernels": [{"kernel": e.key[:90], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in top],
        "stages": stages,
        "budgets": budgets(events, flops, classes, stages, copy_tbs, 1e3 * enqueue, 1e3 * seconds) if events else [],
    }


def stage_section(objective, synset, n: int, device: torch.device) -> list[dict]:
    """Each stage of a step alone at ``n`` images, forward + backward, under the step's precision of
    float32 products (TF32 in a bf16 step)."""
    with tf32_matmuls(objective.dtype):
        return _stages(objective, synset, n, device)


def _stages(objective, synset, n: int, device: torch.device) -> list[dict]:
    levels = synset.chunk(0, n, device, requires_grad=True)
    images = synset.render_levels(levels).detach().requires_grad_()
    keys = rng.augment_keys(0, 1, 1, torch.arange(n, device=device))
    crops = objective.augment(images, keys).detach().requires_grad_()
    feats = objective.backbone(crops).detach().requires_grad_()
    plans = objective.rows(synset, 0, n)
    rows = [
        {"stage": "render", "ms": _fwd_bwd_ms(lambda *q: synset.render_levels(list(q)), levels, device)},
        {"stage": "augment", "ms": _fwd_bwd_ms(lambda x: objective.augment(x, keys), [images], device)},
        {"stage": "backbone", "ms": _fwd_bwd_ms(objective.backbone, [crops], device)},
    ]
    from fastsfm.loss import ops

    def loss(f):
        _, grads = objective.finish(objective.accumulate(f.detach(), plans, None))
        return (f * ops.grad_rows(grads[0], plans[0], objective.upstreams[0], f.dtype, objective.backend)).sum()

    rows.append({"stage": "loss (sums, epilogue, rows)", "ms": _fwd_bwd_ms(loss, [feats], device)})
    return rows


def saved_section(backbone, resolution: int, device: torch.device, classes: list[int], sizes=(1, 3)) -> dict:
    """What a step keeps for its backward: the bytes of the tensors autograd saves while ``sizes``
    images are rendered, cropped and encoded (``saved_tensors_hooks``, each storage counted once);
    the slope is the memory per image, the intercept the fixed part (the backbone's weight copies),
    and the projection the saved set of a one-chunk step at each of ``classes`` images (IPC 1)."""

    def saved(n: int) -> int:
        storages = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tf32_matmuls(objective.dtype):
            objective.features(synset, 0, n, 1, grad=True)
        return sum(storages.values())

    synset, _, objective = distill_setup(backbone, DistillConfig(ipc=1, resolution=resolution), max(sizes), device)
    (a, pa), (b, pb) = ((n, saved(n)) for n in sizes)
    per_image = (pb - pa) / (b - a)
    fixed = pa - a * per_image
    return {
        "saved MiB per image": per_image / 2**20,
        "fixed MiB (weights the backward reads)": fixed / 2**20,
        **{f"saved GiB at C = {c}": (fixed + c * per_image) / 2**30 for c in classes},
    }


def alternatives(objective, synset, n: int, device: torch.device, compile_backbone: bool) -> list[dict]:
    """What the step uses beside what it replaced or could use."""
    rows = []
    levels = synset.chunk(0, n, device, requires_grad=True)
    r = synset.resolution

    def interpolate_render(*q):
        total = sum(x if x.shape[-1] == r else F.interpolate(x, size=(r, r), mode="bilinear") for x in q)
        return torch.sigmoid(2 * torch.einsum("ij,njhw->nihw", synset.on_device("decor", device), total))

    rows.append(
        {"what": "render: F.interpolate (atomic backward)", "ms": _fwd_bwd_ms(interpolate_render, levels, device)}
    )
    products = ((None, "IEEE float32"), (torch.bfloat16, "TF32, a bf16 step's"))
    for dtype, name in products:
        with tf32_matmuls(dtype):
            ms = _fwd_bwd_ms(lambda *q: synset.render_levels(list(q)), levels, device)
        rows.append({"what": f"render: one matrix product, {name}", "ms": ms})
    images = synset.render_levels(levels).detach().requires_grad_()
    keys = rng.augment_keys(0, 1, 1, torch.arange(n, device=device))
    aug = objective.augment
    p = aug.params(keys)

    def grid_sample_crop(x):
        sign = 1.0 - 2.0 * p.flip.float()
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = sign * p.width, sign * (2 * p.left + p.width - 1)
        theta[:, 1, 1], theta[:, 1, 2] = p.height, 2 * p.top + p.height - 1
        grid = F.affine_grid(theta, [n, 3, aug.size, aug.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    rows.append({"what": "crop: grid_sample (atomic backward)", "ms": _fwd_bwd_ms(grid_sample_crop, [images], device)})
    for dtype, name in products:
        with tf32_matmuls(dtype):
            ms = _fwd_bwd_ms(lambda x: aug(x, keys), [images], device)
        rows.append({"what": f"crop + noise: separable, {name}", "ms": ms})
    crops = aug(images, keys).detach().requires_grad_()
    backbone, dtype = objective.backbone, objective.backbone.autocast_dtype()
    rows.append({"what": "backbone eager (weights pre-cast once)", "ms": _fwd_bwd_ms(backbone, [crops], device)})
    if dtype is not None:

        def recast(x):  # autocast alone: every Linear/conv weight cast again at every forward
            with torch.autocast(device.type, dtype=dtype):
                return backbone.model(backbone.normalize(x)).float()

        rows.append({"what": "backbone eager, weights cast per forward", "ms": _fwd_bwd_ms(recast, [crops], device)})
    if compile_backbone:
        compiled = torch.compile(objective.backbone)
        began = time.perf_counter()
        _fwd_bwd_ms(compiled, [crops[:2]], device)
        rows.append({"what": "backbone torch.compile", "ms": _fwd_bwd_ms(compiled, [crops], device)})
        rows[-1]["compile s"] = time.perf_counter() - began
    return rows + real_side(backbone, crops.detach(), device) + attention_backends(device)


def real_side(backbone, crops: torch.Tensor, device: torch.device) -> list[dict]:
    """The statistics pass's forward (the backbone in fp32, as the real side runs it, no autograd) on
    ``crops``, in IEEE float32 and in TF32: whether TF32 should be the real side's default."""
    rows = []
    for dtype, name in ((None, "IEEE float32"), (torch.bfloat16, "TF32")):
        with torch.no_grad(), backbone.using_precision("fp32"), tf32_matmuls(dtype):
            ms = time_ms(lambda: backbone(crops), device)
        rows.append({"what": f"real side: fp32 backbone forward, {name}", "ms": ms})
    return rows


def attention_backends(device: torch.device) -> list[dict]:
    """SDPA forward + backward per backend at 257 and 256 tokens (64 images, 12 heads of 64: ViT-B)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    batch, dtype = (64, torch.bfloat16) if device.type == "cuda" else (2, torch.float32)
    for tokens in (257, 256):
        q, k, v = (torch.randn(batch, 12, tokens, 64, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH,
        ):
            try:
                with sdpa_kernel(backend):
                    ms = _fwd_bwd_ms(F.scaled_dot_product_attention, [q, k, v], device)
            except RuntimeError as err:  # not available for this device, dtype or shape
                rows.append({"what": f"SDPA {backend.name} {tokens} tokens", "ms": None, "note": str(err)[:60]})
                continue
            rows.append({"what": f"SDPA {backend.name} {tokens} tokens", "ms": ms})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 100])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per size (after a warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--compile", action="store_true", help="also time the backbone under torch.compile")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument(
        "--memory-only", action="store_true", help="only what a step saves for its backward (runs on a CPU too)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.classes, args.steps = [4], 2
        backbone = load_backbone("dinov2_vits14", False, 56, device=device, precision="fp32")
    else:
        backbone = load_backbone("dinov2_vitb14", False, 224, device=device, precision="bf16")
    print(environment(device))
    resolution = 64 if args.smoke else 256  # 224 px crops of 256 px images
    memory = saved_section(backbone, resolution, device, args.classes)
    print_table([memory])
    if args.memory_only:
        return {"saved for backward": memory}
    limits = ceilings(device) if device.type == "cuda" else {}
    if limits:
        print(limits)
    result: dict = {"ceilings": limits, "saved for backward": memory, "steps": [], "alternatives": []}

    def save() -> None:  # after every section: a run cut short by its time limit still leaves its numbers
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))

    flops, copy_tbs = backbone_flops(backbone, device), limits.get("copy TB/s (measured)")
    for classes in args.classes:
        row = step_section(backbone, flops, classes, resolution, device, args.steps, args.peak_tflops, copy_tbs)
        free_device(device)
        result["steps"].append(row)
        save()
        print_table([{k: v for k, v in row.items() if k not in ("top kernels", "stages", "budgets")}])
        print_table(row["stages"])
        if row["top kernels"]:  # none on a CPU
            print_table(row["top kernels"])
            print_table(row["budgets"])
    n = args.classes[0]
    synset, _, objective = distill_setup(backbone, DistillConfig(ipc=1, resolution=resolution), n, device)
    result["alternatives"] = alternatives(objective, synset, n, device, args.compile)
    save()
    print_table(result["alternatives"])
    return result


if __name__ == "__main__":
    main()
