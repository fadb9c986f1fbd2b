"""Class statistics of the real data: computed in one streaming pass, saved once.

:class:`ClassStats` holds per-class feature means (C, D) and counts (C,) -- all the SFM
loss needs -- plus the real-data linear classifier ``(W, b)`` reused by classifier
inheritance, and metadata (backbone identity, input size, normalisation, class names,
dataset fingerprint) that :meth:`ClassStats.check_compatible` uses to refuse statistics
from another backbone or dataset.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import Tensor
from torch.utils.data import DataLoader

from .config import ClassifierConfig, Precision
from .data.images import fingerprint, loader_kwargs
from .distributed import control_group, gather_to_rank0, interleave_shards, rank_world, shard_dataset
from .io import atomic_save_safetensors, read_safetensors
from .models.backbones import Backbone
from .models.classifier import fit_linear_classifier
from .progress import track

__all__ = [
    "ClassStats",
    "compute_stats",
    "compute_stats_many",
    "dataset_stats",
    "dataset_stats_many",
    "input_crops",
    "stats_file",
]

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


def input_crops(backbones: Sequence[Backbone]) -> int | tuple[int, ...]:
    """The centre crops a statistics pass over ``backbones`` reads: their one input size, or a tuple
    of their distinct sizes in order (the data then gives a tuple of views per image,
    :func:`fastsfm.data.images.view_transform`)."""
    sizes = tuple(dict.fromkeys(b.input_size for b in backbones))
    return sizes[0] if len(sizes) == 1 else sizes


def _on_device(images: Tensor | Sequence[Tensor], crops: int | tuple[int, ...], device) -> dict[int, Tensor]:
    """A batch's views on ``device`` by crop size, each copied once (every backbone of that size reads it)."""
    sizes, views = ((crops,), (images,)) if isinstance(crops, int) else (crops, images)
    return {size: view.to(device, non_blocking=True) for size, view in zip(sizes, views, strict=True)}


def compute_stats(backbone: Backbone, *args, **kwargs) -> ClassStats:
    """:func:`compute_stats_many` of one backbone (the same further arguments)."""
    return compute_stats_many([backbone], *args, **kwargs)[0]


@torch.no_grad()
def compute_stats_many(
    backbones: Sequence[Backbone],
    loader: DataLoader,
    class_names: list[str],
    dataset_id: str,
    classifier: ClassifierConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    precision: Precision = "fp32",
    features_path: str | Path | Sequence[str | Path] | None = None,
) -> list[ClassStats]:
    """The statistics of every backbone in one pass over ``loader`` (images in [0, 1], int labels):
    each batch is read once and encoded by every backbone.  The batches are the images
    (:func:`input_crops` an int) or a tuple of views, one per size of :func:`input_crops`.

    Per backbone: per-class sums and counts by a segmented reduction (``index_add_``), plus the
    real-data linear classifier (:class:`fastsfm.config.ClassifierConfig`, recorded in the metadata)
    fitted on the features cached in float16 during the same pass (so images are read exactly once).
    The backbones run under ``precision`` (fp32 by default: the authors compute class means without
    autocast).  ``features_path`` (one per backbone): rank 0 also writes the cached features (float16
    (N, D), ``features``) and their labels (``labels``) there, in dataset order, so baselines need not
    encode the images again.  Each backbone's statistics equal a one-backbone pass's.

    Under ``torch.distributed`` each rank passes a loader over
    ``shard_dataset(dataset, rank, world)`` in order (no shuffling): sums and counts are
    all-reduced, the cached features are gathered to rank 0 only (in dataset order), rank 0 fits
    the classifier and sends it to the others, so every rank returns the statistics a single
    process would compute and no rank but 0 ever holds another rank's features.
    """
    backbones = list(backbones)
    crops = input_crops(backbones)
    paths = (
        [features_path] if isinstance(features_path, (str, Path)) else list(features_path or [None] * len(backbones))
    )
    if len(paths) != len(backbones):
        raise ValueError(f"{len(paths)} feature files for {len(backbones)} backbones")
    c = len(class_names)
    sums = [torch.zeros(c, b.feature_dim, dtype=torch.float64, device=device) for b in backbones]
    counts = torch.zeros(c, dtype=torch.int64, device=device)
    cached: list[list[Tensor]] = [[] for _ in backbones]
    cached_labels = []
    batches = track(loader, "class statistics", enabled=progress and rank_world()[0] == 0, unit="batch")
    for images, labels in batches:
        labels = labels.to(device)
        if int(labels.min()) < 0 or int(labels.max()) >= c:
            raise ValueError(f"labels must lie in [0, {c}), got [{int(labels.min())}, {int(labels.max())}]")
        views = _on_device(images, crops, device)
        for backbone, total, kept in zip(backbones, sums, cached, strict=True):
            with backbone.using_precision(precision):
                feats = backbone(views[backbone.input_size]).float()
            total.index_add_(0, labels, feats.double())
            kept.append(feats.half().cpu())
        counts += torch.bincount(labels, minlength=c)
        cached_labels.append(labels.cpu())
    rank, world = rank_world()
    if world > 1:
        for total in sums:
            dist.all_reduce(total)
        dist.all_reduce(counts)
    if bool((counts == 0).any()):
        missing = [class_names[i] for i in torch.nonzero(counts == 0).squeeze(1).tolist()]
        raise ValueError(f"classes without any image: {missing[:10]}")
    classifier = classifier or ClassifierConfig()
    label_shards = gather_to_rank0(torch.cat(cached_labels))
    feature_labels = interleave_shards(label_shards) if rank == 0 else None
    out = []
    for backbone, total, kept, path in zip(backbones, sums, cached, paths, strict=True):
        head = _real_classifier(torch.cat(kept), feature_labels, c, classifier, device, progress, path)
        meta = {
            "backbone": backbone.identity,
            "input_size": str(backbone.input_size),
            "mean": json.dumps(backbone.mean),
            "std": json.dumps(backbone.std),
            "dataset": dataset_id,
            "feature_dim": str(backbone.feature_dim),
            "num_images": str(int(counts.sum())),
            "classifier": json.dumps(asdict(classifier)),
            "precision": precision,
        }
        means = (total / counts[:, None]).float()
        out.append(ClassStats(means.cpu(), counts.cpu(), head[0], head[1], list(class_names), meta))
    return out


def _real_classifier(
    features: Tensor,
    labels: Tensor | None,
    c: int,
    classifier: ClassifierConfig,
    device: str | torch.device,
    progress: bool,
    features_path: str | Path | None,
) -> list[Tensor]:
    """``[weight, bias]`` of the real-data classifier, on every rank: this rank's cached ``features``
    are gathered to rank 0 (``labels``: the gathered labels there), which writes them to
    ``features_path`` (if any), fits the classifier and sends it to the others."""
    shards = gather_to_rank0(features)
    head = [None, None]
    if rank_world()[0] == 0:
        features = interleave_shards(shards)
        if features_path is not None:
            atomic_save_safetensors({"features": features, "labels": labels}, features_path, {})
        fitted = fit_linear_classifier(features, labels, c, classifier, device=device, progress=progress)
        head = [fitted.weight.detach().cpu(), fitted.bias.detach().cpu()]
    if rank_world()[1] > 1:
        dist.broadcast_object_list(head, src=0, group=control_group())
    return head


def dataset_stats(backbone: Backbone, *args, **kwargs) -> ClassStats:
    """:func:`dataset_stats_many` of one backbone (the same further arguments)."""
    return dataset_stats_many([backbone], *args, **kwargs)[0]


def dataset_stats_many(
    backbones: Sequence[Backbone],
    data,
    classifier: ClassifierConfig | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    workers: int | None = None,
    progress: bool = True,
    precision: Precision = "fp32",
    features_path: str | Path | Sequence[str | Path] | None = None,
) -> list[ClassStats]:
    """:func:`compute_stats_many` of an :class:`fastsfm.data.images.ImageData`'s train split (its centre-crop
    view: load the data with ``crop=input_crops(backbones)``), identified by name and file
    fingerprint; under ``torch.distributed`` each rank reads its shard of the images."""
    loader = DataLoader(
        shard_dataset(data.train_eval, *rank_world()), batch_size=batch_size, **loader_kwargs(device, workers)
    )
    return compute_stats_many(
        backbones,
        loader,
        data.class_names,
        f"{data.name}:{fingerprint(data.train)}",
        classifier=classifier,
        device=device,
        progress=progress,
        precision=precision,
        features_path=features_path,
    )
