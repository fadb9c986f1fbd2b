"""The distillation loop: render -> augment once -> backbone -> loss -> step, with checkpoints.

Defaults follow LGM's published settings, which the SFM paper compares against under the
same parameterisation (arXiv 2602.05391's stored copy gives no optimiser details, so this is
our choice): Adam, lr 2e-3, pyramid from 1x1 growing every 200 steps, 5000 steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from .augment import SinglePassAugment
from .backbones import Backbone
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import rank_world, shard_classes
from .loss import SFMLoss
from .stats import ClassStats
from .synset import SyntheticSet, save_grid, save_images

__all__ = ["DistillConfig", "distill", "SFMObjective", "Objective"]


@dataclass
class DistillConfig:
    """Settings of one distillation run (all of them are recorded in checkpoints)."""

    method: str = "sfm"  # "sfm" or "lgm" (baseline, see fastsfm.baselines.lgm)
    ipc: int = 1  # synthetic images per class
    steps: int = 5000
    lr: float = 2e-3
    resolution: int = 256  # stored synthetic resolution; the backbone sees random crops
    param: str = "pyramid"  # "pyramid" or "pixels"
    init: str = "noise"  # "noise" or "real"
    pyramid_start: int = 1
    pyramid_extent: int = 200  # steps between pyramid levels
    decorrelate: bool = True
    objective: str = "flow"  # SFM objective: "flow" (paper) or "decouple"
    alpha: float = 1.0  # decouple only: weight of MSE(mu, t)
    nontarget_divisor: float | None = None  # None: C - 1; the released script uses C*IPC - 1
    noise_std: float = 0.2  # augmentation noise (0 disables)
    lgm_augs: int = 10  # LGM only: augmented copies of the synthetic set (real batch: ipc*augs*C)
    seed: int = 0
    checkpoint_every: int = 100

    def identity(self) -> dict[str, str]:
        """What must match for a checkpoint to be resumed (steps may grow)."""
        return {k: json.dumps(v) for k, v in asdict(self).items() if k not in ("steps", "checkpoint_every")}


class Objective(Protocol):
    def backward(self, images: Tensor, labels: Tensor) -> float:
        """Back-propagate the loss of rendered ``images`` (N, 3, R, R) into them; return its value."""


class SFMObjective:
    """SFM: one augmentation pass of the synthetic set, backbone features, :class:`SFMLoss`.

    Under ``torch.distributed`` each rank passes its own classes' images; the loss all-reduces
    per-class sums and counts, so every rank optimises the one global objective.
    """

    def __init__(self, backbone: Backbone, stats: ClassStats, augment: SinglePassAugment, config: DistillConfig):
        self.backbone, self.augment = backbone, augment
        group = dist.group.WORLD if rank_world()[1] > 1 else None
        self.loss = SFMLoss(
            stats,
            objective=config.objective,
            alpha=config.alpha,
            nontarget_divisor=config.nontarget_divisor,
            process_group=group,
        ).to(stats.means.device)

    def backward(self, images: Tensor, labels: Tensor) -> float:
        loss = self.loss(self.backbone(self.augment(images)), labels)
        loss.backward()
        return loss.item()


def _restore_rng(rng: dict[str, Tensor]) -> None:
    torch.set_rng_state(rng["rng.cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def distill(
    backbone: Backbone,
    stats: ClassStats,
    config: DistillConfig,
    out_dir: str | Path,
    *,
    real_images: Tensor | None = None,
    objective: Objective | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SyntheticSet:
    """Run (or resume) a distillation and export ``synset.safetensors`` and ``synset.png``.

    Args:
        backbone: frozen feature extractor matching ``stats`` (checked).
        stats: real class statistics.
        config: :class:`DistillConfig`.
        out_dir: folder for ``checkpoint.safetensors``, ``synset.safetensors``, ``synset.png``.
        real_images: (C*IPC, 3, R, R) images for ``init="real"``.
        objective: overrides the loss (the LGM baseline passes its own); default SFM.
        resume: continue from ``out_dir/checkpoint.safetensors``; without it an existing
            checkpoint is an error (nothing is overwritten).

    Ctrl-C writes a checkpoint of the last completed step before re-raising.

    Under ``torch.distributed`` (see :mod:`fastsfm.distributed`) each rank owns a contiguous
    block of classes -- their images and optimiser state -- and seeds its RNG with
    ``seed + rank``; the loss all-reduces per-class sums and counts each step.  Each rank
    checkpoints its shard
    (``checkpoint.rank{r}of{w}.safetensors``), resuming needs the same world size, and rank 0
    writes the merged ``synset.safetensors``/``synset.png``.  Returns this rank's shard.
    """
    stats.check_compatible(backbone)
    rank, world = rank_world()
    if world > 1 and objective is not None:
        raise ValueError(
            "only the SFM objective can be sharded over ranks (LGM matches one global gradient); "
            "run LGM in a single process"
        )
    classes = shard_classes(stats.num_classes, rank, world)
    out = Path(out_dir)
    ckpt = out / ("checkpoint.safetensors" if world == 1 else f"checkpoint.rank{rank}of{world}.safetensors")
    identity = {
        **config.identity(),
        "stats_backbone": stats.meta.get("backbone", ""),
        "stats_dataset": stats.meta.get("dataset", ""),
        "world_size": str(world),
    }
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} exists: pass resume=True (--resume) to continue it, or choose another output")
    if resume and not ckpt.exists():
        others = sorted(p.name for p in out.glob("checkpoint*.safetensors"))
        hint = f"; found {others}: resume with the world size that wrote them" if others else ""
        raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist{hint}")
    state = load_checkpoint(ckpt, identity) if resume else None
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed + rank)
    if real_images is not None:
        real_images = real_images[classes.start * config.ipc : classes.stop * config.ipc]
    synset = SyntheticSet(
        len(classes),
        config.ipc,
        config.resolution,
        config.param,
        config.init,
        real_images,
        config.pyramid_start,
        config.pyramid_extent,
        config.decorrelate,
        config.seed + rank,
        first_class=classes.start,
    ).to(device)
    stats = stats.to(device)
    backbone = backbone.to(device)
    if objective is None:
        augment = SinglePassAugment(backbone.input_size, noise_std=config.noise_std)
        objective = SFMObjective(backbone, stats, augment, config)
    start = 0
    if state is not None:
        synset.load_levels(state["levels"])
        start = state["step"]
    opt = torch.optim.Adam(synset.parameters(), lr=config.lr)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        _restore_rng(state["rng"])
    meta = {
        "method": config.method,
        "backbone": backbone.identity,
        "dataset": stats.meta.get("dataset", ""),
        "class_names": json.dumps(stats.class_names),
        "config": json.dumps(asdict(config)),
    }
    step = start
    bar = tqdm(
        range(start, config.steps),
        desc=f"distill ({config.method})",
        disable=not progress or rank != 0,
        unit="step",
        initial=start,
        total=config.steps,
    )
    try:
        for step in bar:
            if synset.grow(step):
                opt = torch.optim.Adam(synset.parameters(), lr=config.lr)  # LGM resets Adam per new level
            opt.zero_grad(set_to_none=True)
            loss = objective.backward(synset.render(), synset.labels)
            opt.step()
            bar.set_postfix(loss=f"{loss:.4f}", levels=len(synset.levels))
            if (step + 1) % config.checkpoint_every == 0:
                save_checkpoint(ckpt, synset.level_tensors(), opt, step + 1, identity)
        step = config.steps
    except KeyboardInterrupt:
        save_checkpoint(ckpt, synset.level_tensors(), opt, step, identity)
        print(f"\ninterrupted: checkpoint of step {step} written to {ckpt}; continue with --resume")
        raise
    save_checkpoint(ckpt, synset.level_tensors(), opt, step, identity)
    with torch.no_grad():
        images, labels = synset.render().cpu(), synset.labels.cpu()
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, (images, labels))
        images, labels = torch.cat([i for i, _ in shards]), torch.cat([y for _, y in shards])
    if rank == 0:
        meta = {**meta, "ipc": str(config.ipc), "num_classes": str(stats.num_classes)}
        save_images(out / "synset.safetensors", images, labels, meta)
        save_grid(
            images,
            labels,
            stats.class_names,
            out / "synset.png",
            title=f"{config.method.upper()} IPC={config.ipc}, {backbone.name}",
        )
    return synset
