"""SFM vs LGM distillation steps with the same backbone and precision, in one run; SFM alone at large IPC.

Per configuration: mean step time over ``--steps`` timed steps after one warm-up step (which
also sizes the chunks), peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS
of a fresh child process per configuration), the step's FLOPs (counted by
``torch.utils.flop_counter`` on the backbone: forward, and for chunked steps the recomputed
forward, plus the backward to the pixels) and their rate as a share of the tensor cores'
dense bf16 peak (``--peak-tflops``, the H100/H200 datasheet's 989), the projected wall time of
the authors' 5001-step loop, and LGM/SFM ratios.  ``--profile`` adds where one SFM step's time
goes (``torch.profiler`` over the objective's ranges).  Backbones have random weights: time
and memory do not depend on them.  The synthetic set has all its pyramid levels.

Offloaded rows also report the page-locked host memory the set and its Adam moments hold
against their byte size (``pinned/data``, at most 1.1 is the target), and ``--growth`` adds a
row that grows an offloaded set through every pyramid level and reports the largest such ratio
seen at any level.

SFM against K = 2 and 4 backbones at once (:mod:`fastsfm.models.ensemble`; the paper's four at C = 100,
IPC = 1 in the paper preset) reports its time and memory over SFM's with the first backbone alone
(``time /K=1``, ``memory /K=1``).

Rows are written to the CSV/JSON as each finishes; a configuration that fails (out of memory,
an error) is recorded with its error and the run goes on.

    python benches/bench_distill.py                      # CUDA: the paper preset; CPU: a tiny preset
    python benches/bench_distill.py --preset paper --precision bf16 --profile
    python benches/bench_distill.py --preset cpu --out benches/out/distill_cpu.csv

Outputs (CSV, JSON, PNG) go to ``benches/out/`` (untracked).
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch

from fastsfm.bench.benchmark import (
    BackboneFlops,
    backbone_flops,
    environment,
    in_child,
    kernel_events,
    print_table,
    write_csv,
)
from fastsfm.bench.timing import distill_setup, run_step, synchronize, time_steps
from fastsfm.config import DistillConfig, Precision, choices
from fastsfm.distill import pinned
from fastsfm.distill.optim import ChunkAdam
from fastsfm.distill.synset import SyntheticSet
from fastsfm.io import atomic_write_json
from fastsfm.memory import profiler
from fastsfm.models.backbones import load_backbone
from fastsfm.models.ensemble import BackboneEnsemble

LOOP_STEPS = 5001
PROFILE_RANGES = ("render", "augment", "backbone", "loss", "backward", "optimizer")


def _paper() -> list[dict]:
    runs = []
    for backbone in ("vit_base_patch16_224", "dinov2_vitb14"):
        base = {"backbone": backbone, "image_size": 224, "resolution": 256}
        for classes, ipc, views in ((100, 1, 10), (100, 10, 10), (1000, 1, 3)):
            runs.append({**base, "method": "sfm", "classes": classes, "ipc": ipc})
            runs.append({**base, "method": "lgm", "classes": classes, "ipc": ipc, "views": views})
    base = {"backbone": "dinov2_vitb14", "image_size": 224, "resolution": 256, "method": "sfm", "classes": 1000}
    runs.append({**base, "ipc": 10})
    runs.append({**base, "ipc": 50, "offload": True})
    paper = ["dinov2_vitb14", "clip_vitb16", "eva02_vitb14", "mocov3_vitb16"]
    base = {"image_size": 224, "resolution": 256, "method": "sfm", "classes": 100, "ipc": 1}
    return runs + [{**base, "backbone": paper[:k]} for k in (2, 4)]  # K = 1: dinov2_vitb14's row above


def _cpu() -> list[dict]:
    base = {"backbone": "vit_tiny_patch16_224", "image_size": 32, "resolution": 32, "classes": 10}
    runs = []
    for ipc, views in ((1, 10), (2, 3)):
        runs.append({**base, "method": "sfm", "ipc": ipc})
        runs.append({**base, "method": "lgm", "ipc": ipc, "views": views})
    runs.append({**base, "method": "sfm", "ipc": 4, "chunk": 8, "offload": True})
    several = ["vit_tiny_patch16_224", "test_vit", "vit_tiny_patch16_224", "test_vit"]  # seeds differ per member
    return runs + [{**base, "method": "sfm", "ipc": 1, "backbone": several[:k]} for k in (2, 4)]


PRESETS = {"paper": _paper, "cpu": _cpu}


def _config(run: dict) -> DistillConfig:
    return DistillConfig(
        method=run["method"],
        ipc=run["ipc"],
        resolution=run["resolution"],
        views=run.get("views"),
        chunk_size=run.get("chunk"),
        offload=run.get("offload", False),
    )


def _profile(objective, synset, optim, device, step_ms: float) -> dict:
    """Shares of one step by stage (the ``fastsfm.*`` ranges).  CPU: shares of their CPU time.  CUDA:
    shares of the step's kernel time; autograd launches the backward's kernels from its own thread,
    outside the main thread's ranges, so the kernel time no range holds is ``% autograd``, and
    ``device busy %`` is the kernel time over the step's wall time (low: the host is the bottleneck)."""
    with profiler(device) as prof:
        run_step(objective, synset, optim, 1)
        synchronize(device)
    ranges = {e.key.split(".", 1)[1]: e for e in prof.key_averages() if e.key.startswith("fastsfm.")}
    if device.type != "cuda":
        times = {name: e.cpu_time_total for name, e in ranges.items()}
        total = sum(times.values()) or 1.0
        return {f"% {name}": 100.0 * times.get(name, 0.0) / total for name in PROFILE_RANGES}
    times = {name: e.device_time_total for name, e in ranges.items()}
    kernels = sum(e.self_device_time_total for e in kernel_events(prof))
    total = max(kernels, sum(times.values())) or 1.0
    row = {f"% {name}": 100.0 * times.get(name, 0.0) / total for name in PROFILE_RANGES}
    row["% autograd"] = 100.0 * (total - sum(times.values())) / total
    row["device busy %"] = 100.0 * total / 1e3 / step_ms
    return row


def _step_flops(objective, synset, flops: BackboneFlops) -> float:
    """FLOPs of one step: every view forward (twice when chunked) and backward; LGM adds its real batch."""
    forward, backward = flops.forward, flops.backward
    rows = objective.views * synset.num_images
    chunked = objective.chunk_size is not None and objective.chunk_size < synset.num_images
    total = rows * ((2 if chunked else 1) * forward + backward)
    return total + getattr(objective, "batch", 0) * forward


def _pinned_ratio(synset, optim) -> float | None:
    held = sum(t.numel() * 4 for t in synset.levels) + optim.nbytes()
    stats = pinned.stats()
    return stats["peak"] / held if stats["peak"] else None


def measure(run: dict, args) -> dict:
    """One configuration: step time (ms), peak memory (MiB), FLOP rate, projected loop hours, optional profile."""
    names = run["backbone"] if isinstance(run["backbone"], list) else [run["backbone"]]
    row = {"backbone": "+".join(names), "K": len(names)} | {k: run.get(k) for k in ("classes", "ipc", "method")}
    config = _config(run)
    row["views"] = config.effective_views
    row["chunk/offload"] = f"{run.get('chunk') or 'auto'}/{'yes' if run.get('offload') else 'no'}"
    device = torch.device(args.device)
    try:
        members = [
            load_backbone(
                n, pretrained=False, image_size=run["image_size"], device=device, precision=args.precision, seed=i
            )
            for i, n in enumerate(names)
        ]
        backbone = members[0] if len(members) == 1 else BackboneEnsemble(members)
        flops = BackboneFlops(*map(sum, zip(*(backbone_flops(m, device) for m in members), strict=True)))
        pinned.reset_peak()
        synset, optim, objective = distill_setup(backbone, config, run["classes"], device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats()
        seconds = time_steps(objective, synset, optim, args.steps, device)
        peak = (
            torch.cuda.max_memory_allocated()
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ) / 2**20
        tflops = _step_flops(objective, synset, flops) / seconds / 1e12
        row.update({"step ms": 1e3 * seconds, "peak MiB": peak, "TFLOP/s": tflops})
        row["tensor-core %"] = 100.0 * tflops / args.peak_tflops if device.type == "cuda" else None
        row["5001 steps h"] = seconds * LOOP_STEPS / 3600
        row["chunk"] = objective.chunk_size
        if config.offload:
            row["pinned/data"] = _pinned_ratio(synset, optim)
        if args.profile and run["method"] == "sfm":
            row.update(_profile(objective, synset, optim, device, row["step ms"]))
    except Exception as err:  # noqa: BLE001 - a failed configuration is a row, not the end of the run
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def growth_row(classes: int, ipc: int, resolution: int) -> dict:
    """Grow an offloaded set (and its Adam moments) through every pyramid level; the largest ratio
    of page-locked host bytes to the bytes the set and moments hold, at any level."""
    pinned.reset_peak()
    synset = SyntheticSet(classes, ipc, resolution, extent=1, storage="cpu", offload=True)
    optim = ChunkAdam(synset, 1e-3)
    worst, step = 0.0, 0
    while len(synset.levels) < len(synset.sizes):
        step += 1
        if synset.grow(step):
            optim.reset()
        ratio = _pinned_ratio(synset, optim)
        worst = max(worst, ratio or 0.0)
    held = sum(t.numel() * 4 for t in synset.levels) + optim.nbytes()
    return {
        "backbone": "-",
        "classes": classes,
        "ipc": ipc,
        "method": "offload growth",
        "held GiB": held / 2**30,
        "pinned/data": worst if pinned.stats()["peak"] else None,
    }


def measure_isolated(run: dict, args) -> dict:
    """CUDA: in process (then the cache is emptied); CPU: a fresh process, so peak RSS is this run's
    (``--no-isolate``: in process, faster, its peak RSS the largest so far)."""
    if args.device != "cpu" or not args.isolate:
        result = measure(run, args)
        torch.cuda.empty_cache()
        return result
    return in_child(__file__, "measure", run, args)


def add_ratios(rows: list[dict]) -> None:
    """LGM/SFM time and memory ratios on each LGM row (same backbone, classes and IPC); on each row of
    SFM against K > 1 backbones, its time and memory over SFM's with the first of them alone."""
    for lgm in (r for r in rows if r["method"] == "lgm"):
        sfm = next(
            (r for r in rows if r["method"] == "sfm" and all(r[k] == lgm[k] for k in ("backbone", "classes", "ipc"))),
            None,
        )
        if sfm and sfm.get("step ms") and lgm.get("step ms"):
            lgm["time LGM/SFM"] = lgm["step ms"] / sfm["step ms"]
            lgm["memory LGM/SFM"] = lgm["peak MiB"] / sfm["peak MiB"]
    for several in (r for r in rows if r.get("K", 1) > 1 and r.get("step ms")):
        first = several["backbone"].split("+")[0]
        same = ("classes", "ipc", "method")
        one = next((r for r in rows if r["backbone"] == first and all(r[k] == several[k] for k in same)), None)
        if one and one.get("step ms"):
            several["time /K=1"] = several["step ms"] / one["step ms"]
            several["memory /K=1"] = several["peak MiB"] / one["peak MiB"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("step ms")]
    if not done:
        return
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


def _write(rows: list[dict], out: Path) -> None:
    write_csv(rows, out)
    atomic_write_json(out.with_suffix(".json"), rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: paper on CUDA, else cpu")
    parser.add_argument("--runs", default=None, help="JSON list of configurations (overrides the preset)")
    parser.add_argument("--precision", default="auto", choices=choices(Precision))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--profile", action="store_true", help="profile one SFM step per configuration")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU: each configuration in a fresh process, so its peak RSS is its own",
    )
    parser.add_argument("--growth", default=None, help="C:IPC:RES of an offloaded set grown through every level")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 tensor-core peak (H100/H200)")
    parser.add_argument("--out", type=Path, default=Path("benches/out/bench_distill.csv"))
    args = parser.parse_args(argv)
    runs = (
        json.loads(args.runs) if args.runs else PRESETS[args.preset or ("paper" if args.device != "cpu" else "cpu")]()
    )
    print(f"# bench_distill: {environment(torch.device(args.device))}, precision {args.precision}", flush=True)
    rows = []
    for run in runs:
        rows.append(measure_isolated(run, args))
        add_ratios(rows)
        _write(rows, args.out)
    if args.growth:
        rows.append(growth_row(*(int(v) for v in args.growth.split(":"))))
        _write(rows, args.out)
    print_table(rows)
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} (.json, .png)")
    return rows


if __name__ == "__main__":
    main()
