"""The formats labs keep image datasets in besides ImageFolder trees, read offline, by index.

* :func:`hf_dataset` -- a Hugging Face ``datasets`` copy on disk: a folder written by
  ``save_to_disk`` (memory-mapped Arrow, read in place) or parquet files (the Hub's
  ``data/<split>-*.parquet`` layout; ``datasets`` converts them once into its cache, as
  ``load_dataset`` does); image and label columns found by type or by name;
* :func:`tar_shards` -- webdataset tar shards (``train-{000000..000146}.tar``: members
  ``<key>.jpg``/``.png``/... with ``<key>.cls``), indexed once by their headers, each image then
  read by seeking into its shard.

Both give :class:`fastsfm.data.images.IndexedImages` (the images decoded by PIL, an undecodable
one a one-line :class:`fastsfm.data.images.BadImageError`) in the views of
:mod:`fastsfm.data.images`.  ``datasets`` and ``webdataset`` are optional dependencies (the
``formats`` extra).  The flat ILSVRC validation folder is :mod:`fastsfm.data.imagenet`'s.

At ImageNet-1k scale: indexing 147 tar shards reads 2.6 M headers and 1.28 M ``.cls`` members
(seconds per shard on a local disk); a ``save_to_disk`` folder opens instantly.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from .images import ImageData, IndexedImages, view_transform, with_transform

__all__ = ["hf_dataset", "tar_shards", "IMAGE_COLUMNS", "LABEL_COLUMNS", "IMAGE_EXTENSIONS"]

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
"""Image column names tried, in order, when no column has the ``datasets.Image`` type."""
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target")
"""Label column names tried, in order, when no column has the ``datasets.ClassLabel`` type."""
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
"""Extensions of a webdataset sample's image member, in order of preference."""


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"reading this format needs `{module}`: pip install 'fastsfm[formats]'") from None


def _hf_splits(path: Path):
    """``(train, test or None)`` datasets of a ``save_to_disk`` folder or of parquet files."""
    datasets = _need("datasets")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
    else:
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else sorted(path.parent.glob(path.name))
        if not files:
            raise FileNotFoundError(
                f"{path} holds neither a `save_to_disk` dataset (dataset_dict.json / state.json) nor parquet files"
            )
        by_split: dict[str, list[str]] = {}
        for f in files:
            split = next((s for s in ("train", "validation", "val", "test") if f.name.startswith(s)), "train")
            by_split.setdefault(split, []).append(str(f))
        loaded = datasets.load_dataset("parquet", data_files=by_split)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{path}: no train split among {list(loaded)}")
        test = next((loaded[s] for s in ("validation", "val", "test") if s in loaded), None)
        return loaded["train"], test
    return loaded, None


def _column(ds, kind: str, names: tuple[str, ...], given: str | None) -> str:
    import datasets

    if given is not None:
        if given not in ds.column_names:
            raise ValueError(f"no column {given!r} (the dataset has {ds.column_names})")
        return given
    wanted = datasets.Image if kind == "image" else datasets.ClassLabel
    typed = [n for n, f in ds.features.items() if isinstance(f, wanted)]
    found = typed or [n for n in names if n in ds.column_names]
    if not found:
        raise ValueError(f"no {kind} column among {ds.column_names}; name it (tried {names})")
    return found[0]


def _hf_images(ds, image_column: str | None, label_column: str | None, classes: list[str] | None):
    import datasets

    image = _column(ds, "image", IMAGE_COLUMNS, image_column)
    label = _column(ds, "label", LABEL_COLUMNS, label_column)
    raw = ds.cast_column(image, datasets.Image(decode=False)) if isinstance(ds.features[image], datasets.Image) else ds
    values = ds[label]
    if classes is None:
        feature = ds.features[label]
        if isinstance(feature, datasets.ClassLabel):
            classes = list(feature.names)
        else:
            classes = [str(v) for v in sorted(set(values))]
    index = {name: i for i, name in enumerate(classes)}
    targets = values if all(isinstance(v, int) for v in values[:1]) else [index[str(v)] for v in values]

    def read(i: int):
        cell = raw[i][image]
        data = cell["bytes"] if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict):  # stored as a path
            data = Path(cell["path"]).read_bytes()
        return data, f"{ds.info.dataset_name or 'dataset'} row {i}"

    return IndexedImages(read, targets, classes, f"hf:{ds._fingerprint}")


def hf_dataset(
    path: str | Path,
    resolution: int,
    crop: int | tuple[int, ...],
    image_column: str | None = None,
    label_column: str | None = None,
) -> ImageData:
    """A Hugging Face ``datasets`` copy at ``path`` (module docstring): its train split, and its
    validation (or test) split as the test set, in the views of :mod:`fastsfm.data.images`."""
    path = Path(path)
    if not path.exists() and not list(path.parent.glob(path.name)):
        raise FileNotFoundError(f"Hugging Face dataset {path} does not exist")
    train_ds, test_ds = _hf_splits(path)
    train = _hf_images(train_ds, image_column, label_column, None)
    train.transform = view_transform(resolution, resolution)
    test = None
    if test_ds is not None:
        test = _hf_images(test_ds, image_column, label_column, train.classes)
        test.transform = view_transform(resolution, crop)
    return ImageData(train, with_transform(train, view_transform(resolution, crop)), test, train.classes, path.name)


def _tar_index(shards: list[str]) -> tuple[list[tuple[int, int, int, str]], list[int]]:
    """``(images, labels)``: per sample (shard, data offset, size, member name) of its image, and its
    ``.cls`` label, from the shards' headers (in shard and member order)."""
    images, labels = [], []
    for s, shard in enumerate(shards):
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                key, _, ext = base.partition(".")
                samples.setdefault(f"{folder}/{key}", {})[ext.lower()] = member
            for key, members in samples.items():
                ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if ext is None or "cls" not in members:
                    raise ValueError(f"{shard}: sample {key!r} lacks an image ({IMAGE_EXTENSIONS}) or a .cls label")
                m = members[ext]
                images.append((s, m.offset_data, m.size, m.name))
                labels.append(int(tar.extractfile(members["cls"]).read().decode().strip()))
    return images, labels


def _shards(pattern: str) -> list[str]:
    expand = _need("webdataset.shardlists").expand_urls
    shards = list(expand(pattern))
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        raise FileNotFoundError(f"webdataset shards {pattern!r}: {missing[:3] or 'none'} not found")
    return shards


def _tar_images(pattern: str, classes: list[str] | None) -> IndexedImages:
    shards = _shards(pattern)
    images, labels = _tar_index(shards)
    classes = classes or [str(c) for c in range(max(labels) + 1)]
    if max(labels) >= len(classes) or min(labels) < 0:
        raise ValueError(f"{pattern}: labels in [{min(labels)}, {max(labels)}] outside the {len(classes)} classes")

    def read(i: int):
        s, offset, size, name = images[i]
        with open(shards[s], "rb") as f:
            f.seek(offset)
            return f.read(size), f"{shards[s]}:{name}"

    names = [(Path(shards[s]).name, n, y) for (s, _, _, n), y in zip(images, labels, strict=True)]
    digest = hashlib.sha256(repr(names).encode())
    return IndexedImages(read, labels, classes, f"wds:{digest.hexdigest()}")


def tar_shards(
    pattern: str, resolution: int, crop: int | tuple[int, ...], test_pattern: str | None = None
) -> ImageData:
    """webdataset shards ``pattern`` (brace-expanded) as the train split, ``test_pattern``'s as the
    test split, labels from each sample's ``.cls`` (class names: the label numbers)."""
    train = _tar_images(pattern, None)
    train.transform = view_transform(resolution, resolution)
    test = None
    if test_pattern is not None:
        test = _tar_images(test_pattern, train.classes)
        test.transform = view_transform(resolution, crop)
    name = Path(pattern).name.split("{")[0].rstrip("-_.") or "shards"
    return ImageData(train, with_transform(train, view_transform(resolution, crop)), test, train.classes, name)
