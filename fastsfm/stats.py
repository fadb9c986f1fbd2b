"""Class statistics of the real data: computed in one streaming pass, saved once.

:class:`ClassStats` holds per-class feature means (C, D) and counts (C,) -- all the SFM
loss needs -- plus the real-data linear classifier ``(W, b)`` reused by classifier
inheritance, and metadata (backbone identity, input size, normalisation, class names,
dataset fingerprint) that :meth:`ClassStats.check_compatible` uses to refuse statistics
from another backbone or dataset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import Tensor
from torch.utils.data import DataLoader

from .backbones import Backbone
from .config import ClassifierConfig, Precision
from .distributed import control_group, gather_to_rank0, interleave_shards, rank_world, shard_dataset
from .images import fingerprint, loader_kwargs
from .io import atomic_save_safetensors, read_safetensors
from .probe import fit_linear_classifier
from .progress import track

__all__ = ["ClassStats", "compute_stats", "dataset_stats"]

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


@torch.no_grad()
def compute_stats(
    backbone: Backbone,
    loader: DataLoader,
    class_names: list[str],
    dataset_id: str,
    classifier: ClassifierConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    precision: Precision = "fp32",
    features_path: str | Path | None = None,
) -> ClassStats:
    """One pass over ``loader`` (images in [0, 1], int labels): per-class sums and counts by a
    segmented reduction (``index_add_``), plus the real-data linear classifier
    (:class:`fastsfm.config.ClassifierConfig`, recorded in the metadata) fitted on the features
    cached in float16 during the same pass (so images are read exactly once).  The backbone runs
    under ``precision`` (fp32 by default: the authors compute class means without autocast).
    ``features_path``: rank 0 also writes the cached features (float16 (N, D), ``features``) and
    their labels (``labels``) there, in dataset order, so baselines need not encode the images again.

    Under ``torch.distributed`` each rank passes a loader over
    ``shard_dataset(dataset, rank, world)`` in order (no shuffling): sums and counts are
    all-reduced, the cached features are gathered to rank 0 only (in dataset order), rank 0 fits
    the classifier and sends it to the others, so every rank returns the statistics a single
    process would compute and no rank but 0 ever holds another rank's features.
    """
    c, d = len(class_names), backbone.feature_dim
    sums = torch.zeros(c, d, dtype=torch.float64, device=device)
    counts = torch.zeros(c, dtype=torch.int64, device=device)
    cached, cached_labels = [], []
    batches = track(loader, "class statistics", enabled=progress and rank_world()[0] == 0, unit="batch")
    for images, labels in batches:
        labels = labels.to(device)
        if int(labels.min()) < 0 or int(labels.max()) >= c:
            raise ValueError(f"labels must lie in [0, {c}), got [{int(labels.min())}, {int(labels.max())}]")
        with backbone.using_precision(precision):
            feats = backbone(images.to(device, non_blocking=True)).float()
        sums.index_add_(0, labels, feats.double())
        counts += torch.bincount(labels, minlength=c)
        cached.append(feats.half().cpu())
        cached_labels.append(labels.cpu())
    features, feature_labels = torch.cat(cached), torch.cat(cached_labels)
    rank, world = rank_world()
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    if bool((counts == 0).any()):
        missing = [class_names[i] for i in torch.nonzero(counts == 0).squeeze(1).tolist()]
        raise ValueError(f"classes without any image: {missing[:10]}")
    means = (sums / counts[:, None]).float()
    classifier = classifier or ClassifierConfig()
    shards = gather_to_rank0((features, feature_labels))
    head = [None, None]
    if rank == 0:
        features, feature_labels = interleave_shards([f for f, _ in shards]), interleave_shards([y for _, y in shards])
        if features_path is not None:
            atomic_save_safetensors({"features": features, "labels": feature_labels}, features_path, {})
        fitted = fit_linear_classifier(
            features,
            feature_labels,
            c,
            classifier,
            device=device,
            progress=progress,
        )
        head = [fitted.weight.detach().cpu(), fitted.bias.detach().cpu()]
    if world > 1:
        dist.broadcast_object_list(head, src=0, group=control_group())
    meta = {
        "backbone": backbone.identity,
        "input_size": str(backbone.input_size),
        "mean": json.dumps(backbone.mean),
        "std": json.dumps(backbone.std),
        "dataset": dataset_id,
        "feature_dim": str(d),
        "num_images": str(int(counts.sum())),
        "classifier": json.dumps(asdict(classifier)),
        "precision": precision,
    }
    return ClassStats(means.cpu(), counts.cpu(), head[0], head[1], list(class_names), meta)


def dataset_stats(
    backbone: Backbone,
    data,
    classifier: ClassifierConfig | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    workers: int | None = None,
    progress: bool = True,
    precision: Precision = "fp32",
    features_path: str | Path | None = None,
) -> ClassStats:
    """:func:`compute_stats` of an :class:`fastsfm.images.ImageData`'s train split (its centre-crop
    view), identified by name and file fingerprint; under ``torch.distributed`` each rank reads
    its shard of the images."""
    loader = DataLoader(
        shard_dataset(data.train_eval, *rank_world()), batch_size=batch_size, **loader_kwargs(device, workers)
    )
    return compute_stats(
        backbone,
        loader,
        data.class_names,
        f"{data.name}:{fingerprint(data.train)}",
        classifier=classifier,
        device=device,
        progress=progress,
        precision=precision,
        features_path=features_path,
    )
