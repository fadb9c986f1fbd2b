"""Encoded features of real splits on disk, so that every baseline and every later call reuses them.

Encoding a real split is the long part of an evaluation (ImageNet-1k's train split: 1.28 M images
per backbone).  :func:`stored_features` keys a split's features by what determines them -- the
split's content (:func:`fastsfm.data.images.fingerprint`: its file list or tensor bytes, and its
length), the backbone's identity (name, weights, input size, preprocessing), the resolution and the
precision -- and keeps them as ``<folder>/<backbone>-<split>-<key>.safetensors`` (float32, written
atomically; IN-1k train at D = 768: 3.9 GB).  A damaged file is encoded again, with a warning.
The folder: ``--feature-cache`` of ``fastsfm eval``, by default ``$FASTSFM_FEATURE_CACHE`` or
``~/.cache/fastsfm/features``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from torch import Tensor
from torch.utils.data import Dataset

from ..data.images import fingerprint
from ..distributed import broadcast_from_rank0, rank_world
from ..io import atomic_save_safetensors, read_safetensors

__all__ = ["default_folder", "stored_features"]

log = logging.getLogger(__name__)


def default_folder() -> Path:
    """``$FASTSFM_FEATURE_CACHE``, else ``~/.cache/fastsfm/features``."""
    env = os.environ.get("FASTSFM_FEATURE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastsfm" / "features"


def stored_features(
    folder: Path | None,
    dataset: Dataset,
    split: str,
    backbone,
    resolution: int | None,
    precision: str,
    encode: Callable[[], Tensor],
) -> Tensor:
    """``dataset``'s features by ``backbone`` (N, D): read from ``folder`` when stored there, else
    ``encode()``'d and stored (rank 0).  ``folder`` None: always encoded, nothing stored.

    Under ``torch.distributed`` every rank calls it: rank 0 reads the folder (which need not be
    shared) and sends what it found to every rank, so all ranks agree on encoding -- ``encode`` may be
    a collective (:func:`fastsfm.models.backbones.encode_sharded`)."""
    if folder is None:
        return encode()
    path = _path(folder, dataset, split, backbone, resolution, precision) if rank_world()[0] == 0 else None
    stored = broadcast_from_rank0(_read(path, len(dataset), split, backbone.name) if path is not None else None)
    if stored is not None:
        return stored
    features = encode()
    if path is not None:
        meta = {"split": split, "backbone": backbone.identity, "resolution": str(resolution), "precision": precision}
        atomic_save_safetensors({"features": features.float().cpu().contiguous()}, path, meta)
    return features


def _path(folder: Path, dataset: Dataset, split: str, backbone, resolution: int | None, precision: str) -> Path:
    parts = [split, fingerprint(dataset), len(dataset), backbone.identity, resolution, precision]
    key = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]
    return Path(folder) / f"{backbone.name}-{split}-{key}.safetensors"


def _read(path: Path, rows: int, split: str, name: str) -> Tensor | None:
    """The features stored at ``path``, or None when absent, not of ``rows`` rows or damaged (said in the log)."""
    if not path.exists():
        return None
    try:
        features = read_safetensors(path)[0]["features"]
        if features.shape[0] == rows:
            log.info("%s features of %s: reused %s", split, name, path)
            return features
        log.warning("%s holds %d rows, not %d: encoding again", path, features.shape[0], rows)
    except (OSError, SafetensorError, KeyError, ValueError) as err:
        log.warning("%s is damaged (%s): encoding again", path, err)
    return None
