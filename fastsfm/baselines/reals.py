"""Real-image baselines at a given IPC: random real images and class-centroid-nearest ones."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_reals", "centroid_reals"]


def random_reals(labels: Tensor, num_classes: int, ipc: int, seed: int = 0) -> Tensor:
    """Indices (C*IPC,) of ``ipc`` random images per class, grouped by class."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).squeeze(1)
        if len(idx) < ipc:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than ipc={ipc}")
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:ipc]])
    return torch.cat(picks)


def centroid_reals(features: Tensor, labels: Tensor, means: Tensor, ipc: int) -> Tensor:
    """Indices (C*IPC,) of the ``ipc`` images per class whose features are nearest (L2) to the
    class mean (LGM's "Centroids" baseline); deterministic."""
    picks = []
    for c in range(means.shape[0]):
        idx = torch.nonzero(labels == c).squeeze(1)
        if len(idx) < ipc:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than ipc={ipc}")
        dist = (features[idx].float() - means[c].float()).norm(dim=1)
        picks.append(idx[dist.argsort()[:ipc]])
    return torch.cat(picks)
