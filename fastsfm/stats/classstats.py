"""Class statistics of the real data, as saved once by a statistics pass.

:class:`ClassStats` holds per-class feature means (C, D) and counts (C,) -- all the SFM
loss needs -- plus the real-data linear classifier ``(W, b)`` reused by classifier
inheritance, and metadata (backbone identity, input size, normalisation, class names,
dataset fingerprint) that :meth:`ClassStats.check_compatible` uses to refuse statistics
from another backbone or dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor

from ..io import atomic_save_safetensors, read_safetensors
from ..models.backbones import Backbone

__all__ = ["ClassStats", "stats_file", "FORMAT"]

FORMAT = "fastsfm-stats-v1"


@dataclass
class ClassStats:
    """Real-data statistics for C classes of D-dimensional features.

    Attributes:
        means: (C, D) float32 class centres.
        counts: (C,) int64 images per class.
        classifier_weight: (C, D) float32, classifier_bias: (C,) float32 -- the linear
            classifier fitted on the real features (classifier inheritance).
        class_names: C names.
        meta: backbone identity, input size, mean/std, dataset fingerprint, ...
    """

    means: Tensor
    counts: Tensor
    classifier_weight: Tensor
    classifier_bias: Tensor
    class_names: list[str]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.means.shape[1]

    def to(self, device: str | torch.device) -> ClassStats:
        return ClassStats(
            self.means.to(device),
            self.counts.to(device),
            self.classifier_weight.to(device),
            self.classifier_bias.to(device),
            self.class_names,
            dict(self.meta),
        )

    def save(self, path: str | Path) -> None:
        """Atomic safetensors write; metadata as strings (class names JSON-encoded)."""
        meta = {**self.meta, "format": FORMAT, "class_names": json.dumps(self.class_names)}
        tensors = {
            "means": self.means,
            "counts": self.counts,
            "classifier_weight": self.classifier_weight,
            "classifier_bias": self.classifier_bias,
        }
        atomic_save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> ClassStats:
        """Load and validate a statistics file; a clear ``ValueError`` for anything else."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {path} does not exist; create it with `fastsfm stats`")
        try:
            tensors, meta = read_safetensors(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable safetensors statistics file: {err}") from err
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a fastsfm statistics file (format {meta.get('format')!r}, expected {FORMAT!r})"
            )
        names = json.loads(meta.pop("class_names"))
        meta.pop("format")
        stats = cls(
            tensors["means"], tensors["counts"], tensors["classifier_weight"], tensors["classifier_bias"], names, meta
        )
        c, d = stats.means.shape
        if stats.counts.shape != (c,) or stats.classifier_weight.shape != (c, d) or len(names) != c:
            raise ValueError(
                f"{path}: inconsistent shapes (means {tuple(stats.means.shape)}, counts "
                f"{tuple(stats.counts.shape)}, classifier {tuple(stats.classifier_weight.shape)}, "
                f"{len(names)} class names)"
            )
        return stats

    def check_compatible(
        self, backbone: Backbone | None = None, num_classes: int | None = None, dataset: str | None = None
    ) -> None:
        """Raise ``ValueError`` if these statistics do not belong to ``backbone``/classes/dataset."""
        if backbone is not None:
            if self.meta.get("backbone") != backbone.identity:
                raise ValueError(
                    f"statistics were computed with backbone {self.meta.get('backbone')!r}, "
                    f"not {backbone.identity!r}; recompute them with `fastsfm stats`"
                )
            if backbone.feature_dim != self.feature_dim:
                raise ValueError(
                    f"backbone gives D={backbone.feature_dim} features, statistics have D={self.feature_dim}"
                )
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(f"statistics have {self.num_classes} classes, the data has {num_classes}")
        if dataset is not None and self.meta.get("dataset") != dataset:
            raise ValueError(f"statistics are of dataset {self.meta.get('dataset')!r}, not {dataset!r}")


def stats_file(folder: str | Path, backbone: str) -> Path:
    """``folder/<backbone>.safetensors``: where a several-backbone statistics pass writes each one's."""
    return Path(folder) / f"{backbone.replace('/', '_').replace(':', '_')}.safetensors"
