"""The linear classifier of a frozen backbone: the authors' head initialisation and its fit on cached features.

Shared by the statistics pass (the real-data classifier that classifier inheritance reuses) and
the evaluation heads (:mod:`fastsfm.evaluate.evaluator.probe`), hence here, below both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ClassifierConfig
from ..progress import track

__all__ = ["new_head", "fit_linear_classifier"]


def new_head(dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """The authors' linear head: weights N(0, 0.01^2) from a generator seeded by ``seed``, zero bias."""
    head = nn.Linear(dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, dim, generator=gen) * 0.01)
        head.bias.zero_()
    return head


def fit_linear_classifier(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    config: ClassifierConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> nn.Linear:
    """Softmax regression on cached features (N, D) -> ``nn.Linear(D, C)`` (see :class:`ClassifierConfig`)."""
    config = config or ClassifierConfig()
    head = new_head(features.shape[1], num_classes, seed).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=config.classifier_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.classifier_epochs)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in track(range(config.classifier_epochs), "real-data classifier", enabled=progress, unit="epoch"):
            order = torch.randperm(len(labels), generator=gen)
            for start in range(0, len(labels), config.classifier_batch):
                idx = order[start : start + config.classifier_batch]
                loss = F.cross_entropy(head(features[idx].to(device).float()), labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return head.eval()
