"""The statistics pass: every backbone over one decode of each real image, resumable.

Per backbone: per-class float64 sums and counts by a segmented reduction (``index_add_``), the
features cached in float16 for the real-data classifier (fitted once the pass is done, so each
image is read once), and the :class:`fastsfm.stats.ClassStats` they make.  A long pass
checkpoints its running sums (:mod:`fastsfm.stats.resume`) every ``checkpoint_minutes`` and on
SIGTERM/SIGUSR1/Ctrl-C (then exits ``128 + signal``, as distillation does), resumes from them to
the same result, and saves the finished sums before the classifier fit starts.  An undecodable
image stops the pass with one line naming it (:class:`fastsfm.data.images.BadImageError`), or
with ``skip_bad`` is left out and listed in the statistics' metadata (``skipped_images``).

At ImageNet-1k (1.28 M images, C = 1000, D = 768): the sums are 6 MB per backbone, the cached
features 2 GB per backbone (float16); a checkpoint writes the sums and only the features cached
since the last one.  Under ``torch.distributed`` each rank checkpoints its own shard's sums (the
all-reduce comes after the pass), so a resume needs the world size and batch size that wrote it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..config import ClassifierConfig, Precision
from ..data.images import (
    BadImageError,
    Checked,
    check_shared_memory,
    collate_checked,
    fingerprint,
    loader_kwargs,
    to_float,
    uint8_views,
)
from ..distributed import control_group, gather_to_rank0, interleave_shards, rank_world, shard_dataset
from ..io import atomic_save_safetensors
from ..models.backbones import Backbone
from ..models.classifier import fit_linear_classifier
from ..progress import track
from ..signals import StopSignals
from .classstats import ClassStats
from .resume import PassCheckpoint, PassState

__all__ = ["compute_stats", "compute_stats_many", "dataset_stats", "dataset_stats_many", "input_crops"]

log = logging.getLogger(__name__)


def input_crops(backbones: Sequence[Backbone]) -> int | tuple[int, ...]:
    """The centre crops a statistics pass over ``backbones`` reads: their one input size, or a tuple
    of their distinct sizes in order (the data then gives a tuple of views per image,
    :func:`fastsfm.data.images.view_transform`)."""
    sizes = tuple(dict.fromkeys(b.input_size for b in backbones))
    return sizes[0] if len(sizes) == 1 else sizes


def _on_device(images: Tensor | Sequence[Tensor], crops: int | tuple[int, ...], device) -> dict[int, Tensor]:
    """A batch's views on ``device`` by crop size, each copied once (every backbone of that size reads it)."""
    sizes, views = ((crops,), (images,)) if isinstance(crops, int) else (crops, images)
    return {size: to_float(view.to(device, non_blocking=True)) for size, view in zip(sizes, views, strict=True)}


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
    checkpoint: PassCheckpoint | None = None,
    state: PassState | None = None,
    skip_bad: bool = False,
) -> list[ClassStats]:
    """The statistics of every backbone in one pass over ``loader`` (images in [0, 1], int labels):
    each batch is read once and encoded by every backbone.  The batches are ``(images, labels)``
    -- the images (:func:`input_crops` an int) or a tuple of views, one per size of
    :func:`input_crops` -- or :func:`fastsfm.data.images.collate_checked`'s ``(images, labels,
    bad)``, whose undecodable images raise a one-line :class:`BadImageError` or, with
    ``skip_bad``, are recorded and left out.

    The classifier (:class:`fastsfm.config.ClassifierConfig`, recorded in the metadata) is fitted
    on the features cached in float16 during the pass.  The backbones run under ``precision``
    (fp32 by default: the authors compute class means without autocast).  ``features_path`` (one
    per backbone): rank 0 also writes the cached features (float16 (N, D), ``features``) and their
    labels (``labels``) there, in dataset order, so baselines need not encode the images again.
    ``checkpoint``: saved as the module docstring says; ``state``: what a checkpoint held, the
    loader then starting at its ``batches``.  Each backbone's statistics equal a one-backbone pass's.

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
    state = state or PassState.empty([b.feature_dim for b in backbones], c, device)
    rank, world = rank_world()
    group = control_group() if world > 1 else None
    batches = track(loader, "class statistics", enabled=progress and rank == 0, unit="batch")
    with StopSignals() as stop:
        for batch in batches:
            images, labels, bad = batch if len(batch) == 3 else (*batch, [])
            if bad and not skip_bad:
                raise BadImageError(f"{bad[0]} (use --skip-bad-images to leave such files out)")
            state.bad += bad
            if labels is not None:
                _accumulate(backbones, state, images, labels.to(device), crops, c, precision, device)
            state.batches += 1
            if checkpoint is not None and (stop.requested() or checkpoint.due()):  # per rank: shards differ by a batch
                checkpoint.save(state)
                if stop.signum:
                    log.warning(
                        "stopped by signal %d: statistics checkpoint in %s; continue with --resume",
                        stop.signum,
                        checkpoint.root,
                    )
                    raise SystemExit(stop.code)
    if checkpoint is not None:
        checkpoint.save(state)  # the encodings are safe before the classifier fit
    return _finish(backbones, state, class_names, dataset_id, classifier, device, progress, precision, paths, group)


def _accumulate(backbones, state: PassState, images, labels: Tensor, crops, c: int, precision, device) -> None:
    """Add one batch to ``state``: every backbone's features to its class sums and cache."""
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels must lie in [0, {c}), got [{int(labels.min())}, {int(labels.max())}]")
    views = _on_device(images, crops, device)
    for backbone, total, kept in zip(backbones, state.sums, state.features, strict=True):
        with backbone.using_precision(precision):
            feats = backbone(views[backbone.input_size]).float()
        total.index_add_(0, labels, feats.double())
        kept.append(feats.half().cpu())
    state.counts += torch.bincount(labels, minlength=c)
    state.labels.append(labels.cpu())


def _finish(
    backbones, state: PassState, class_names, dataset_id, classifier, device, progress, precision, paths, group
):
    """All-reduce the ranks' sums, fit each backbone's classifier, and make its :class:`ClassStats`."""
    c = len(class_names)
    sums, counts = state.sums, state.counts
    rank, world = rank_world()
    bad = state.bad
    if world > 1:
        for total in sums:
            dist.all_reduce(total)
        dist.all_reduce(counts)
        every = [None] * world
        dist.all_gather_object(every, bad, group=group)
        bad = [line for part in every for line in part]
    if bad:
        log.warning(
            "%d undecodable images left out of the statistics (listed in their metadata): %s%s",
            len(bad),
            bad[0],
            " ..." if len(bad) > 1 else "",
        )
    if bool((counts == 0).any()):
        missing = [class_names[i] for i in torch.nonzero(counts == 0).squeeze(1).tolist()]
        raise ValueError(f"classes without any image: {missing[:10]}")
    classifier = classifier or ClassifierConfig()
    label_shards = gather_to_rank0(torch.cat(state.labels))
    feature_labels = interleave_shards(label_shards) if rank == 0 else None
    out = []
    for backbone, total, kept, path in zip(backbones, sums, state.features, paths, strict=True):
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
        if bad:
            meta["skipped_images"] = json.dumps(bad)
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
    checkpoint_folder: str | Path | None = None,
    checkpoint_minutes: float = 10.0,
    resume: bool = False,
    skip_bad: bool = False,
) -> list[ClassStats]:
    """:func:`compute_stats_many` of an :class:`fastsfm.data.images.ImageData`'s train split (its centre-crop
    view: load the data with ``crop=input_crops(backbones)``), identified by name and file
    fingerprint; under ``torch.distributed`` each rank reads its shard of the images.

    ``checkpoint_folder``: the pass checkpoints there every ``checkpoint_minutes`` and when
    stopped by a signal; ``resume`` continues from it (a folder left by an earlier pass is refused
    without ``resume``); it is deleted once the statistics are computed.  ``skip_bad``: leave
    undecodable images out and list them (else the first stops the pass, named)."""
    dataset_id = f"{data.name}:{fingerprint(data.train)}"
    rank, world = rank_world()
    shard = shard_dataset(Checked(uint8_views(data.train_eval)), rank, world)  # uint8 through the workers
    checkpoint, state = None, None
    if checkpoint_folder is not None:
        identity = {
            "backbones": json.dumps([b.identity for b in backbones]),
            "dataset": dataset_id,
            "classes": json.dumps(data.class_names),
            "batch_size": str(batch_size),
            "world_size": str(world),
            "precision": precision,  # not skip_bad: a pass stopped by a bad file resumes with --skip-bad-images
        }
        checkpoint = PassCheckpoint(checkpoint_folder, identity, rank, checkpoint_minutes)
        if checkpoint.exists() and not resume:
            raise FileExistsError(
                f"{checkpoint_folder} holds an unfinished statistics pass: add --resume to continue it, "
                "or delete the folder to start over"
            )
        if checkpoint.exists():
            state = checkpoint.load(device)
            log.info("resuming the statistics pass at batch %d (%s)", state.batches, checkpoint.root)
            shard = Subset(shard, range(min(state.batches * batch_size, len(shard)), len(shard)))
    options = loader_kwargs(device, workers)
    crops = input_crops(backbones)
    pixels = sum(size * size for size in (crops if isinstance(crops, tuple) else (crops,)))
    check_shared_memory(batch_size * 3 * pixels, options["num_workers"])  # the uint8 bytes of a batch
    loader = DataLoader(shard, batch_size=batch_size, collate_fn=collate_checked, **options)
    stats = compute_stats_many(
        backbones,
        loader,
        data.class_names,
        dataset_id,
        classifier=classifier,
        device=device,
        progress=progress,
        precision=precision,
        features_path=features_path,
        checkpoint=checkpoint,
        state=state,
        skip_bad=skip_bad,
    )
    if checkpoint is not None:
        checkpoint.remove()
    return stats
