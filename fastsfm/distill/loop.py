"""The distillation loop: build or resume a run, optimise, checkpoint, export.

The loop knows nothing about the objective's maths (:mod:`fastsfm.distill.objectives`); it owns the
run: its folder, checkpoints (atomic, every ``checkpoint_every`` steps, on SIGTERM/SIGUSR1/
Ctrl-C), resume, per-step metrics, progress and the exported set.

**Preemption.**  SIGTERM, SIGUSR1 (SLURM's requeue signal, which the authors' code handles)
and a first Ctrl-C let the current step finish, write a checkpoint of it and exit with
status ``128 + signal`` (143, 138, 130); ``--resume`` then continues bit for bit.  A second
Ctrl-C interrupts at once (the last checkpoint is kept).

**Outputs** in ``out_dir``: ``checkpoint.safetensors`` (``checkpoint.rank{r}of{w}...`` under
torch.distributed), ``metrics.jsonl`` (step, loss, pyramid levels, step time, peak memory),
``loss.png``, ``synset.safetensors`` (images (N, 3, R, R) in [0, 1], labels, metadata) and
``synset.png``.

**A step counts as done only once its loss is on the host**: the objective queues the step
and returns the loss on the device; the loop reads it back (the step's one synchronisation),
then :meth:`ChunkAdam.finish_step` and ``done`` advance.  An interrupt before that leaves the
optimiser marked in-step, and no checkpoint is written for a step whose results are not known.

Under ``torch.distributed`` each rank owns a contiguous block of classes -- their images
and optimiser state -- and the SFM objective all-reduces class sums and counts every step,
so the ranks optimise the one global objective and produce exactly the single-process
images.  A resume on another world size reads each rank's classes' rows from the checkpoints the
old ranks wrote (:func:`fastsfm.distill.checkpoint.load_resharded`: slices, never whole files) and
deletes them once its own are written.  For the exported set every rank writes its
shard (``synset.rank{r}of{w}.safetensors``) and rank 0 streams them into ``synset.safetensors``
(:func:`fastsfm.io.concat_safetensors`): no rank holds more than its own shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..config import DistillConfig
from ..data.images import labels_of, stack_images
from ..data.reals import random_reals
from ..data.setfile import load_images, save_grid, save_images
from ..distributed import barrier, rank_world, shard_classes
from ..io import check_free_space, concat_safetensors
from ..models.backbones import Backbone
from ..models.ensemble import BackboneEnsemble, members_of
from ..progress import Progress
from ..signals import StopSignals
from ..stats import ClassStats
from .checkpoint import load_checkpoint, load_resharded, save_checkpoint
from .metrics import MetricsLog, plot_loss
from .objectives import DistillStep, TwoPassStep, build_objective
from .optim import ChunkAdam
from .plan import Machine, Plan
from .synset import SyntheticSet

__all__ = ["DistillConfig", "distill", "plan_distill"]

log = logging.getLogger(__name__)


def _checkpoint_path(out: Path, rank: int, world: int) -> Path:
    return out / ("checkpoint.safetensors" if world == 1 else f"checkpoint.rank{rank}of{world}.safetensors")


def _other_world(out: Path, world: int) -> list[Path]:
    """The complete set of per-rank checkpoints another world size wrote in ``out`` (rank order), if any."""
    sizes = {1} if (out / "checkpoint.safetensors").exists() else set()
    sizes |= {int(m[1]) for p in out.glob("checkpoint.rank*of*.safetensors") if (m := re.search(r"of(\d+)\.", p.name))}
    complete = [
        [_checkpoint_path(out, r, w) for r in range(w)]
        for w in sorted(sizes - {world})
        if all(_checkpoint_path(out, r, w).exists() for r in range(w))
    ]
    if len(complete) > 1:
        raise FileExistsError(f"{out} holds checkpoints of several world sizes: keep one set")
    return complete[0] if complete else []


def _open_run(
    out: Path, ckpt: Path, identity: dict[str, str], resume: bool, classes: range, num_classes: int, ipc: int
) -> tuple[dict | None, list[Path]]:
    """Check the run folder against ``resume``; load the checkpoint if resuming (None otherwise),
    resharded from the checkpoints of another world size when this one wrote none; and those files."""
    world = int(identity["world_size"])
    kept = {k: v for k, v in identity.items() if k != "world_size"}  # a checkpoint of any world size resumes
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} exists: pass resume=True (--resume) to continue it, or choose another output")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        return None, []
    if ckpt.exists():
        return load_checkpoint(ckpt, kept), []
    others = _other_world(out, world)
    if not others:
        found = sorted(p.name for p in out.glob("checkpoint*.safetensors"))
        hint = f"; found {found}, an incomplete set of another world size" if found else ""
        raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist{hint}")
    log.info("resuming from %d checkpoints of another world size, resharded to %d ranks", len(others), world)
    return load_resharded(others, kept, classes, num_classes, ipc), others


def _initial_images(config: DistillConfig, real: Dataset | None, num_classes: int, classes: range):
    """Random real images of this rank's classes for ``init="real"`` (picked with the run's seed)."""
    if config.init != "real":
        return None
    if real is None:
        raise ValueError("init='real' needs the real training images (--data)")
    picks = random_reals(labels_of(real), num_classes, config.ipc, config.seed)
    return stack_images(real, picks[classes.start * config.ipc : classes.stop * config.ipc])


def _build_synset(
    config: DistillConfig, real: Dataset | None, num_classes: int, classes: range, device: torch.device
) -> SyntheticSet:
    storage = torch.device("cpu") if config.offload else device
    return SyntheticSet(
        len(classes),
        config.ipc,
        config.resolution,
        config.param,
        config.init,
        _initial_images(config, real, num_classes, classes),
        config.pyramid_start,
        config.pyramid_extent,
        config.decorrelate,
        config.seed,
        channels=config.channels,
        first_class=classes.start,
        storage=storage,
        offload=bool(config.offload),
    )


def _probe_set(config: DistillConfig, num_classes: int, classes: range, device: torch.device) -> SyntheticSet:
    """The set a plan probes: ``classes``' images at their first pyramid level (noise), on the device --
    a few bytes per image, no real images read."""
    return _build_synset(dataclasses.replace(config, init="noise", offload=False), None, num_classes, classes, device)


def _save(ckpt: Path, synset: SyntheticSet, optim: ChunkAdam, step: int, identity: dict[str, str]) -> None:
    tensors = {**synset.state(), **optim.state()}
    check_free_space(ckpt, sum(t.numel() * t.element_size() for t in tensors.values()))
    save_checkpoint(ckpt, tensors, step, optim.steps, identity)


def _read_back(loss, skipped) -> tuple[float, int]:
    """The step's loss (and the chunks skipped for non-finite gradients) on the host: one synchronisation."""
    if skipped is None:
        return float(loss), 0
    both = torch.stack([torch.as_tensor(loss).float().reshape(()).to(skipped.device), skipped.float().reshape(())])
    value, count = both.tolist()
    return value, int(count)


def _optimise(
    synset: SyntheticSet,
    optim: ChunkAdam,
    objective: DistillStep,
    config: DistillConfig,
    start: int,
    ckpt: Path,
    identity: dict[str, str],
    metrics: MetricsLog,
    device: torch.device,
    group,
    progress: bool,
) -> None:
    """Steps ``start .. config.steps - 1`` with checkpoints; exits ``128 + signal`` when asked to stop."""
    bar = Progress(config.steps, f"distill ({config.method})", initial=start, enabled=progress, unit="step")
    backbone = getattr(objective, "backbone", None)
    compiled = backbone is not None and any(getattr(m, "compiled", False) for m in members_of(backbone))
    done = saved = start
    saved_at = time.monotonic()
    try:
        with StopSignals() as stop:
            for step in range(start, config.steps):
                if synset.grow(step, device):
                    optim.reset()  # LGM re-creates Adam at each new pyramid level
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                began = time.perf_counter()
                loss, skipped = _read_back(objective.step(synset, optim, step), optim.skipped)
                optim.finish_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became {loss} at step {step} (NaN/Inf features or images); "
                        f"the checkpoint of step {saved} is kept; lower --lr or use "
                        "--precision fp32"
                    )
                seconds = time.perf_counter() - began
                if step == start and compiled:
                    log.info("step %d took %.1f s, the torch.compile of the backbone included", step, seconds)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                done = step + 1
                extra = {"skipped_chunks": skipped} if optim.check_finite else {}
                metrics.log(step=step, loss=loss, levels=len(synset.levels), step_s=seconds, peak_mib=peak, **extra)
                bar.update(loss=loss, levels=len(synset.levels))
                due = time.monotonic() - saved_at >= 60 * config.checkpoint_minutes
                halt, due = stop.agree(group, due)
                if halt or due or done % config.checkpoint_every == 0 or done == config.steps:
                    _save(ckpt, synset, optim, done, identity)
                    saved, saved_at = done, time.monotonic()
                if halt:
                    log.warning(
                        "stopped by signal %d after step %d: checkpoint written to %s; continue with --resume",
                        stop.signum,
                        done,
                        ckpt,
                    )
                    raise SystemExit(stop.code)
    except KeyboardInterrupt:
        if not optim.in_step:  # the state is exactly step `done` (no chunk of an unfinished step applied)
            _save(ckpt, synset, optim, done, identity)
            log.warning("interrupted: checkpoint of step %d written to %s; continue with --resume", done, ckpt)
        raise
    finally:
        bar.close()


def _export(
    synset: SyntheticSet,
    stats: ClassStats,
    config: DistillConfig,
    backbone: Backbone | BackboneEnsemble,
    out: Path,
    device: torch.device,
    rank: int,
    world: int,
) -> None:
    """Render the set and write synset.safetensors (merged by rank 0 from per-rank shard files
    under torch.distributed), synset.png and loss.png.  The metadata names every backbone
    (``backbones``; ``backbone``: the first, whose statistics evaluate the set by default)."""
    meta = {
        "method": config.method,
        "backbone": members_of(backbone)[0].identity,
        "backbones": json.dumps([m.identity for m in members_of(backbone)]),
        "precision": backbone.precision,
        "dataset": stats.meta.get("dataset", ""),
        "class_names": json.dumps(stats.class_names),
        "config": json.dumps(asdict(config)),
        "ipc": str(config.ipc),
        "num_classes": str(stats.num_classes),
    }
    images = synset.render(device=device).cpu()
    path = out / "synset.safetensors"
    if world > 1:
        shards = [out / f"synset.rank{r}of{world}.safetensors" for r in range(world)]
        save_images(shards[rank], images, synset.labels, meta)
        barrier()
        if rank == 0:
            concat_safetensors(shards, path, meta)
            for shard in shards:
                shard.unlink()
        barrier()
    else:
        save_images(path, images, synset.labels, meta)
    if rank != 0:
        return
    shown, labels, _ = load_images(path, rows=20 * config.ipc)  # the grid shows at most 20 classes
    title = f"{config.method.upper()} IPC={config.ipc}, {backbone.name}"
    save_grid(shown, labels, stats.class_names, out / "synset.png", title=title)
    plot_loss(out / "metrics.jsonl", out / "loss.png", title=title)


def _plan(objective: DistillStep, synset: SyntheticSet, num_classes: int, rank: int) -> Plan | None:
    """Plan the run (:mod:`fastsfm.distill.plan`; it sets the chunk size and, with ``offload`` unset,
    the placement) from probes of ``synset`` (:func:`_probe_set`) and log it in one line, or
    raise :class:`fastsfm.distill.plan.PlanError` naming what would fit.  Every rank plans for the
    largest shard on identical devices, so the ranks agree.  A custom objective without ``plan`` runs unplanned."""
    plan_of = getattr(objective, "plan", None)
    if plan_of is None:
        return None
    plan = plan_of(synset, num_classes).check()
    if rank == 0:
        log.info("%s", plan.message)
    return plan


def _matched(
    backbone: Backbone | BackboneEnsemble | Sequence[Backbone], stats: ClassStats | Sequence[ClassStats]
) -> tuple[Backbone | BackboneEnsemble, list[ClassStats]]:
    """The backbone (an ensemble for several) and its statistics, one per member, each checked
    against its member, all of one dataset and class list."""
    members = list(backbone) if isinstance(backbone, Sequence) else members_of(backbone)
    stats = [stats] if isinstance(stats, ClassStats) else list(stats)
    if len(stats) != len(members):
        raise ValueError(f"{len(stats)} statistics for {len(members)} backbones: give one --stats per --backbone")
    for member, member_stats in zip(members, stats, strict=True):
        member_stats.check_compatible(member)
    for other in stats[1:]:
        other.check_compatible(num_classes=stats[0].num_classes, dataset=stats[0].meta.get("dataset"))
        if other.class_names != stats[0].class_names:
            raise ValueError("the statistics of the backbones name different classes: compute them on one dataset")
    if len(members) == 1:
        return members[0], stats
    return (backbone if isinstance(backbone, BackboneEnsemble) else BackboneEnsemble(members)), stats


def distill(
    backbone: Backbone | BackboneEnsemble | Sequence[Backbone],
    stats: ClassStats | Sequence[ClassStats],
    config: DistillConfig,
    out_dir: str | Path,
    *,
    real: Dataset | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    objective: DistillStep | None = None,
) -> SyntheticSet:
    """Run (or resume) a distillation; returns this rank's :class:`SyntheticSet`.

    Args:
        backbone: frozen feature extractor matching ``stats`` (checked); several backbones (a
            sequence, or a :class:`fastsfm.models.ensemble.BackboneEnsemble`) for SFM against all of them
            at once, the weighted mean of their flow losses (``config.backbone_weights``).
        stats: real class statistics of ``backbone``; one per backbone, in the same order.
        config: :class:`DistillConfig`; ``config.method`` picks the objective.
        out_dir: the run folder (see the module docstring for its files).
        real: real training images at the synthetic resolution (``init="real"``, LGM).
        resume: continue from the checkpoint; without it an existing checkpoint is an error.
        objective: a custom :class:`fastsfm.distill.objectives.DistillStep` (default: from ``config``).
    """
    device = torch.device(device)
    backbone, stats = _matched(backbone, stats)
    rank, world = rank_world()
    group = dist.group.WORLD if world > 1 else None
    out = Path(out_dir)
    ckpt = _checkpoint_path(out, rank, world)
    made_with = [s.meta.get("backbone", "") for s in stats]
    identity = {
        **config.identity(),
        "precision": json.dumps(backbone.precision),  # the backbone owns it; it changes the results
        "stats_backbone": made_with[0] if len(made_with) == 1 else json.dumps(made_with),
        "stats_dataset": stats[0].meta.get("dataset", ""),
        "world_size": str(world),
    }
    backbone, stats = backbone.to(device), [s.to(device) for s in stats]
    if objective is None:  # before the run folder: a setting no objective takes writes nothing
        objective = build_objective(config, backbone, stats, device, real=real, group=group)
    classes = shard_classes(stats[0].num_classes, rank, world)
    probes = _probe_set(config, stats[0].num_classes, classes, device)
    plan = _plan(objective, probes, stats[0].num_classes, rank)  # before the run folder: nothing written if refused
    if config.offload is None and plan is not None:
        config = dataclasses.replace(config, offload=plan.placement == "host-pinned")
    synset = _build_synset(config, real, stats[0].num_classes, classes, device)
    state, stale = _open_run(out, ckpt, identity, resume, classes, stats[0].num_classes, config.ipc)
    optim = ChunkAdam(
        synset,
        config.lr,
        check_finite=backbone.autocast_dtype() == torch.float16,
        optimizer_state=config.optimizer_state,
    )
    start = 0
    if state is not None:
        synset.load_state(state["tensors"])
        optim.load_state(state["tensors"], state["optimizer_steps"])
        start = state["step"]
    metrics = MetricsLog(out / "metrics.jsonl", start, enabled=rank == 0)
    _optimise(synset, optim, objective, config, start, ckpt, identity, metrics, device, group, progress and rank == 0)
    _export(synset, stats[0], config, backbone, out, device, rank, world)
    if stale:  # the other world size's checkpoints: superseded by this run's own
        barrier()
        if rank == 0:
            for path in stale:
                path.unlink(missing_ok=True)
    return synset


def plan_distill(
    backbone: Backbone | BackboneEnsemble | Sequence[Backbone],
    config: DistillConfig,
    num_classes: int,
    machine: Machine,
    device: str | torch.device = "cpu",
) -> Plan:
    """The :class:`fastsfm.distill.plan.Plan` of a run of ``config`` over ``num_classes`` classes on
    ``machine``, probed on ``device`` with ``backbone`` (its weights do not matter): the largest
    rank's shard is drawn at its first pyramid level (noise) for the probes; nothing else is allocated.
    LGM's real batches (encoded without a graph) are not counted."""
    if isinstance(backbone, Sequence):
        backbone = backbone[0] if len(backbone) == 1 else BackboneEnsemble(list(backbone))
    device = torch.device(device)
    probes = _probe_set(config, num_classes, shard_classes(num_classes, 0, machine.ranks), device)
    return TwoPassStep(backbone.to(device), config, device).plan(probes, num_classes, machine)
