"""The exact two-pass step every distillation objective runs, and the protocol the loop calls.

:class:`fastsfm.distill.objectives.sfm.SFMObjective` (the paper's step: render the synthetic images,
augment them once -- ``views`` times with ``views > 1`` --, encode them with the frozen backbone,
match the flows of their class means to the real ones) and its peer
:class:`fastsfm.distill.objectives.lgm.LGMObjective` (the LGM baseline) are :class:`TwoPassStep`
subclasses; :func:`fastsfm.distill.objectives.build_objective` picks one from the config.

**Exact chunked steps.**  Both losses depend on the synthetic features only through a sum of
per-row contributions (SFM: the (C, D) class sums; LGM: the linear head's cross-entropy
gradient, a sum over rows), so a set too large for one forward+backward is processed in two
passes of chunks:

1. every chunk is rendered, augmented and encoded *without* an autograd graph and only its
   contribution is accumulated; the loss and ``G``, its gradient with respect to the
   accumulated statistic, follow (an all-reduce first under ``torch.distributed``);
2. every chunk is rendered and augmented again with the *same* draws (they are functions of
   (seed, step, view, image), :mod:`fastsfm.rng`), encoded with a graph, ``G`` is
   back-propagated into its images through the chunk's contribution, and the chunk's
   parameters are stepped (:class:`fastsfm.distill.optim.ChunkAdam`).

The gradient is the unchunked one; peak memory is one chunk's.  When one chunk holds the
whole set, pass 1 keeps its graph and pass 2 only back-propagates (no recomputation).

**Chunk size** (``chunk_size=None``): from the run's plan (:meth:`TwoPassStep.plan`,
:mod:`fastsfm.distill.plan`): two probe forward+backward passes measure the memory per image and the
fixed cost, and the largest chunk that fits beside the *final* pyramid's state is taken once,
before step 1, for the whole run.  A set that fits runs as one chunk; without a plan (a step built
outside :func:`fastsfm.distill.loop.distill`) the set is one chunk.

**Host synchronisation.**  A step queues its work and returns the loss as a device tensor:
keys, label plans, image ids and constants are built once on the device, so on CUDA nothing in
render/augment/encode/loss/backward/optimiser waits for the GPU (tested under
``torch.cuda.set_sync_debug_mode("error")``).  The loop reads the loss back (the one
synchronisation of a step) before it counts the step done.

**Precision.**  The backbone runs under the config's autocast (:mod:`fastsfm.models.precision`); in a
bf16 step every other float32 matrix product (the render, the crop, LGM's head) runs in TF32,
forward and backward (:func:`fastsfm.models.precision.tf32_matmuls`).

Profiler ranges (``fastsfm.render``, ``.augment``, ``.backbone``, ``.loss``, ``.backward``,
``.optimizer``) let ``benches/bench_distill.py --profile`` say where a step's time goes.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from ... import rng
from ...config import DistillConfig
from ...data.augment import BatchAugment
from ...models.backbones import Backbone
from ...models.precision import loss_scale, tf32_matmuls
from ..optim import ChunkAdam
from ..plan import Machine, Plan, plan_run, probe_cost
from ..streams import ChunkStreams
from ..synset import SyntheticSet

__all__ = ["DistillStep", "TwoPassStep"]


class DistillStep(Protocol):
    """What :func:`fastsfm.distill.loop.distill` runs each step."""

    def step(self, synset: SyntheticSet, optim: ChunkAdam, step: int | Tensor) -> Tensor:
        """Queue step ``step`` of ``synset`` (every chunk stepped by ``optim``); return the loss, a 0-dim
        tensor not yet read back (the loop reads it, then calls ``optim.finish_step()``).  ``step`` may be
        a 0-dim int64 device tensor (a CUDA graph's step number): the same draws as from the int."""


class TwoPassStep:
    """The exact two-pass chunked step shared by SFM and LGM (module docstring).

    Subclasses say what a chunk contributes and how the loss and its gradient follow:
    :meth:`begin` (per-step preparation), :meth:`accumulate` (pass 1, no graph),
    :meth:`finish` (the loss and ``G``), :meth:`backward` (pass 2, back-propagate ``G``).
    """

    def __init__(self, backbone: Backbone, config: DistillConfig, device: torch.device, group=None):
        self.backbone, self.device, self.group = backbone, torch.device(device), group
        self.augment = BatchAugment(backbone.input_size, noise_std=config.noise_std, noise_mean=config.noise_mean)
        self.views, self.seed, self.chunk_size = config.effective_views, config.seed, config.chunk_size
        self.config = config
        self._chunk_streams: ChunkStreams | None = None  # an offloaded set's copy streams, made at its first step
        self.dtype = backbone.autocast_dtype()
        self.scale = loss_scale(self.dtype)
        self.upstream = torch.full((1,), self.scale, device=self.device)

    def features(
        self,
        synset: SyntheticSet,
        start: int,
        stop: int,
        step: int | Tensor,
        grad: bool,
        params: list[Tensor] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Features (views * n, D) of images ``start:stop`` (view-major) and their level tensors on the
        device (``params``: already there, e.g. uploaded by :class:`fastsfm.distill.streams.ChunkStreams`)."""
        if params is None:
            with record_function("fastsfm.render"):
                params = synset.chunk(start, stop, self.device, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            with record_function("fastsfm.render"):
                images = synset.render_levels(params)
                if self.views > 1:  # one view (the paper's SFM) needs no copy
                    images = images.repeat(self.views, 1, 1, 1)
            with record_function("fastsfm.augment"):
                ids = synset.on_device("image_ids", self.device)[start:stop]
                crops = self.augment(images, rng.augment_keys(self.seed, step, self.views, ids))
            with record_function("fastsfm.backbone"):
                return self.backbone(crops), params

    def rows(self, synset: SyntheticSet, start: int, stop: int) -> object:
        """What :meth:`accumulate` and :meth:`backward` know of a chunk's feature rows: their labels
        (views * n,), view-major, on the device."""
        return synset.on_device("labels", self.device)[start:stop].repeat(self.views)

    def plan(self, synset: SyntheticSet, num_classes: int, machine: Machine | None = None) -> Plan:
        """The run's :class:`fastsfm.distill.plan.Plan` for ``num_classes`` classes on ``machine``
        (default: this one, with this step's ranks), from probes of ``synset``; a feasible plan sets the
        chunk size unless the config fixed it."""
        if machine is None:
            ranks = dist.get_world_size(self.group) if self.group is not None else 1
            machine = Machine.detect(self.device, ranks)
        cost = probe_cost(self, synset)
        if machine.device != self.device.type:  # e.g. `fastsfm distill --plan --device-gib 80` on a CPU
            cost = dataclasses.replace(cost, how=f"{cost.how}, an estimate for {machine.device}")
        plan = plan_run(self.config, num_classes, cost, machine)
        if plan.feasible and self.config.chunk_size is None:
            self.chunk_size = plan.chunk
        return plan

    def chunks(self, synset: SyntheticSet) -> list[tuple[int, int]]:
        n = synset.num_images
        size = self.chunk_size or n
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def begin(self, synset: SyntheticSet, step: int | Tensor) -> None:
        """Per-step preparation before pass 1 (nothing by default)."""

    def accumulate(self, feats: Tensor, rows: object, total: Tensor | None) -> Tensor:
        """``total`` plus the contribution of a chunk's features (no graph); a new tensor when ``total`` is None."""
        raise NotImplementedError

    def finish(self, total: Tensor) -> tuple[Tensor, object]:
        """``(loss (0-dim), G)`` from the statistic accumulated over every chunk (and rank)."""
        raise NotImplementedError

    def backward(self, feats: Tensor, rows: object, grad: object) -> None:
        """Back-propagate ``G`` (times :attr:`scale`) into a chunk's images through its features."""
        raise NotImplementedError

    def step(self, synset: SyntheticSet, optim: ChunkAdam, step: int | Tensor) -> Tensor:
        with tf32_matmuls(self.dtype):  # render, crop (and LGM's head): TF32 in a bf16 step
            return self._two_passes(synset, optim, step)

    def _two_passes(self, synset: SyntheticSet, optim: ChunkAdam, step: int | Tensor) -> Tensor:
        bounds = self.chunks(synset)
        single = len(bounds) == 1
        streams = self._streams(synset)
        items = [(1, b) for b in bounds] + ([] if single else [(2, b) for b in bounds])
        chunks = self._chunk_inputs(synset, optim, items, streams, grad=single)
        self.begin(synset, step)
        total, kept = None, None
        for start, stop in bounds:  # pass 1: the accumulated statistic
            levels, _ = next(chunks)
            feats, params = self.features(synset, start, stop, step, grad=single, params=levels)
            with record_function("fastsfm.loss"):
                total = self.accumulate(feats.detach(), self.rows(synset, start, stop), total)
            kept = (feats, params) if single else None
        with record_function("fastsfm.loss"):
            if self.group is not None:
                dist.all_reduce(total, group=self.group)
            loss, grad = self.finish(total)
        for start, stop in bounds:  # pass 2: gradients, chunk by chunk
            levels, moments = (kept[1], None) if single else next(chunks)
            feats, params = kept if single else self.features(synset, start, stop, step, grad=True, params=levels)
            with record_function("fastsfm.backward"):
                self.backward(feats, self.rows(synset, start, stop), grad)
            with record_function("fastsfm.optimizer"):
                optim.step_chunk(start, stop, params, 1.0 / self.scale, moments, streams)
        if streams is not None:
            streams.finish()
        return loss

    def _streams(self, synset: SyntheticSet) -> ChunkStreams | None:
        """The upload/download streams of an offloaded set (made once), None for a resident one."""
        if not synset.offload:
            return None
        if self._chunk_streams is None:
            self._chunk_streams = ChunkStreams(self.device)
        return self._chunk_streams

    def _chunk_inputs(self, synset: SyntheticSet, optim: ChunkAdam, items: list, streams: ChunkStreams | None, grad):
        """For each ``(pass, (start, stop))`` of ``items`` in order: the chunk's levels on the device (leaves;
        with gradients in pass 2 or when ``grad``) and, in pass 2, its moments' stored rows there.  Resident
        sets: views, moments None (fetched by the optimiser).  Offloaded: the next item's upload is issued
        on ``streams`` before this one is handed out, so it overlaps this chunk's compute."""
        if streams is None:
            for p, (start, stop) in items:
                yield synset.chunk(start, stop, self.device, requires_grad=grad or p == 2), None
            return
        count = len(synset.levels)

        def issue(k: int):
            p, (start, stop) = items[k]
            host = [level[start:stop] for level in synset.levels] + (optim.stored_rows(start, stop) if p == 2 else [])
            return streams.upload(host, (p, start))

        pending = issue(0)
        for k, (p, (start, _)) in enumerate(items):
            tensors, ticket = pending
            if k + 1 < len(items):
                pending = issue(k + 1)
            tensors = streams.take(tensors, ticket, (p, start))
            yield [t.requires_grad_(grad or p == 2) for t in tensors[:count]], (tensors[count:] or None)
