"""Distillation objectives: one optimisation step of a synthetic set, at any IPC.

* :mod:`.step`: :class:`TwoPassStep`, the exact two-pass chunked step both objectives run, and
  :class:`DistillStep`, what the loop (:func:`fastsfm.distill.loop.distill`) calls;
* :mod:`.sfm`: :class:`SFMObjective`, statistical flow matching (the paper);
* :mod:`.lgm`: :class:`LGMObjective`, linear gradient matching (the baseline);
* :mod:`.graphed`: :class:`GraphedStep`, an SFM step replayed as a CUDA graph (``cuda_graph``);
* :func:`build_objective`: the one builder, from ``DistillConfig.method``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...config import DistillConfig
from ...models.backbones import Backbone
from ...models.ensemble import BackboneEnsemble
from ...stats import ClassStats
from .graphed import GraphedStep
from .lgm import LGMObjective
from .sfm import SFMObjective
from .step import DistillStep, TwoPassStep

__all__ = [
    "build_objective",
    "DistillStep",
    "TwoPassStep",
    "SFMObjective",
    "LGMObjective",
    "GraphedStep",
]


def build_objective(
    config: DistillConfig,
    backbone: Backbone | BackboneEnsemble,
    stats: ClassStats | Sequence[ClassStats],
    device: torch.device,
    *,
    real=None,
    group=None,
) -> DistillStep:
    """The objective of ``config.method``: SFM (against one backbone or an ensemble, one statistics
    per member), or LGM (one backbone; needs ``real``: a dataset of real images at the synthetic
    resolution; sharded over ranks like SFM under ``group``)."""
    if config.method == "sfm":
        sfm = SFMObjective(backbone, stats, config, device, group)
        return GraphedStep(sfm) if config.cuda_graph else sfm
    if isinstance(backbone, BackboneEnsemble):
        raise ValueError(
            "LGM distils with one backbone (it matches the gradient of one linear head on its features); "
            "give one --backbone, or use --method sfm for several"
        )
    stats = stats if isinstance(stats, ClassStats) else stats[0]
    if real is None:
        raise ValueError("LGM needs the real training images (--data): it samples a real batch every step")
    return LGMObjective(backbone, real, stats.num_classes, config, device, group)
