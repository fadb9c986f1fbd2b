"""The SFM step replayed as a CUDA graph: the host's launch overhead out of the step.

A step launches about 800 kernels (1,450 aten calls); at the ~50 us per operation measured on the
H200's host that is ~70 ms of Python and launches per step -- hidden behind the GPU at C = 1000,
the whole step at C = 100.  :class:`GraphedStep` captures one step of the wrapped objective in a
``torch.cuda.CUDAGraph`` and replays it: one launch per step.

**What a replay depends on** lives on the device, so the one graph serves every step: the step
number is a device tensor (the augmentation keys are functions of it, :mod:`fastsfm.rng`, the
same bits as from the int), Adam's step count is a device tensor incremented in place
(:class:`fastsfm.distill.optim.ChunkAdam`), and the label plans, flow constants and image ids are made
before the capture.  A graph holds one shape of work, so it is keyed by the pyramid's level count
and the chunk bounds and captured again when they change (a pyramid growth).  Each key first runs
``warmup`` eager steps on a side stream (CUDA graphs need cuBLAS, Triton and the allocator warmed
up; these are real steps of the run), then captures a step and replays it (a capture records the
work, it does not run it).  The side stream is made once per graph (a new stream per warm-up step
would warm up, and keep per-stream kernel state for, a stream the capture never uses).  The loss
is the graph's static output, read back once per step by the loop as in an eager step.

A replay applies the step's Adam updates without the optimiser's Python running, so the optimiser
is marked in-step before each replay: a Ctrl-C that lands while the replay runs then writes no
checkpoint of step ``done`` holding step ``done + 1``'s images (the loop's rule, as for an eager
step interrupted between chunks).

Eager instead (the wrapper runs the wrapped step as it is): on a CPU, for offloaded sets (their
chunks travel through page-locked buffers the host picks) and with fp16's skipped-chunk counter.
LGM is never wrapped (its real batch is loaded on the host).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..optim import ChunkAdam
from ..synset import SyntheticSet
from .step import TwoPassStep

__all__ = ["GraphedStep", "WARMUP_STEPS"]

log = logging.getLogger(__name__)

WARMUP_STEPS = 2
"""Eager steps on a side stream before each capture."""


class GraphedStep:
    """A :class:`fastsfm.distill.objectives.DistillStep` that replays ``inner``'s step as a CUDA graph
    (module docstring).

    ``captures`` counts the graphs captured so far (one per pyramid level count and chunking)."""

    def __init__(self, inner: TwoPassStep, warmup: int = WARMUP_STEPS):
        self.inner, self.warmup = inner, warmup
        self.backbone = inner.backbone
        self.captures = 0
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._loss: Tensor | None = None
        self._warm = 0
        self._number: Tensor | None = None  # the step number on the device
        self._side: torch.cuda.Stream | None = None  # the warm-up and capture stream of the current graph
        self._eager_reason: str | None = None

    def release(self) -> None:
        """Drop the captured graph, its static loss and its side stream: the graph's private memory
        pool goes back to the caching allocator once nothing else holds it (a benchmark frees it
        before its next section; a run keeps its graph).  The next step warms up and captures again."""
        self._key = self._graph = self._loss = self._side = None
        self._warm = 0

    def plan(self, synset: SyntheticSet, num_classes: int, machine=None):
        """The wrapped step's plan (:meth:`TwoPassStep.plan`)."""
        return self.inner.plan(synset, num_classes, machine)

    def _graphable(self, synset: SyntheticSet, optim: ChunkAdam) -> bool:
        reason = None
        if self.inner.device.type != "cuda":
            reason = "CUDA graphs need a CUDA device"
        elif synset.offload:
            reason = "an offloaded set's chunks travel through host buffers"
        elif optim.check_finite:
            reason = "fp16's skipped-chunk counter accumulates on the host's side"
        if reason and reason != self._eager_reason:
            log.info("cuda_graph: running the step eagerly (%s)", reason)
        self._eager_reason = reason
        return reason is None

    def step(self, synset: SyntheticSet, optim: ChunkAdam, step: int) -> Tensor:
        if not self._graphable(synset, optim):
            return self.inner.step(synset, optim, step)
        device = self.inner.device
        if self._number is None:
            self._number = torch.zeros((), dtype=torch.int64, device=device)
        self._number.fill_(step)
        key = (len(synset.levels), tuple(self.inner.chunks(synset)))
        if key != self._key:  # a new shape of work: warm up, then capture again
            self._key, self._graph, self._loss, self._warm = key, None, None, 0
            self._side = torch.cuda.Stream(device)
        if self._graph is None and self._warm < self.warmup:
            self._warm += 1
            side = self._side
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                loss = self.inner.step(synset, optim, self._number)
            torch.cuda.current_stream(device).wait_stream(side)
            return loss
        if self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=self._side):
                self._loss = self.inner.step(synset, optim, self._number)
            self.captures += 1
        optim.in_step = True  # the replay steps Adam without step_chunk; the loop's finish_step clears it
        self._graph.replay()
        return self._loss
