"""Linear gradient matching (LGM, arXiv 2511.16674) as an objective of the shared loop.

Per step (``shared/references/lgm.md``): a fresh random linear classifier ``W ~ N(0, 0.01^2)``,
``b = 0``; a real batch of ``ipc * augs * C`` images drawn uniformly (not class-balanced),
each augmented once; ``augs`` independently augmented copies of the synthetic set; the
cross-entropy gradients of ``(W, b)`` on both sides, flattened into one vector each; loss
``1 - cos(g_real, g_syn)``, back-propagated through the synthetic gradient (bi-level).

The gradient of mean cross-entropy for a linear head is closed-form,
``dW = (softmax(z) - onehot)^T f / B`` and ``db = mean(softmax(z) - onehot)``, so the
synthetic side needs no double backward through autograd; :func:`linear_ce_grad` is tested
against ``torch.autograd.grad(create_graph=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..augment import SinglePassAugment
from ..backbones import Backbone
from ..data import labels_of, stack_images

__all__ = ["linear_ce_grad", "lgm_loss", "LGMObjective"]


def linear_ce_grad(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Flattened ``[dW, db]`` of mean cross-entropy of ``features @ W^T + b``: (C*D + C,)."""
    probs = torch.softmax(features @ weight.T + bias, dim=1)
    delta = (probs - F.one_hot(labels, weight.shape[0]).to(probs.dtype)) / features.shape[0]
    return torch.cat([(delta.T @ features).flatten(), delta.sum(0)])


def lgm_loss(
    real_features: Tensor, real_labels: Tensor, syn_features: Tensor, syn_labels: Tensor, weight: Tensor, bias: Tensor
) -> Tensor:
    """``1 - cos(g_real, g_syn)`` over the concatenated head gradients (real side detached)."""
    g_real = linear_ce_grad(real_features.detach(), real_labels, weight, bias).detach()
    g_syn = linear_ce_grad(syn_features, syn_labels, weight, bias)
    return 1.0 - F.cosine_similarity(g_real, g_syn, dim=0)


class LGMObjective:
    """LGM for :func:`fastsfm.distill.distill` (``DistillConfig.method = "lgm"``)."""

    def __init__(
        self,
        backbone: Backbone,
        real: Dataset,
        num_classes: int,
        augment: SinglePassAugment,
        ipc: int,
        augs: int,
        device: str | torch.device = "cpu",
    ):
        self.backbone, self.real, self.num_classes, self.augment = backbone, real, num_classes, augment
        self.ipc, self.augs, self.device = ipc, augs, device
        self.labels = labels_of(real)

    @classmethod
    def from_dataset(cls, backbone: Backbone, real: Dataset, num_classes: int, config, device="cpu") -> LGMObjective:
        augment = SinglePassAugment(backbone.input_size, noise_std=config.noise_std)
        return cls(backbone, real, num_classes, augment, config.ipc, config.lgm_augs, device)

    def _real_batch(self) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.real), (self.ipc * self.augs * self.num_classes,))
        return stack_images(self.real, idx).to(self.device), self.labels[idx].to(self.device)

    def backward(self, images: Tensor, labels: Tensor) -> float:
        d = self.backbone.feature_dim
        weight = torch.randn(self.num_classes, d, device=images.device) * 0.01
        bias = torch.zeros(self.num_classes, device=images.device)
        real_x, real_y = self._real_batch()
        with torch.no_grad():
            real_f = self.backbone(self.augment(real_x)).float()
        syn = images.repeat(self.augs, 1, 1, 1)
        syn_f = self.backbone(self.augment(syn)).float()
        loss = lgm_loss(real_f, real_y, syn_f, labels.repeat(self.augs), weight, bias)
        loss.backward()
        return loss.item()
