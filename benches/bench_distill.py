"""SFM vs LGM distillation steps with the same backbone and precision, in one run; SFM alone at large IPC.

Per configuration: mean step time over ``--steps`` timed steps after one warm-up step (which
also sizes SFM's chunks), peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak
RSS of a fresh child process per configuration), the projected wall time of the authors'
5001-step loop, and LGM/SFM ratios.  ``--profile`` adds where one SFM step's time goes
(``torch.profiler`` over the objective's ranges: render, augment, backbone forward, loss,
backward, optimiser).  Backbones have random weights: time and memory do not depend on them.
The synthetic set has all its pyramid levels, as after step 1600.

    python benches/bench_distill.py                      # CUDA: the paper preset; CPU: a tiny preset
    python benches/bench_distill.py --preset paper --precision bf16 --profile
    python benches/bench_distill.py --preset cpu --out benches/out/distill_cpu.csv

Outputs (CSV, JSON, PNG) go to ``benches/out/`` (untracked).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_csv  # noqa: E402

from fastsfm.backbones import load_backbone  # noqa: E402
from fastsfm.config import DistillConfig  # noqa: E402
from fastsfm.objective import build_objective  # noqa: E402
from fastsfm.optim import ChunkAdam  # noqa: E402
from fastsfm.stats import ClassStats  # noqa: E402
from fastsfm.synset import SyntheticSet  # noqa: E402

LOOP_STEPS = 5001
PROFILE_RANGES = ("render", "augment", "backbone", "loss", "backward", "optimizer")


def _paper() -> list[dict]:
    runs = []
    for backbone in ("vit_base_patch16_224", "dinov2_vitb14"):
        base = {"backbone": backbone, "image_size": 224, "resolution": 256}
        for classes, ipc, augs in ((100, 1, 10), (100, 10, 10), (1000, 1, 3)):
            runs.append({**base, "method": "sfm", "classes": classes, "ipc": ipc})
            runs.append({**base, "method": "lgm", "classes": classes, "ipc": ipc, "augs": augs})
    base = {"backbone": "dinov2_vitb14", "image_size": 224, "resolution": 256, "method": "sfm", "classes": 1000}
    runs.append({**base, "ipc": 10})
    runs.append({**base, "ipc": 50, "offload": True})
    return runs


def _cpu() -> list[dict]:
    base = {"backbone": "vit_tiny_patch16_224", "image_size": 32, "resolution": 32, "classes": 10}
    runs = []
    for ipc, augs in ((1, 10), (2, 3)):
        runs.append({**base, "method": "sfm", "ipc": ipc})
        runs.append({**base, "method": "lgm", "ipc": ipc, "augs": augs})
    runs.append({**base, "method": "sfm", "ipc": 4, "chunk": 8, "offload": True})
    return runs


PRESETS = {"paper": _paper, "cpu": _cpu}


def _setup(run: dict, args):
    device = torch.device(args.device)
    backbone = load_backbone(
        run["backbone"], pretrained=False, image_size=run["image_size"], device=device, precision=args.precision
    )
    c, d, res = run["classes"], backbone.feature_dim, run["resolution"]
    gen = torch.Generator().manual_seed(0)
    stats = ClassStats(
        torch.randn(c, d, generator=gen),
        torch.full((c,), 10),
        torch.zeros(c, d),
        torch.zeros(c),
        [str(i) for i in range(c)],
        {"backbone": backbone.identity},
    ).to(device)
    real = TensorDataset(torch.rand(c * 2, 3, res, res, generator=gen), torch.arange(c).repeat_interleave(2))
    config = DistillConfig(
        method=run["method"],
        ipc=run["ipc"],
        resolution=res,
        lgm_augs=run.get("augs", 10),
        precision=args.precision,
        chunk_size=run.get("chunk"),
        offload=run.get("offload", False),
    )
    synset = SyntheticSet(c, run["ipc"], res, storage="cpu" if config.offload else device, offload=config.offload)
    step = 0
    while synset.grow(step, device):  # all pyramid levels, as from step 1600 on
        step += synset.extent
    objective = build_objective(config, backbone, stats, device, real=real)
    return device, synset, ChunkAdam(synset, config.lr), objective


def _profile(objective, synset, optim, device) -> dict:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        objective.step(synset, optim, 1)
    times = {}
    for evt in prof.key_averages():
        if evt.key.startswith("fastsfm."):
            gpu = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
            times[evt.key.split(".", 1)[1]] = (gpu if device.type == "cuda" else evt.cpu_time_total) / 1e3
    total = sum(times.values()) or 1.0
    return {f"% {name}": 100.0 * times.get(name, 0.0) / total for name in PROFILE_RANGES}


def measure(run: dict, args) -> dict:
    """One configuration: step time (ms), peak memory (MiB), projected loop hours, optional profile."""
    row = {k: run.get(k) for k in ("backbone", "classes", "ipc", "method")}
    row["augs"] = run.get("augs") if run["method"] == "lgm" else 1
    row["chunk/offload"] = f"{run.get('chunk') or 'auto'}/{'yes' if run.get('offload') else 'no'}"
    try:
        device, synset, optim, objective = _setup(run, args)
        objective.step(synset, optim, 0)  # warm-up; sizes SFM's chunks
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            objective.step(synset, optim, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        peak = (
            torch.cuda.max_memory_allocated()
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ) / 2**20
        row.update({"step ms": 1e3 * seconds, "peak MiB": peak, "5001 steps h": seconds * LOOP_STEPS / 3600})
        if run["method"] == "sfm":
            row["chunk"] = getattr(objective, "chunk_size", None)
            if args.profile:
                row.update(_profile(objective, synset, optim, device))
    except torch.cuda.OutOfMemoryError:
        row.update({"step ms": None, "peak MiB": None, "note": "out of memory"})
    return row


def _child(queue, run, args):
    queue.put(measure(run, args))


def measure_isolated(run: dict, args) -> dict:
    """CUDA: in process (then the cache is emptied); CPU: a fresh process, so peak RSS is this run's."""
    if args.device != "cpu":
        result = measure(run, args)
        torch.cuda.empty_cache()
        return result
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, run, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def add_ratios(rows: list[dict]) -> None:
    """LGM/SFM time and memory ratios on each LGM row (same backbone, classes and IPC)."""
    for lgm in (r for r in rows if r["method"] == "lgm"):
        sfm = next(
            (r for r in rows if r["method"] == "sfm" and all(r[k] == lgm[k] for k in ("backbone", "classes", "ipc"))),
            None,
        )
        if sfm and sfm.get("step ms") and lgm.get("step ms"):
            lgm["time LGM/SFM"] = lgm["step ms"] / sfm["step ms"]
            lgm["memory LGM/SFM"] = lgm["peak MiB"] / sfm["peak MiB"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("step ms")]
    names = [f"{r['method'].upper()} {r['backbone'].split('_')[0]}\nC={r['classes']} IPC={r['ipc']}" for r in done]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(done)), 4))
    for ax, key in zip(axes, ("step ms", "peak MiB"), strict=True):
        colours = ["tab:blue" if r["method"] == "sfm" else "tab:orange" for r in done]
        ax.bar(range(len(done)), [r[key] for r in done], color=colours)
        ax.set_xticks(range(len(done)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(key)
    fig.suptitle("one distillation step: SFM (blue) vs LGM (orange)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: paper on CUDA, else cpu")
    parser.add_argument("--runs", default=None, help="JSON list of configurations (overrides the preset)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--profile", action="store_true", help="profile one SFM step per configuration")
    parser.add_argument("--out", type=Path, default=Path("benches/out/bench_distill.csv"))
    args = parser.parse_args(argv)
    runs = (
        json.loads(args.runs) if args.runs else PRESETS[args.preset or ("paper" if args.device != "cpu" else "cpu")]()
    )
    print(f"# bench_distill: {environment(torch.device(args.device))}, precision {args.precision}")
    rows = [measure_isolated(run, args) for run in runs]
    add_ratios(rows)
    print_table(rows)
    write_csv(rows, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} (.json, .png)")
    return rows


if __name__ == "__main__":
    main()
