"""What a compact Adam state (``optimizer_state`` bf16 / 8bit) changes, measured against fp32 moments.

The same distillation -- the digits, the demo's backbone and settings, IPC 10, 500 steps (so every
pyramid growth, at steps 41 ... 201, falls inside the window) -- with each mode, from the same seed:

* the relative distance of the final images to fp32's (``||x - x_fp32|| / ||x_fp32||``) and of the
  loss curve (the largest and the mean relative gap over the steps, and the final losses);
* the state bytes per image (levels + moments, :func:`fastsfm.distill.plan.state_bytes`, equal to what
  the run holds: tested) and the step time (median over the steps after the last growth) against fp32's.

    python benches/bench_optimizer_state.py                 # ~3 minutes on 2 CPU cores
    python benches/bench_optimizer_state.py --device cuda   # the GPU row

Prints a Markdown table; writes ``benches/out/optimizer_state.json``; never touches tracked files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fastsfm.bench.benchmark import markdown_table
from fastsfm.cli.demo import DEMO_BACKBONES, DEMO_CLASSIFIER, DEMO_DISTILL
from fastsfm.config import BackboneConfig, OptimizerState, choices
from fastsfm.data.datasets import digits
from fastsfm.distill.loop import distill
from fastsfm.distill.plan import state_bytes
from fastsfm.io import atomic_write_json
from fastsfm.models.backbones import from_config
from fastsfm.stats import compute_stats


def _run(backbone, stats, config, device, folder: Path) -> dict:
    synset = distill(backbone, stats, config, folder, device=device, progress=False)
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    final = max(m["levels"] for m in lines)
    grown = next(i for i, m in enumerate(lines) if m["levels"] == final)  # the last growth's step
    steady = [m["step_s"] for m in lines[grown + 1 :]] or [m["step_s"] for m in lines]
    return {
        "images": synset.render().float().cpu(),
        "loss": torch.tensor([m["loss"] for m in lines], dtype=torch.float64),
        "step_ms": 1e3 * statistics.median(steady),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benches/out/optimizer_state.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    data = digits(32)
    backbone = from_config(BackboneConfig(), device, DEMO_BACKBONES[0])
    loader = DataLoader(data.train_eval, batch_size=256)
    stats = compute_stats(backbone, loader, data.class_names, data.name, classifier=DEMO_CLASSIFIER, progress=False)
    base = replace(DEMO_DISTILL, ipc=args.ipc, steps=args.steps, checkpoint_every=args.steps)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in choices(OptimizerState):
            runs[mode] = _run(backbone, stats, replace(base, optimizer_state=mode), device, Path(tmp) / mode)
    exact = runs["fp32"]
    rows = []
    for mode, run in runs.items():
        gap = (run["loss"] - exact["loss"]).abs() / exact["loss"].abs().clamp_min(1e-12)
        levels, moments = state_bytes(replace(base, optimizer_state=mode))
        distance = (run["images"] - exact["images"]).norm() / exact["images"].norm()
        rows.append(
            {
                "optimizer_state": mode,
                "images: rel. distance to fp32": float(distance),
                "loss: max rel. gap": float(gap.max()),
                "loss: mean rel. gap": float(gap.mean()),
                "final loss": float(run["loss"][-1]),
                "state KB/image": (levels + moments) / 1e3,
                "state vs fp32": (levels + moments) / sum(state_bytes(replace(base, optimizer_state="fp32"))),
                "step ms": run["step_ms"],
                "step time vs fp32": run["step_ms"] / exact["step_ms"],
            }
        )
    meta = {"device": str(device), "torch": torch.__version__, "steps": args.steps, "ipc": args.ipc}
    print(f"compact Adam state vs fp32 ({meta})\n")
    print(markdown_table(rows))
    atomic_write_json(args.out, {"meta": meta, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
