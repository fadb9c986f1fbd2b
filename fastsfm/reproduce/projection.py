"""``fastsfm reproduce --dry-run``: the plan with the GPU-hours and the wall time of each cell, measured here.

Measured on the device the grid would run on, with random weights (time does not depend on them), in
the precision each stage runs with: a distillation step (:func:`fastsfm.bench.timing.distill_setup`,
all pyramid levels; an ensemble's: every member on the same crops) on a *sample* of at most
:data:`STEP_SAMPLE` images -- never the full set -- scaled to one rank's share, with the run's plan
(:mod:`fastsfm.distill.plan`: chunked steps make two passes, 4/3 of the work of one; a set the plan
refuses is flagged); the forward throughput of every backbone on the synthetic side (its precision)
and on the real side (``real_precision``, fp32 by default); and the **decode throughput of the real
files** (the dataset's own transform, per loader worker).  Passes over real images -- statistics
(one pass per dataset for every backbone), baselines that encode the train split, test features --
are projected from the smaller of decode and encode throughput; LGM's steps include their real
batches the same way.

On ``ranks`` ranks (default: this torchrun's world): the statistics pass, distillations (SFM and
LGM) and full-data cells are sharded (wall time / ranks, GPU-hours unchanged), an evaluation spreads
its seeds (wall / min(ranks, seeds)); the baselines run on rank 0 while the others wait (wall =
GPU-hours).  A cell whose wall time exceeds the job limit (``job_hours``) is flagged with how it
resumes in the next job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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


STEP_SAMPLE = 256
"""Most synthetic images a projection times a distillation step on (the step is scaled to the set)."""
TWO_PASS_WORK = 4 / 3
"""Work of a chunked step relative to a whole one: a no-graph forward more than forward + backward (1 + 3 / 3)."""
RESUMES = {
    "stats": "resumes from its checkpoint (`fastsfm stats --resume`; the grid does it)",
    "distill": "resumes from its checkpoint (at most checkpoint_minutes lost)",
    "eval": "resumes from its journal (finished seeds and modes kept; a running one from its last save)",
    "full": "reruns its test pass (a fraction of the cell)",
    "baseline": "reruns its selection",
}
"""How each kind of cell continues after a job limit kills it."""


def _step_hours(
    grid: GridConfig, backbone, method: str, classes: int, ipc: int, ranks: int, device
) -> tuple[float, str]:
    """Hours of the cell's distillation steps on each rank, and a note (chunking, or the plan's refusal)."""
    from ..distill.loop import plan_distill
    from ..distill.plan import Machine

    config = grid.distill_config(method, ipc, len(members_of(backbone)))
    shard = ranks
    images = -(-classes // shard) * ipc
    plan = plan_distill(backbone, config, classes, Machine.detect(device, shard), device)
    if not plan.feasible:
        return math.nan, plan.message
    sample_classes = max(1, min(-(-classes // shard), STEP_SAMPLE // ipc))
    synset, optim, objective = distill_setup(
        backbone, dataclasses.replace(config, chunk_size=None), sample_classes, device
    )
    seconds = time_steps(objective, synset, optim, 1, device) * images / synset.num_images
    del synset, optim, objective
    chunked = plan.passes == 2
    note = f"chunks of {plan.chunk} images/rank" if chunked else ""
    return config.steps * seconds * (TWO_PASS_WORK if chunked else 1.0) / 3600, note


def projection(run: Run, cells: list[Cell], ranks: int | None = None, job_hours: float = 24.0) -> tuple[str, float]:
    """The plan as a Markdown table with each cell's GPU-hours and wall time on ``ranks`` ranks (default:
    this run's world size), cells over ``job_hours`` flagged; and the GPU-hours of the cells to run."""
    grid, device = run.grid, run.device
    ranks = ranks or run.world
    workers = grid.workers if grid.workers is not None else default_workers()
    speed, steps, decode, total = {}, {}, {}, 0.0
    passed: set[str] = set()
    random_init: dict[str, Backbone] = {}
    real = grid.backbone.real_precision

    def backbone(name: str) -> Backbone | BackboneEnsemble:  # time and memory do not depend on the weights
        if name not in random_init:
            parts = members(name)
            if len(parts) > 1:
                random_init[name] = BackboneEnsemble([backbone(m) for m in parts])
            else:
                random_init[name] = from_config(dataclasses.replace(grid.backbone, random_init=True), device, name)
        return random_init[name]

    def rate(b: Backbone, precision: str | None = None) -> float:
        key = (b.identity, precision)
        if key not in speed:
            with b.using_precision(precision) if precision else contextlib.nullcontext():
                speed[key] = forward_rate(b, device)
        return speed[key]

    def pass_hours(images: int, encoders: list[Backbone], dataset: str) -> float:
        """Hours of one device encoding ``images`` real images with every one of ``encoders`` (real side)."""
        if dataset not in decode:
            decode[dataset] = max(1, workers) * decode_rate(run.dataset(dataset).train_eval)
        encode = 1 / sum(1 / rate(b, real) for b in encoders)
        return images / min(decode[dataset], encode) / 3600

    lines = [
        f"plan of {grid.out} on {ranks} x {device}: a projection from step times, forward and decode throughput "
        f"({workers} workers) measured now (random weights; synthetic side {grid.backbone.precision}, real side "
        f"{real}); job limit {job_hours:g} h",
        f"| cell | status | GPU-hours | wall h on {ranks} rank(s) | note |",
        "|---|---|---|---|---|",
    ]
    for cell in cells:
        bb = backbone(cell.backbone if cell.kind == "distill" else members(cell.backbone)[0])
        data = run.dataset(cell.dataset)
        classes, n_train = len(data.class_names), len(data.train)
        evals = [backbone(b) for b in grid.eval_list(cell.backbone)]
        spread, note = 1, ""  # the ranks that share the cell's work
        if cell.kind == "stats":  # the dataset's first pending statistics cell encodes for every pending backbone
            pending = [] if cell.dataset in passed else pending_stats(grid, cell.dataset)
            passed.add(cell.dataset)
            hours = pass_hours(n_train, [backbone(b) for b in pending], cell.dataset) if pending else 0.0
            spread = ranks
        elif cell.kind == "full":
            hours, spread = pass_hours(len(data.test), [bb], cell.dataset), ranks
        elif cell.kind == "baseline" and cell.name != "random":
            hours = 0.0  # the statistics pass's features are reused
        elif cell.kind == "distill":
            key = (bb.identity, cell.name, classes, cell.ipc)
            if key not in steps:
                steps[key] = _step_hours(grid, bb, cell.name, classes, cell.ipc, ranks, device)
            per_rank, note = steps[key]
            spread = ranks
            real_batches = grid.views[cell.name] * cell.ipc * classes if cell.name == "lgm" else 0
            hours = per_rank * spread + grid.distill.steps * pass_hours(real_batches, [bb], cell.dataset)
        elif cell.kind == "eval":
            views = grid.eval.seeds * grid.eval.epochs * classes * cell.ipc
            encoders = {b.identity: b for b in evals + ([bb] if set(grid.eval.mode) - {"probe"} else [])}
            hours = views * sum(1 / rate(b) for b in encoders.values()) / 3600
            hours += pass_hours(len(data.test), evals, cell.dataset)
            spread = min(ranks, grid.eval.seeds)  # one evaluation per seed (all evaluation backbones in it)
        else:
            hours = 0.0
        wall = hours / spread
        if wall > job_hours:
            note = "; ".join(filter(None, [note, f"over the {job_hours:g} h job: {RESUMES[cell.kind]}"]))
        status = "done" if cell.done() else "to run"
        total += 0.0 if cell.done() or math.isnan(hours) else hours
        lines.append(f"| {cell.label()} | {status} | {hours:.3g} | {wall:.3g} | {note} |")
    rates = ", ".join(f"{name}: {rate / max(1, workers):.0f} images/s per worker" for name, rate in decode.items())
    lines += [
        "",
        f"decode throughput: {rates}",
        f"projected GPU-hours of the cells to run: {total:.3g} on this device type",
    ]
    return "\n".join(lines), total
