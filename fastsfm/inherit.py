"""Classifier inheritance: reuse the real-data classifier, train only a linear projector.

At evaluation the classifier ``(W, b)`` fitted on real features (stored in
:class:`fastsfm.ClassStats`) stays frozen; a projector ``P`` (D x D, initialised at the
identity, or a diagonal D-vector with ``diagonal=True``) is trained on the synthetic set's
augmented features with cross-entropy, and inference is ``W (P f(x)) + b``.  Storage beyond
the synthetic images is D^2 (or D) numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .stats import ClassStats

__all__ = ["InheritedClassifier"]


class InheritedClassifier(nn.Module):
    """``features (B, D) -> logits (B, C)`` = frozen real classifier on projected features."""

    def __init__(self, stats: ClassStats, diagonal: bool = False):
        super().__init__()
        d = stats.feature_dim
        self.diagonal = diagonal
        self.projector = nn.Parameter(torch.ones(d) if diagonal else torch.eye(d))
        self.register_buffer("weight", stats.classifier_weight.detach().clone().float())
        self.register_buffer("bias", stats.classifier_bias.detach().clone().float())

    def project(self, features: Tensor) -> Tensor:
        return features * self.projector if self.diagonal else features @ self.projector.T

    def forward(self, features: Tensor) -> Tensor:
        return self.project(features) @ self.weight.T + self.bias
