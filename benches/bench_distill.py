"""SFM vs linear gradient matching (LGM), same backbone, synthetic set and IPC, in one run.

Reports per-step time and peak memory of one distillation step (CUDA:
``torch.cuda.max_memory_allocated``; CPU: peak RSS of a fresh child process per
measurement), the LGM/SFM ratios, optionally the probe accuracy after a short run on the
embedded digits data, and plots time and memory vs IPC to ``benches/plots/``.

    python benches/bench_distill.py                     # CPU: tiny ViT on digits, with accuracy
    python benches/bench_distill.py --backbone vit_base_patch16_224 --image-size 224 --classes 100 \\
        --ipcs 1,10 --no-accuracy                       # GPU, ViT-B/16 at 224 px (random weights: timing only)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, write_csv  # noqa: E402

from fastsfm.augment import SinglePassAugment  # noqa: E402
from fastsfm.backbones import load_backbone  # noqa: E402
from fastsfm.baselines.lgm import LGMObjective  # noqa: E402
from fastsfm.distill import DistillConfig, SFMObjective  # noqa: E402
from fastsfm.stats import ClassStats  # noqa: E402
from fastsfm.synset import SyntheticSet  # noqa: E402


def _setup(args, ipc: int):
    device = torch.device(args.device)
    backbone = load_backbone(args.backbone, pretrained=False, image_size=args.image_size, device=device)
    c, d = args.classes, backbone.feature_dim
    gen = torch.Generator().manual_seed(0)
    stats = ClassStats(
        torch.randn(c, d, generator=gen),
        torch.full((c,), 10),
        torch.zeros(c, d),
        torch.zeros(c),
        [str(i) for i in range(c)],
        {"backbone": backbone.identity},
    ).to(device)
    real = TensorDataset(
        torch.rand(c * 4, 3, args.resolution, args.resolution, generator=gen), torch.arange(c).repeat_interleave(4)
    )
    synset = SyntheticSet(c, ipc, args.resolution, param="pixels").to(device)
    return device, backbone, stats, real, synset


def _objective(method: str, args, ipc: int, backbone, stats, real, device):
    if method == "sfm":
        return SFMObjective(backbone, stats, SinglePassAugment(backbone.input_size), DistillConfig(ipc=ipc))
    return LGMObjective(
        backbone, real, args.classes, SinglePassAugment(backbone.input_size), ipc, args.lgm_augs, device
    )


def measure(method: str, ipc: int, args) -> dict:
    """Mean step time (ms) over ``args.steps`` steps after one warm-up, and peak memory (MiB)."""
    device, backbone, stats, real, synset = _setup(args, ipc)
    objective = _objective(method, args, ipc, backbone, stats, real, device)
    opt = torch.optim.Adam(synset.parameters(), lr=2e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        objective.backward(synset.render(), synset.labels)
        opt.step()

    try:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3 / args.steps
        mem = (
            torch.cuda.max_memory_allocated()
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ) / 2**20
        return {"method": method, "IPC": ipc, "step ms": ms, "peak MiB": mem}
    except torch.cuda.OutOfMemoryError:
        return {"method": method, "IPC": ipc, "step ms": None, "peak MiB": None, "note": "out of memory"}


def _child(queue, method, ipc, args):
    queue.put(measure(method, ipc, args))


def measure_isolated(method: str, ipc: int, args) -> dict:
    """CPU: a fresh process per measurement, so that peak RSS belongs to this method alone."""
    if args.device != "cpu":
        result = measure(method, ipc, args)
        torch.cuda.empty_cache()
        return result
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, method, ipc, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def short_run_accuracy(args) -> list[dict]:
    """Distil digits at IPC=1 with both methods for ``args.short_steps`` steps; probe accuracy."""
    from torch.utils.data import DataLoader

    from fastsfm.data import digits
    from fastsfm.distill import distill
    from fastsfm.evaluate import evaluate_images
    from fastsfm.probe import encode
    from fastsfm.stats import compute_stats

    data = digits(32)
    backbone = load_backbone("vit_tiny_patch16_224", pretrained=False, image_size=32)
    stats = compute_stats(backbone, DataLoader(data.train, batch_size=256), data.class_names, data.name, progress=False)
    test_f = encode(backbone, data.test.tensors[0])
    from fastsfm.baselines.reals import random_reals

    init = data.train.tensors[0][random_reals(data.train.tensors[1], 10, 1, 0)]
    cfg = DistillConfig(
        steps=args.short_steps,
        lr=1e-2,
        resolution=32,
        param="pixels",
        init="real",
        checkpoint_every=10**9,
        lgm_augs=args.lgm_augs,
    )
    rows = []
    import tempfile

    for method in ("sfm", "lgm"):
        mcfg = replace(cfg, method=method)
        objective = LGMObjective.from_dataset(backbone, data.train, 10, mcfg) if method == "lgm" else None
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            synset = distill(backbone, stats, mcfg, tmp, real_images=init, objective=objective, progress=False)
            seconds = time.perf_counter() - start
        with torch.no_grad():
            images = synset.render()
        score = evaluate_images(
            backbone, images, synset.labels, test_f, data.test.tensors[1], None, 300, 0, method, probe_lr=1e-2
        )
        rows.append({"method": method, "steps": args.short_steps, "run s": seconds, "probe acc %": score.probe})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in ("sfm", "lgm"):
        pts = [r for r in rows if r["method"] == method and r["step ms"] is not None]
        for ax, key in zip(axes, ("step ms", "peak MiB"), strict=True):
            ax.plot([r["IPC"] for r in pts], [r[key] for r in pts], "o-", label=method.upper())
            ax.set_xlabel("IPC")
            ax.set_ylabel(key)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend()
    fig.suptitle("one distillation step, SFM vs LGM")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=None, help="stored synthetic size (default: image size)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ipcs", default="1,2,5")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--lgm-augs", type=int, default=10)
    parser.add_argument("--short-steps", type=int, default=100)
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benches/out/bench_distill.csv"))
    parser.add_argument("--plot", type=Path, default=Path("benches/plots/distill_scaling.png"))
    args = parser.parse_args(argv)
    args.resolution = args.resolution or args.image_size
    print(
        f"# bench_distill on {device_name(torch.device(args.device))}, backbone {args.backbone} "
        f"(random init) at {args.image_size}px, C={args.classes}, LGM augs={args.lgm_augs}"
    )
    rows = [measure_isolated(m, int(ipc), args) for ipc in args.ipcs.split(",") for m in ("sfm", "lgm")]
    for ipc in {r["IPC"] for r in rows}:
        sfm, lgm = (next(r for r in rows if r["IPC"] == ipc and r["method"] == m) for m in ("sfm", "lgm"))
        if sfm["step ms"] and lgm["step ms"]:
            lgm["time LGM/SFM"] = lgm["step ms"] / sfm["step ms"]
            lgm["memory LGM/SFM"] = lgm["peak MiB"] / sfm["peak MiB"]
    print_table(rows)
    write_csv(rows, args.out)
    plot(rows, args.plot)
    if not args.no_accuracy:
        acc = short_run_accuracy(args)
        print_table(acc)
        write_csv(acc, args.out.with_name(args.out.stem + "_accuracy.csv"))
    print(f"wrote {args.out} and {args.plot}")
    return rows


if __name__ == "__main__":
    main()
