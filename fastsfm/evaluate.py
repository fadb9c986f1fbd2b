"""Evaluation of a small training set (synthetic or real baseline) on the real test split.

Two numbers per set and seed: a fresh linear probe trained on the set, and classifier
inheritance (the real-data classifier with a projector trained on the set).  Both train on
re-augmented images every batch (flip + random-resized crop, no noise), as LGM evaluates.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from .augment import BatchAugment
from .backbones import Backbone
from .inherit import InheritedClassifier
from .probe import accuracy, new_head, train_head_on_images
from .stats import ClassStats

__all__ = ["evaluate_images", "Score", "summarise"]


@dataclass
class Score:
    method: str
    seed: int
    probe: float
    inherit: float | None


def evaluate_images(
    backbone: Backbone,
    images: Tensor,
    labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    stats: ClassStats | None,
    epochs: int,
    seed: int,
    method: str,
    device: str | torch.device = "cpu",
    probe_lr: float | None = None,
) -> Score:
    """Accuracy (%) of a probe and, if ``stats`` is given, of classifier inheritance.

    ``stats`` must come from ``backbone`` for inheritance (its classifier lives in that
    feature space); pass None when the probe backbone differs from the distillation one.
    """
    augment = BatchAugment(backbone.input_size, noise_std=0.0)
    c = int(labels.max()) + 1 if stats is None else stats.num_classes
    head = train_head_on_images(
        backbone, images, labels, new_head(backbone.feature_dim, c, seed), augment, epochs, device, seed, lr=probe_lr
    )
    inherit = None
    if stats is not None:
        stats.check_compatible(backbone)
        # The projector starts at the identity, i.e. at the real-data classifier: it keeps LGM's
        # small learning rate so that a handful of images refines rather than overwrites it.
        model = train_head_on_images(
            backbone, images, labels, InheritedClassifier(stats), augment, epochs, device, seed
        )
        inherit = accuracy(model, test_features, test_labels)
    return Score(method, seed, accuracy(head, test_features, test_labels), inherit)


def summarise(scores: list[Score]) -> list[dict]:
    """Mean and std over seeds per method, in first-seen order."""
    rows = []
    for method in dict.fromkeys(s.method for s in scores):
        group = [s for s in scores if s.method == method]
        row = {"method": method, "seeds": len(group)}
        for key in ("probe", "inherit"):
            vals = [getattr(s, key) for s in group if getattr(s, key) is not None]
            if vals:
                row[f"{key} mean"] = statistics.fmean(vals)
                row[f"{key} std"] = statistics.pstdev(vals)
        rows.append(row)
    return rows
