"""Classifier inheritance and knowledge distillation from the distillation backbone's real classifier.

The authors' ``distillation/eval_syn.py`` (``einsteinxia/SFM``; ``eval_mode`` CI and KD):

* **inheritance**: the distillation backbone's linear classifier ``(W, b)``, trained on the
  full real train set (stored in :class:`fastsfm.ClassStats`), stays frozen.  A projector
  ``Linear(D_eval -> D_distill)`` (with bias, PyTorch's default initialisation) is trained by
  **MSE between the projected evaluation-backbone features and the distillation backbone's
  features** of the same augmented synthetic images; inference is ``W P(f_eval(x)) + b``.
  This is what lets a set distilled with one backbone serve another.
* **KD**: a fresh head on evaluation features, trained with ``w * T^2 * KL`` to the soft
  labels ``softmax(W f_distill(x) + b / T)`` plus ``(1 - w) * CE`` (T = 4, w = 0.5).
* ``inherit_ce`` (fastsfm's earlier variant, kept because it measured better on the demo):
  the projector starts at the identity (same backbone only) and is trained with
  cross-entropy through the frozen classifier, so the real classifier is its starting point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InheritedClassifier", "kd_loss"]


class InheritedClassifier(nn.Module):
    """``eval features (B, D_eval) -> logits (B, C)`` = frozen real classifier on projected features.

    Args:
        weight, bias: the distillation backbone's real-data classifier, (C, D_distill) and (C,).
        eval_dim: D_eval, the evaluation backbone's feature dimension.
        seed: seeds the projector's default initialisation.
        identity: start the projector at the identity (``inherit_ce``; needs D_eval = D_distill).
    """

    def __init__(self, weight: Tensor, bias: Tensor, eval_dim: int, seed: int = 0, identity: bool = False):
        super().__init__()
        if identity and eval_dim != weight.shape[1]:
            raise ValueError(f"an identity projector needs D_eval = D_distill, got {eval_dim} and {weight.shape[1]}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.projector = nn.Linear(eval_dim, weight.shape[1])
        if identity:
            with torch.no_grad():
                self.projector.weight.copy_(torch.eye(eval_dim))
                self.projector.bias.zero_()
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", bias.detach().clone().float())

    def project(self, features: Tensor) -> Tensor:
        """Evaluation features -> the distillation backbone's feature space."""
        return self.projector(features)

    def forward(self, features: Tensor) -> Tensor:
        return self.project(features) @ self.weight.T + self.bias

    def regression_loss(self, eval_features: Tensor, distill_features: Tensor) -> Tensor:
        """The projector's training loss: MSE to the distillation backbone's features."""
        return F.mse_loss(self.project(eval_features), distill_features)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 4.0, weight: float = 0.5
) -> Tensor:
    """``weight * T^2 * KL(teacher || student at T) + (1 - weight) * CE(student, labels)`` (the authors' KD)."""
    soft = F.softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), soft, reduction="batchmean")
    return weight * kl * temperature**2 + (1.0 - weight) * F.cross_entropy(student_logits, labels)
