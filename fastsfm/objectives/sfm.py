"""The SFM objective: class sums of the features (fused Triton kernels on CUDA), the flow cosine,
``G/n`` back to the rows (:mod:`fastsfm.ops`), in the exact two-pass chunks of :class:`TwoPassStep`."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..backbones import Backbone
from ..config import DistillConfig
from ..reference import divisor_for
from ..stats import ClassStats
from ..synset import SyntheticSet
from .step import TwoPassStep

__all__ = ["SFMObjective"]


class SFMObjective(TwoPassStep):
    """The SFM step: class sums (fused Triton kernels on CUDA), the flow cosine, ``G/n`` broadcast.

    Args:
        backbone: the frozen distillation backbone (its precision applies).
        stats: real statistics of ``backbone`` (the centres).
        config: views, objective options, noise, chunk size, seed.
        device: where the backbone runs.
        group: a process group whose ranks hold disjoint classes of the set, or None.
    """

    def __init__(self, backbone: Backbone, stats: ClassStats, config: DistillConfig, device: torch.device, group=None):
        super().__init__(backbone, config, device, group)
        self.num_classes = stats.num_classes
        self.consts = ops.flow_constants(stats.means.to(self.device))
        self.objective, self.alpha = config.objective, config.alpha
        self.divisor = divisor_for(config.nontarget_divisor, self.num_classes)
        self.backend = "triton" if self.device.type == "cuda" else "torch"
        self._plans: dict[tuple[int, int], ops.LabelPlan] = {}

    def rows(self, synset: SyntheticSet, start: int, stop: int) -> ops.LabelPlan:
        """The chunk's label plan (class order and boundaries), built once per chunk."""
        if (start, stop) not in self._plans:
            labels = super().rows(synset, start, stop)
            dim = self.backbone.feature_dim if self.backend == "triton" else None
            self._plans[(start, stop)] = ops.label_plan(labels, self.num_classes, self.views == 1, dim)
        return self._plans[(start, stop)]

    def accumulate(self, feats: Tensor, plan: ops.LabelPlan, total: Tensor | None) -> Tensor:
        return ops.class_sums(feats, plan, self.num_classes, self.backend, out=total)

    def finish(self, total: Tensor) -> tuple[Tensor, Tensor | ops.TritonGrad]:
        return ops.epilogue(total, self.consts, self.objective, self.alpha, self.divisor, self.backend)

    def backward(self, feats: Tensor, plan: ops.LabelPlan, grad: Tensor | ops.TritonGrad) -> None:
        feats.backward(ops.grad_rows(grad, plan, self.upstream, feats.dtype, self.backend))
