"""Real-image selections at a given IPC, as the authors select them (``einsteinxia/SFM`` ``baselines/*.py``).

* random: ``ipc`` random train images per class (a new draw per seed);
* centroid: per class, the images whose features are nearest (L2) to the class mean (the
  authors' ``centroids.py``);
* k-means: per class, k-means with ``ipc`` clusters and the image nearest each centre -- the usual
  extension of the centroid baseline beyond IPC 1 in the dataset-distillation literature (at
  IPC 1 the one centre is the class mean: the authors' centroid selection);
* neighbors: for every synthetic image, the real image of its class with the highest
  cosine similarity of features -- a memorisation check of the distilled set.

Features are the distillation backbone's, of centre crops (the statistics view); the
selected images are then evaluated in the synthetic resolution view like any set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_reals", "centroid_reals", "kmeans_reals", "neighbor_reals"]


def _class_indices(labels: Tensor, c: int, ipc: int) -> Tensor:
    idx = torch.nonzero(labels == c).squeeze(1)
    if len(idx) < ipc:
        raise ValueError(f"class {c} has {len(idx)} images, fewer than ipc={ipc}")
    return idx


def random_reals(labels: Tensor, num_classes: int, ipc: int, seed: int = 0) -> Tensor:
    """Indices (C*IPC,) of ``ipc`` random images per class, grouped by class."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = _class_indices(labels, c, ipc)
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:ipc]])
    return torch.cat(picks)


def centroid_reals(features: Tensor, labels: Tensor, means: Tensor, ipc: int) -> Tensor:
    """Indices (C*IPC,) of the ``ipc`` images per class whose features are nearest (L2) to the
    class mean (the authors' "Centroids"); deterministic."""
    picks = []
    for c in range(means.shape[0]):
        idx = _class_indices(labels, c, ipc)
        dist = (features[idx].float() - means[c].float()).norm(dim=1)
        picks.append(idx[dist.argsort()[:ipc]])
    return torch.cat(picks)


def kmeans_reals(features: Tensor, labels: Tensor, num_classes: int, ipc: int, seed: int = 0) -> Tensor:
    """Indices (C*IPC,), grouped by class: per class, scikit-learn's k-means (``ipc`` clusters,
    k-means++ initialisation, 10 restarts, ``random_state=seed``: deterministic) on the features, then
    for each centre (in the order of their sizes, largest first) the nearest (L2) image not yet taken.

    Under ``torch.distributed`` every rank calls it: the classes are dealt over the ranks and the picks
    gathered (each class is independent: the single process's indices).  ImageNet-1k, IPC 50: about a
    second per class on a CPU core, 1000 classes split over the ranks."""
    from sklearn.cluster import KMeans

    from ..distributed import all_gather, rank_world

    rank, world = rank_world()
    mine = {}
    for c in range(rank, num_classes, world):
        idx = _class_indices(labels, c, ipc)
        x = features[idx].double().numpy()
        km = KMeans(n_clusters=ipc, n_init=10, random_state=seed).fit(x)
        sizes = torch.bincount(torch.as_tensor(km.labels_), minlength=ipc)
        taken: list[int] = []
        for k in sizes.argsort(descending=True, stable=True).tolist():
            dist = torch.as_tensor(((x - km.cluster_centers_[k]) ** 2).sum(1))
            order = [int(i) for i in dist.argsort(stable=True) if int(i) not in taken]
            taken.append(order[0])
        mine[c] = idx[torch.tensor(taken)]
    every = {c: picks for part in all_gather(mine) for c, picks in part.items()}
    return torch.cat([every[c] for c in range(num_classes)])


def neighbor_reals(syn_features: Tensor, syn_labels: Tensor, features: Tensor, labels: Tensor) -> Tensor:
    """Index (N_syn,) of the real image of the same class with the highest cosine similarity to
    each synthetic image (the authors' "Neighbors")."""
    real = F.normalize(features.float(), dim=1)
    syn = F.normalize(syn_features.float(), dim=1)
    picks = []
    for z, c in zip(syn, syn_labels.tolist(), strict=True):
        idx = _class_indices(labels, c, 1)
        picks.append(idx[(real[idx] @ z).argmax()])
    return torch.stack(picks)
