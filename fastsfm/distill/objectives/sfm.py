"""The SFM objective: class sums of the features (fused Triton kernels on CUDA), the flow cosine,
``G/n`` back to the rows (:mod:`fastsfm.loss.ops`), in the exact two-pass chunks of :class:`TwoPassStep`;
against one backbone or several at once (:mod:`fastsfm.models.ensemble`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from ...config import DistillConfig
from ...loss import ops
from ...loss.reference import divisor_for
from ...loss.torch_path import work_dtype
from ...models.backbones import Backbone
from ...models.ensemble import BackboneEnsemble, members_of
from ...stats import ClassStats
from ..synset import SyntheticSet
from .step import TwoPassStep

__all__ = ["SFMObjective"]


class SFMObjective(TwoPassStep):
    """The SFM step: class sums (fused Triton kernels on CUDA), the flow cosine, ``G/n`` broadcast.

    Against several backbones (a :class:`fastsfm.models.ensemble.BackboneEnsemble`, one statistics file per
    member, in order) the loss is the weighted mean of the members' flow losses
    (``config.loss_weights``: equal by default), each on its member's columns of the features of
    the same crops.  The sums buffer then holds the members' (C, W_k) buffers one after the other,
    so one all-reduce still moves every class sum.

    Args:
        backbone: the frozen distillation backbone, or an ensemble of them (its precision applies).
        stats: real statistics of ``backbone`` (the centres); a sequence of them for an ensemble.
        config: views, objective options, backbone weights, noise, chunk size, seed.
        device: where the backbone runs.
        group: a process group whose ranks hold disjoint classes of the set, or None.
    """

    def __init__(
        self,
        backbone: Backbone | BackboneEnsemble,
        stats: ClassStats | Sequence[ClassStats],
        config: DistillConfig,
        device: torch.device,
        group=None,
    ):
        super().__init__(backbone, config, device, group)
        stats = [stats] if isinstance(stats, ClassStats) else list(stats)
        members = members_of(backbone)
        if len(stats) != len(members):
            raise ValueError(f"{len(stats)} statistics for {len(members)} backbones: give one per backbone, in order")
        self.num_classes = stats[0].num_classes
        self.columns = getattr(backbone, "columns", [slice(0, backbone.feature_dim)])
        self.dims = [m.feature_dim for m in members]
        self.consts = [ops.flow_constants(s.means.to(self.device)) for s in stats]
        self.weights = config.loss_weights(len(members))
        self.upstreams = [self.upstream] if len(members) == 1 else [self.upstream * w for w in self.weights]
        self.objective, self.alpha = config.objective, config.alpha
        self.divisor = divisor_for(config.nontarget_divisor, self.num_classes)
        self.backend = "triton" if self.device.type == "cuda" else "torch"
        self._plans: dict[tuple[int, int], list[ops.LabelPlan]] = {}

    def rows(self, synset: SyntheticSet, start: int, stop: int) -> list[ops.LabelPlan]:
        """The chunk's label plans (class order and boundaries), one per member, built once per chunk."""
        if (start, stop) not in self._plans:
            labels = super().rows(synset, start, stop)
            plan = functools.partial(ops.label_plan, labels, self.num_classes, self.views == 1)
            by_dim = {d: plan(d if self.backend == "triton" else None) for d in dict.fromkeys(self.dims)}
            self._plans[(start, stop)] = [by_dim[d] for d in self.dims]
        return self._plans[(start, stop)]

    def _buffers(self, total: Tensor) -> list[Tensor]:
        """The members' (C, W_k) sums buffers within ``total`` (one after the other)."""
        views, at = [], 0
        for d in self.dims:
            size = self.num_classes * ops.sums_width(d)
            views.append(total.view(-1)[at : at + size].view(self.num_classes, -1))
            at += size
        return views

    def accumulate(self, feats: Tensor, plans: list[ops.LabelPlan], total: Tensor | None) -> Tensor:
        if len(self.dims) == 1:
            return ops.class_sums(feats, plans[0], self.num_classes, self.backend, out=total)
        if total is None:
            size = sum(self.num_classes * ops.sums_width(d) for d in self.dims)
            total = torch.zeros(size, device=feats.device, dtype=work_dtype(feats))
        for cols, plan, buf in zip(self.columns, plans, self._buffers(total), strict=True):
            ops.class_sums(feats[:, cols].contiguous(), plan, self.num_classes, self.backend, out=buf)
        return total

    def finish(self, total: Tensor) -> tuple[Tensor, list[Tensor | ops.TritonGrad]]:
        options = (self.objective, self.alpha, self.divisor, self.backend)
        parts = [ops.epilogue(buf, c, *options) for buf, c in zip(self._buffers(total), self.consts, strict=True)]
        losses = [part_loss for part_loss, _ in parts]
        loss = losses[0] if len(losses) == 1 else sum(w * part for w, part in zip(self.weights, losses, strict=True))
        return loss, [grad for _, grad in parts]

    def backward(self, feats: Tensor, plans: list[ops.LabelPlan], grads: list[Tensor | ops.TritonGrad]) -> None:
        rows = [
            ops.grad_rows(grad, plan, upstream, feats.dtype, self.backend)
            for grad, plan, upstream in zip(grads, plans, self.upstreams, strict=True)
        ]
        feats.backward(rows[0] if len(rows) == 1 else torch.cat(rows, dim=1))
