"""ImageNet and its subsets as the SFM and LGM authors define them, from a local copy (never downloaded).

The authors' loader (``data/dataloaders/imagenet_susbset.py`` in both repositories) filters
ImageNet-1k to a list of class indices (0-999, the sorted-synset order of torchvision's and
timm's ImageNet) and relabels them 0..K-1 **in the listed order**; the lists ship with
fastsfm (``resources/imagenet_subsets.json``): ``imagenet-1k``, ``imagenet-100``,
``imagenette``, ``imagewoof``, ``imagenet-birds``, ``imagenet-fruits``, ``imagenet-cats``
and ``imagenet-a`` ... ``imagenet-e``.

Layout: ``ROOT/train/<wnid>/*`` and ``ROOT/val/<wnid>/*`` -- torchvision's ``ImageNet``
layout once its archives are extracted (its ``meta.bin``, when present, supplies the class
names) or plain class-id folders (names then come from timm's ImageNet synset table).
Only the subset's folders are scanned.  The validation split may also be the flat ILSVRC folder
(``ROOT/val/ILSVRC2012_val_*.JPEG``, the Kaggle and image-net.org download) with its
``LOC_val_solution.csv`` in ``ROOT`` or up to three folders above (the Kaggle copy's
``ILSVRC/Data/CLS-LOC`` root keeps it three folders up).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder

from .images import ImageData, IndexedImages, read_image, view_transform, with_transform

__all__ = ["SUBSETS", "imagenet_subset", "subset_wnids", "check_imagenet_root"]

_RESOURCES = Path(__file__).resolve().parents[1] / "resources"


@functools.cache
def _subsets() -> dict[str, list[int]]:
    return json.loads((_RESOURCES / "imagenet_subsets.json").read_text())["subsets"]


SUBSETS: tuple[str, ...] = tuple(_subsets())


@functools.cache
def _synsets() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_label_name(i) for i in range(1000)]


def subset_wnids(subset: str) -> list[str]:
    """The WordNet ids of a named subset's classes, in the authors' order."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown ImageNet subset {subset!r}; known: {', '.join(SUBSETS)}")
    synsets = _synsets()
    return [synsets[i] for i in _subsets()[subset]]


def _class_names(root: Path, wnids: list[str]) -> list[str]:
    meta = root / "meta.bin"
    if meta.is_file():  # torchvision's ImageNet metadata: wnid -> tuple of names
        try:  # plain data only, as torchvision loads it: a crafted file cannot run code here
            wnid_to_names = torch.load(meta, weights_only=True)[0]
            return [wnid_to_names[w][0] for w in wnids]
        except Exception as err:  # noqa: BLE001 - every failure means the same: not torchvision's meta.bin
            raise ValueError(
                f"{meta} is not torchvision's ImageNet meta.bin (plain data: wnid -> class names); refused to "
                f"load it ({type(err).__name__}: {str(err).splitlines()[0][:160]}); delete it to use timm's names"
            ) from err
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    index = {w: i for i, w in enumerate(_synsets())}
    return [info.index_to_description(index[w]).split(",")[0] for w in wnids]


class _ClassFolders(ImageFolder):
    """An ImageFolder of exactly ``wnids`` (labels 0..K-1 in that order); other folders are not scanned."""

    def __init__(self, root: Path, wnids: list[str], transform):
        self._wnids = wnids
        super().__init__(str(root), transform=transform, loader=read_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._wnids), {w: i for i, w in enumerate(self._wnids)}


VAL_SOLUTION = "LOC_val_solution.csv"
"""The ILSVRC validation labels of the Kaggle / image-net.org layout (``ImageId,PredictionString``,
the string's first word the wnid), beside the flat ``val/`` folder or up to three folders above."""


def _val_solution(root: Path, wnids: list[str]) -> Path | None:
    """The :data:`VAL_SOLUTION` file of a root whose ``val/`` is flat (none of ``wnids``' folders), if
    any.  Looks up the class folders by name (a tree stops at its first), never the 50,000 files."""
    val = root / "val"
    if not val.is_dir() or any((val / w).is_dir() for w in wnids):
        return None
    return next((d / VAL_SOLUTION for d in [root, *list(root.parents)[:3]] if (d / VAL_SOLUTION).is_file()), None)


def _flat_val(root: Path, wnids: list[str], solution: Path, transform) -> IndexedImages:
    """The flat ILSVRC ``val/`` images of ``wnids`` (labels 0..K-1 in that order) from ``solution``."""
    import csv

    index = {w: i for i, w in enumerate(wnids)}
    samples = []
    with open(solution, newline="") as f:
        for row in csv.DictReader(f):
            wnid = row["PredictionString"].split()[0]
            if wnid in index:
                samples.append((root / "val" / f"{row['ImageId']}.JPEG", index[wnid]))
    samples.sort()
    missing = [str(p) for p, _ in samples if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images named in {solution} are missing, e.g. {missing[0]}")
    paths = [p for p, _ in samples]

    def read(i: int):
        return paths[i].read_bytes(), str(paths[i])

    content = ";".join(f"{p.name}:{y}" for p, y in samples)
    return IndexedImages(read, [y for _, y in samples], wnids, f"ilsvrc-val:{content}", transform)


def check_imagenet_root(root: str | Path, subset: str) -> list[str]:
    """Raise a clear error unless ``root`` holds train/ and val/ folders of every class of
    ``subset`` (or a flat val/ with its :data:`VAL_SOLUTION`); return the subset's wnids.  Cheap:
    looks at folder names only."""
    wnids = subset_wnids(subset)
    root = Path(root)
    for split in ("train", "val") if _val_solution(root, wnids) is None else ("train",):
        folder = root / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist: an ImageNet root holds train/<wnid>/ and val/<wnid>/ "
                "folders (torchvision's extracted ImageNet layout or class-id folders)"
            )
        missing = [w for w in wnids if not (folder / w).is_dir()]
        if missing:
            raise ValueError(
                f"{len(missing)} classes of {subset} are missing from {folder}: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
    return wnids


def imagenet_subset(root: str | Path, subset: str, resolution: int, crop: int | tuple[int, ...]) -> ImageData:
    """A named subset of a local ImageNet in the views of :mod:`fastsfm.data.images` (labels in the authors' order)."""
    wnids = check_imagenet_root(root, subset)
    root = Path(root)
    train = _ClassFolders(root / "train", wnids, view_transform(resolution, resolution))
    solution = _val_solution(root, wnids)
    if solution is None:
        test = _ClassFolders(root / "val", wnids, view_transform(resolution, crop))
    else:  # the flat ILSVRC validation folder
        test = _flat_val(root, wnids, solution, view_transform(resolution, crop))
    return ImageData(
        train, with_transform(train, view_transform(resolution, crop)), test, _class_names(root, wnids), subset
    )
