"""Distillation objectives: one optimisation step of a synthetic set, at any IPC.

:class:`SFMObjective` is the paper's step: render the synthetic images, augment them once
(``views`` times with ``views > 1``), encode them with the frozen backbone, and match the
flows of their class means to the real ones (:mod:`fastsfm.ops`).  Its peer,
:class:`fastsfm.baselines.lgm.LGMObjective`, is the LGM baseline; :func:`build_objective`
picks one from the config, so ``method`` alone decides.

**Exact chunked steps.**  The loss depends on the images only through the (C, D) class sums,
so a set too large for one forward+backward is processed in two passes of chunks:

1. every chunk is rendered, augmented and encoded *without* an autograd graph and only its
   class sums are accumulated; the loss and ``G = dL/dt`` follow from the sums (an
   all-reduce first under ``torch.distributed``: C*D + C numbers);
2. every chunk is rendered and augmented again with the *same* draws (they are functions
   of (seed, step, view, image), :mod:`fastsfm.augment`), encoded with a graph, and
   ``G[y]/n[y]`` is back-propagated into its images, whose parameters are then stepped
   (:class:`fastsfm.optim.ChunkAdam`).

The gradient is the unchunked one; peak memory is one chunk's.  When one chunk holds the
whole set, pass 1 keeps its graph and pass 2 only back-propagates (no recomputation).  The
chunk size is measured on the first step on CUDA (peak memory of a 4-image probe, 80 % of
the free memory) unless given; on CPU the set is one chunk.

Profiler ranges (``fastsfm.render``, ``.augment``, ``.backbone``, ``.loss``, ``.backward``,
``.optimizer``) let ``benches/bench_distill.py --profile`` say where a step's time goes.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from . import ops, rng
from .augment import BatchAugment
from .backbones import Backbone
from .config import DistillConfig
from .optim import ChunkAdam
from .precision import loss_scale
from .stats import ClassStats
from .synset import SyntheticSet

__all__ = ["Objective", "SFMObjective", "build_objective", "augment_keys", "SYNTHETIC_STREAM", "REAL_STREAM"]

SYNTHETIC_STREAM, REAL_STREAM, HEAD_STREAM = 0, 1, 2
_PROBE_IMAGES = 4


class Objective(Protocol):
    def step(self, synset: SyntheticSet, optim: ChunkAdam, step: int) -> float:
        """Compute the loss of ``synset`` at ``step``, step ``optim`` (every chunk); return the loss."""


def augment_keys(seed: int, step: int, views: int, image_ids: Tensor) -> Tensor:
    """(views * n,) augmentation keys of images ``image_ids`` (global indices) at ``step``, view-major."""
    view = torch.arange(views, device=image_ids.device)[:, None]
    return rng.derive(seed, SYNTHETIC_STREAM, step, view, image_ids[None, :]).flatten()


class SFMObjective:
    """The SFM step (module docstring): views, exact two-pass chunks, offload, process groups.

    Args:
        backbone: the frozen distillation backbone (its precision applies).
        stats: real statistics of ``backbone`` (the centres).
        config: views, objective options, noise, chunk size, seed.
        device: where the backbone runs.
        group: a process group whose ranks hold disjoint classes of the set, or None.
    """

    def __init__(self, backbone: Backbone, stats: ClassStats, config: DistillConfig, device: torch.device, group=None):
        self.backbone, self.device, self.group = backbone, torch.device(device), group
        self.augment = BatchAugment(backbone.input_size, noise_std=config.noise_std, noise_mean=config.noise_mean)
        self.views, self.seed, self.chunk_size = config.views, config.seed, config.chunk_size
        self.num_classes = stats.num_classes
        self.consts = ops.flow_constants(stats.means.to(self.device))
        self.objective, self.alpha = config.objective, config.alpha
        self.divisor = float(config.nontarget_divisor or self.num_classes - 1)
        self.backend = "triton" if self.device.type == "cuda" else "torch"
        self.scale = loss_scale(backbone.autocast_dtype())
        self._plans: dict[tuple[int, int], ops.LabelPlan] = {}

    def features(
        self, synset: SyntheticSet, start: int, stop: int, step: int, grad: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """Features (views * n, D) of images ``start:stop`` and their level tensors on the device."""
        with record_function("fastsfm.render"):
            params = synset.chunk(start, stop, self.device, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            with record_function("fastsfm.render"):
                images = synset.render_levels(params).repeat(self.views, 1, 1, 1)
            with record_function("fastsfm.augment"):
                keys = augment_keys(self.seed, step, self.views, synset.image_ids[start:stop].to(self.device))
                crops = self.augment(images, keys)
            with record_function("fastsfm.backbone"):
                return self.backbone(crops), params

    def _plan(self, synset: SyntheticSet, start: int, stop: int) -> ops.LabelPlan:
        if (start, stop) not in self._plans:
            labels = synset.labels[start:stop].repeat(self.views).to(self.device)
            self._plans[(start, stop)] = ops.label_plan(labels, self.num_classes, contiguous=self.views == 1)
        return self._plans[(start, stop)]

    def measure_chunk(self, synset: SyntheticSet) -> int:
        """Images per chunk that fit 80 % of the free CUDA memory, from a probe's peak memory.

        The probe's draws are keyed like any step's, so no random stream is consumed.
        """
        probe = min(synset.num_images, _PROBE_IMAGES)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        feats, params = self.features(synset, 0, probe, 0, grad=True)
        feats.sum().backward()
        per_image = (torch.cuda.max_memory_allocated(self.device) - base) / probe
        del feats, params
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return max(1, int(0.8 * free / max(per_image, 1.0)))

    def chunks(self, synset: SyntheticSet) -> list[tuple[int, int]]:
        if self.chunk_size is None:
            self.chunk_size = self.measure_chunk(synset) if self.device.type == "cuda" else synset.num_images
        n = synset.num_images
        return [(a, min(a + self.chunk_size, n)) for a in range(0, n, self.chunk_size)]

    def step(self, synset: SyntheticSet, optim: ChunkAdam, step: int) -> float:
        bounds = self.chunks(synset)
        single = len(bounds) == 1
        sums, kept = None, None
        for start, stop in bounds:  # pass 1: class sums
            feats, params = self.features(synset, start, stop, step, grad=single)
            with record_function("fastsfm.loss"):
                sums = ops.class_sums(
                    feats.detach(), self._plan(synset, start, stop), self.num_classes, self.backend, out=sums
                )
            kept = (feats, params) if single else None
        with record_function("fastsfm.loss"):
            if self.group is not None:
                dist.all_reduce(sums, group=self.group)
            loss, gn = ops.epilogue(sums, self.consts, self.objective, self.alpha, self.divisor, self.backend)
        upstream = torch.tensor(self.scale, device=self.device)
        for start, stop in bounds:  # pass 2: gradients, chunk by chunk
            feats, params = kept if single else self.features(synset, start, stop, step, grad=True)
            plan = self._plan(synset, start, stop)
            with record_function("fastsfm.backward"):
                feats.backward(ops.grad_rows(gn, plan.labels, upstream, feats.dtype, self.backend))
            with record_function("fastsfm.optimizer"):
                optim.step_chunk(start, stop, params, grad_scale=1.0 / self.scale)
        with record_function("fastsfm.optimizer"):
            optim.finish_step()
        return loss.item()


def build_objective(
    config: DistillConfig, backbone: Backbone, stats: ClassStats, device: torch.device, *, real=None, group=None
) -> Objective:
    """The objective of ``config.method``: SFM, or LGM (needs ``real``: a dataset of real images
    at the synthetic resolution; single process only)."""
    if config.method == "sfm":
        return SFMObjective(backbone, stats, config, device, group)
    if group is not None:
        raise ValueError("LGM runs in a single process (its loss matches one global gradient); drop torchrun")
    if real is None:
        raise ValueError("LGM needs the real training images (--data): it samples a real batch every step")
    from .baselines.lgm import LGMObjective

    return LGMObjective(backbone, real, stats.num_classes, config, device)
