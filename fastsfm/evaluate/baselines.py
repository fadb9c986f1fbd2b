"""Named evaluation sets of real images: the one builder of the CLI, the grid and the demo.

A :class:`Selection` is the outcome of one baseline (:data:`fastsfm.config.Baseline`) at one IPC:
which train images it picked -- one list, or one per evaluation seed for ``random`` (a new draw
per seed, as the authors run ``random_reals.py`` once per seed).  It is what the grid stores as
``indices.json``, and it turns into an :class:`fastsfm.evaluate.evaluator.ImageSet` (the images in the
synthetic-resolution view, evaluated like any set) named after the baseline.

:func:`select` runs a baseline (:mod:`fastsfm.data.reals`) on the train split's labels and,
where it needs them, the distillation backbone's features of the train split's statistics view
(centroid, k-means, neighbors), the class means, and the synthetic set whose nearest reals
``neighbors`` picks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import Baseline, choices
from ..data.images import ImageData, labels_of, stack_images
from ..data.reals import centroid_reals, kmeans_reals, neighbor_reals, random_reals
from ..io import atomic_write_json, read_json
from .evaluator import ImageSet, SetSource

__all__ = ["Selection", "select", "baseline_sources", "TITLES"]

TITLES = {"random": "random reals", "centroid": "centroid reals", "kmeans": "k-means reals", "neighbors": "neighbors"}
"""How each baseline's sets are named in tables."""


@dataclass
class Selection:
    """The train images a baseline picked: ``indices["all"]``, or ``indices[str(seed)]`` per seed (random).

    ``of`` names the synthetic set whose nearest reals ``neighbors`` are.
    """

    baseline: Baseline
    ipc: int
    indices: dict[str, list[int]]
    of: str | None = None

    @property
    def name(self) -> str:
        title = f"{TITLES[self.baseline]} of {self.of}" if self.of else TITLES[self.baseline]
        return f"{title} (IPC={self.ipc})"

    def picks(self, seed: int) -> Tensor:
        return torch.tensor(self.indices.get(str(seed), self.indices.get("all")), dtype=torch.int64)

    def image_set(self, data: ImageData, seed: int = 0) -> ImageSet:
        """The picked images in the synthetic-resolution view (``data.train``), with their labels."""
        idx = self.picks(seed)
        return ImageSet(self.name, stack_images(data.train, idx), labels_of(data.train)[idx])

    def source(self, data: ImageData) -> SetSource:
        """A fixed set, or a function of the seed when the picks differ per seed."""
        if "all" in self.indices:
            return self.image_set(data)
        return lambda seed: self.image_set(data, seed)

    def save(self, path: str | Path) -> None:
        payload = {"method": self.baseline, "ipc": self.ipc, "indices": self.indices}
        atomic_write_json(path, payload | ({"of": self.of} if self.of else {}))

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read an ``indices.json`` (also those written before this class existed: same keys)."""
        payload = read_json(path, "baseline selection")
        try:
            return cls(payload["method"], int(payload["ipc"]), payload["indices"], payload.get("of"))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a baseline selection (method, ipc, indices): {err}") from err


def select(
    baseline: Baseline,
    labels: Tensor,
    num_classes: int,
    ipc: int,
    *,
    seeds: int = 1,
    features: Tensor | None = None,
    means: Tensor | None = None,
    synthetic: ImageSet | None = None,
    backbone=None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Selection:
    """Run one baseline on the train split (``labels`` (N,); ``features`` (N, D) of its statistics view)."""
    if baseline not in choices(Baseline):
        raise ValueError(f"unknown baseline {baseline!r}; known: {choices(Baseline)}")
    if baseline == "random":
        picks = {str(s): random_reals(labels, num_classes, ipc, s).tolist() for s in range(seeds)}
        return Selection("random", ipc, picks)
    if features is None:
        raise ValueError(f"the {baseline} baseline needs the train features of the distillation backbone")
    if baseline == "centroid":
        return Selection("centroid", ipc, {"all": centroid_reals(features, labels, means, ipc).tolist()})
    if baseline == "kmeans":
        return Selection("kmeans", ipc, {"all": kmeans_reals(features, labels, num_classes, ipc, seed).tolist()})
    if synthetic is None or backbone is None:
        raise ValueError("the neighbors baseline needs a synthetic set and the distillation backbone")
    idx = nearest_reals(backbone, synthetic.images, synthetic.labels, features, labels, device)
    return Selection("neighbors", int(torch.bincount(synthetic.labels).max()), {"all": idx.tolist()}, synthetic.name)


def baseline_sources(
    data: ImageData,
    baselines: list[Baseline],
    ipc: int,
    seeds: int,
    features: Callable[[], Tensor],
    means: Tensor,
    synthetic: list[ImageSet] = (),
    backbone=None,
    device: str | torch.device = "cpu",
) -> list[SetSource]:
    """The sets of ``baselines`` (neighbors: one per synthetic set); ``features()`` is called once,
    only when a baseline needs the train features."""
    labels, sources, cached = labels_of(data.train), [], {}

    def feats() -> Tensor:
        if "f" not in cached:
            cached["f"] = features()
        return cached["f"]

    for name in baselines:
        targets = synthetic if name == "neighbors" else [None]
        for syn in targets:
            needs = name != "random"
            chosen = select(
                name,
                labels,
                data.num_classes,
                ipc,
                seeds=seeds,
                features=feats() if needs else None,
                means=means,
                synthetic=syn,
                backbone=backbone,
                device=device,
            )
            sources.append(chosen.source(data))
    return sources


def nearest_reals(
    backbone, images: Tensor, labels: Tensor, features: Tensor, real_labels: Tensor, device: str | torch.device = "cpu"
) -> Tensor:
    """:func:`neighbor_reals` of synthetic ``images`` (N, 3, R, R): encoded by ``backbone`` from their
    centre crop at its input size, as the authors' ``neighbors.py``; ``features`` are the real
    images' (the statistics view)."""
    from ..data.images import center_crop
    from ..models.backbones import encode

    crops = center_crop(images, min(backbone.input_size, images.shape[-1]))
    return neighbor_reals(encode(backbone, crops, device=device), labels, features, real_labels)
