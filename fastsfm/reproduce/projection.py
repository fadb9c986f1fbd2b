"""``fastsfm reproduce --dry-run``: the plan with the device hours of each cell, measured here.

Measured on the device the grid would run on, with random weights (time does not depend on them):
a distillation step of every distillation cell (an ensemble's: every member on the same crops)
(:func:`fastsfm.bench.timing.distill_setup`, all pyramid levels), the forward throughput of every backbone, and the
**decode throughput of the real files** (the dataset's own transform: JPEG decode, resize, crop, per loader worker).
Passes over real images -- statistics (one pass per dataset for every backbone), baselines that encode the train
split, test features -- are projected from the smaller of decode (workers x images/s per worker) and encode
throughput; LGM's steps include their real batches the same way.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..bench.timing import distill_setup, synchronize, time_steps
from ..data.images import default_workers
from ..models.backbones import Backbone, from_config
from ..models.ensemble import BackboneEnsemble, members_of
from .cells import Run, pending_stats
from .config import GridConfig, members
from .plan import Cell

__all__ = ["projection", "decode_rate", "forward_rate"]


def forward_rate(backbone: Backbone, device: torch.device, batch: int = 64) -> float:
    """Images per second of a no-grad forward at the backbone's input size."""
    x = torch.rand(batch, 3, backbone.input_size, backbone.input_size, device=device)
    with torch.no_grad():
        backbone(x)
        synchronize(device)
        began = time.perf_counter()
        backbone(x)
        synchronize(device)
    return batch / (time.perf_counter() - began)


def decode_rate(dataset, images: int = 32) -> float:
    """Images per second one loader worker decodes and transforms (the dataset's own ``__getitem__``,
    spread over the dataset)."""
    step = max(1, len(dataset) // images)
    indices = range(0, min(len(dataset), step * images), step)
    dataset[indices[0]]  # first touch: file-system caches, lazy imports
    began = time.perf_counter()
    for i in indices:
        dataset[i]
    return len(indices) / max(time.perf_counter() - began, 1e-9)


def _step_seconds(grid: GridConfig, backbone: Backbone, method: str, classes: int, ipc: int, device) -> float:
    config = grid.distill_config(method, ipc, len(members_of(backbone)))
    synset, optim, objective = distill_setup(backbone, config, classes, device)
    return time_steps(objective, synset, optim, 1, device)


def projection(run: Run, cells: list[Cell]) -> tuple[str, float]:
    """The plan as a Markdown table with projected device hours per cell, and the total of the cells to run."""
    grid, device = run.grid, run.device
    workers = grid.workers if grid.workers is not None else default_workers()
    speed, steps, decode, total = {}, {}, {}, 0.0
    passed: set[str] = set()
    random_init: dict[str, Backbone] = {}

    def backbone(name: str) -> Backbone | BackboneEnsemble:  # time and memory do not depend on the weights
        if name not in random_init:
            parts = members(name)
            if len(parts) > 1:
                random_init[name] = BackboneEnsemble([backbone(m) for m in parts])
            else:
                random_init[name] = from_config(dataclasses.replace(grid.backbone, random_init=True), device, name)
        return random_init[name]

    def pass_hours(images: int, encoders: list[Backbone], dataset: str) -> float:
        if dataset not in decode:
            decode[dataset] = max(1, workers) * decode_rate(run.dataset(dataset).train_eval)
        for b in encoders:
            speed.setdefault(b.identity, forward_rate(b, device))
        encode = 1 / sum(1 / speed[b.identity] for b in encoders)
        return images / min(decode[dataset], encode) / 3600

    lines = [
        f"plan of {grid.out} on {device}: projections from step times, forward throughput and decode throughput "
        f"({workers} workers) measured now (random weights; precision {grid.backbone.precision})",
        "| cell | status | projected h |",
        "|---|---|---|",
    ]
    for cell in cells:
        bb = backbone(cell.backbone if cell.kind == "distill" else members(cell.backbone)[0])
        data = run.dataset(cell.dataset)
        classes, n_train = len(data.class_names), len(data.train)
        evals = [backbone(b) for b in grid.eval_list(cell.backbone)]
        if cell.kind == "stats":  # the dataset's first pending statistics cell encodes for every pending backbone
            pending = [] if cell.dataset in passed else pending_stats(grid, cell.dataset)
            passed.add(cell.dataset)
            hours = pass_hours(n_train, [backbone(b) for b in pending], cell.dataset) if pending else 0.0
        elif cell.kind == "full":
            hours = pass_hours(len(data.test), [bb], cell.dataset)
        elif cell.kind == "baseline" and cell.name != "random":
            hours = 0.0  # the statistics pass's features are reused
        elif cell.kind == "distill":
            key = (bb.identity, cell.name, classes, cell.ipc)
            if key not in steps:
                steps[key] = _step_seconds(grid, bb, cell.name, classes, cell.ipc, device)
            real = grid.views[cell.name] * cell.ipc * classes if cell.name == "lgm" else 0
            hours = grid.distill.steps * (steps[key] / 3600 + pass_hours(real, [bb], cell.dataset))
        elif cell.kind == "eval":
            views = grid.eval.seeds * grid.eval.epochs * classes * cell.ipc
            encoders = {b.identity: b for b in evals + ([bb] if set(grid.eval.mode) - {"probe"} else [])}
            hours = views * sum(1 / speed.setdefault(i, forward_rate(b, device)) for i, b in encoders.items()) / 3600
            hours += pass_hours(len(data.test), evals, cell.dataset)
        else:
            hours = 0.0
        status = "done" if cell.done() else "to run"
        total += 0.0 if cell.done() else hours
        lines.append(f"| {cell.label()} | {status} | {hours:.3g} |")
    rates = ", ".join(f"{name}: {rate / max(1, workers):.0f} images/s per worker" for name, rate in decode.items())
    lines += [
        "",
        f"decode throughput: {rates}",
        f"projected device hours of the cells to run: {total:.3g} on this device",
    ]
    return "\n".join(lines), total
