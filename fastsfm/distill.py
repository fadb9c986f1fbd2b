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
from torch import Tensor
from tqdm.auto import tqdm

from .augment import SinglePassAugment
from .backbones import Backbone
from .checkpoint import load_checkpoint, save_checkpoint
from .loss import SFMLoss
from .stats import ClassStats
from .synset import SyntheticSet, save_grid

__all__ = ["DistillConfig", "distill", "SFMObjective", "Objective"]


@dataclass
class DistillConfig:
    """Settings of one distillation run (all of them are recorded in checkpoints)."""

    method: str = "sfm"            # "sfm" or "lgm" (baseline, see fastsfm.baselines.lgm)
    ipc: int = 1                   # synthetic images per class
    steps: int = 5000
    lr: float = 2e-3
    resolution: int = 256          # stored synthetic resolution; the backbone sees random crops
    param: str = "pyramid"         # "pyramid" or "pixels"
    init: str = "noise"            # "noise" or "real"
    pyramid_start: int = 1
    pyramid_extent: int = 200      # steps between pyramid levels
    decorrelate: bool = True
    mode: str = "sample"           # SFM on every synthetic feature or on per-class means
    noise_std: float = 0.2         # augmentation noise (0 disables)
    chunk_size: int | None = None  # images per backward chunk (rounded to whole classes); None = all
    lgm_augs: int = 10             # LGM only: augmented copies of the synthetic set (real batch: ipc*augs*C)
    seed: int = 0
    checkpoint_every: int = 100

    def identity(self) -> dict[str, str]:
        """What must match for a checkpoint to be resumed (steps may grow)."""
        return {k: json.dumps(v) for k, v in asdict(self).items() if k not in ("steps", "checkpoint_every")}


class Objective(Protocol):
    def backward(self, images: Tensor, labels: Tensor) -> float:
        """Back-propagate the loss of rendered ``images`` (N, 3, R, R) into them; return its value."""


class SFMObjective:
    """SFM: one augmentation pass, backbone features, :class:`SFMLoss` against the real statistics.

    With ``chunk_size`` the batch is processed in chunks of whole classes, each backward
    accumulating into the rendered images' gradient; the result equals the unchunked step
    (per-image augmentation draws happen in the same order, the backbone is per-image) while
    peak memory is bounded by one chunk.
    """

    def __init__(self, backbone: Backbone, stats: ClassStats, augment: SinglePassAugment, ipc: int, mode: str = "sample",
                 chunk_size: int | None = None, backend: str = "auto"):
        self.backbone, self.augment, self.ipc, self.mode = backbone, augment, ipc, mode
        self.loss = SFMLoss(stats, reduction="sum", mode=mode, backend=backend, check_finite=False)
        self.loss.to(stats.means.device)
        self.chunk = None if chunk_size is None else max(ipc, chunk_size // ipc * ipc)

    def _sum(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.loss(self.backbone(self.augment(images)), labels)

    def backward(self, images: Tensor, labels: Tensor) -> float:
        rows = len(images) if self.mode == "sample" else len(torch.unique(labels))
        if self.chunk is None or self.chunk >= len(images):
            loss = self._sum(images, labels) / rows
            loss.backward()
            return loss.item()
        leaf = images.detach().requires_grad_()
        total = 0.0
        for start in range(0, len(images), self.chunk):
            part = self._sum(leaf[start:start + self.chunk], labels[start:start + self.chunk]) / rows
            part.backward()
            total += part.item()
        images.backward(leaf.grad)
        return total


def _restore_rng(rng: dict[str, Tensor]) -> None:
    torch.set_rng_state(rng["rng.cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def distill(backbone: Backbone, stats: ClassStats, config: DistillConfig, out_dir: str | Path, *,
            real_images: Tensor | None = None, objective: Objective | None = None, resume: bool = False,
            device: str | torch.device = "cpu", progress: bool = True) -> SyntheticSet:
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
    """
    stats.check_compatible(backbone)
    out = Path(out_dir)
    ckpt = out / "checkpoint.safetensors"
    identity = {**config.identity(), "stats_backbone": stats.meta.get("backbone", ""),
                "stats_dataset": stats.meta.get("dataset", "")}
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} exists: pass resume=True (--resume) to continue it, or choose another output")
    if resume and not ckpt.exists():
        raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist")
    state = load_checkpoint(ckpt, identity) if resume else None
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    synset = SyntheticSet(stats.num_classes, config.ipc, config.resolution, config.param, config.init, real_images,
                          config.pyramid_start, config.pyramid_extent, config.decorrelate, config.seed).to(device)
    stats = stats.to(device)
    backbone = backbone.to(device)
    if objective is None:
        augment = SinglePassAugment(backbone.input_size, noise_std=config.noise_std)
        objective = SFMObjective(backbone, stats, augment, config.ipc, config.mode, config.chunk_size)
    start = 0
    if state is not None:
        synset.load_levels(state["levels"])
        start = state["step"]
    opt = torch.optim.Adam(synset.parameters(), lr=config.lr)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        _restore_rng(state["rng"])
    meta = {"method": config.method, "backbone": backbone.identity, "dataset": stats.meta.get("dataset", ""),
            "class_names": json.dumps(stats.class_names), "config": json.dumps(asdict(config))}
    step = start
    bar = tqdm(range(start, config.steps), desc=f"distill ({config.method})", disable=not progress, unit="step",
               initial=start, total=config.steps)
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
    synset.save(out / "synset.safetensors", meta)
    with torch.no_grad():
        save_grid(synset.render().cpu(), synset.labels.cpu(), stats.class_names, out / "synset.png",
                  title=f"{config.method.upper()} IPC={config.ipc}, {backbone.name}")
    return synset
