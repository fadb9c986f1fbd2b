"""Datasets by name, as the command line, the grid and the Python API spell them.

``load_data(spec, resolution, crop)`` returns an :class:`fastsfm.data.images.ImageData` (train view at the
synthetic resolution, train and test views centre-cropped to the backbone's input) for:

* ``digits`` -- scikit-learn's digits, the embedded default (:func:`digits`);
* ``<imagenet subset>:<root>`` -- ImageNet-1k or one of the authors' subsets on a local copy
  (``imagenet-100:/data/imagenet``; :mod:`fastsfm.data.imagenet`);
* ``torchvision:<Class>:<root>`` -- a ``torchvision.datasets`` class on a local root, never
  downloading (``torchvision:CIFAR10:/data/cifar``);
* ``hf:<path>`` -- a Hugging Face ``datasets`` copy on disk (``save_to_disk`` folder or parquet
  files; :mod:`fastsfm.data.formats`);
* ``wds:<shard pattern>`` -- webdataset tar shards (``wds:/data/in1k/train-{000000..000146}.tar``),
  the test split's pattern as ``--test-data wds:...``;
* anything else -- an ImageFolder root (``root/<class>/<image>``), with the test split's root.

This module sits above :mod:`fastsfm.data.images` and :mod:`fastsfm.data.imagenet` (which it combines): the one
module to open for datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .formats import hf_dataset, tar_shards
from .imagenet import SUBSETS, imagenet_subset
from .images import CropViews, ImageData, center_crop, labels_of, read_image, view_transform, with_transform

__all__ = [
    "DatasetSpec",
    "load_data",
    "digits",
    "image_folder",
    "torchvision_dataset",
    "dataset_defaults",
    "DATASET_DEFAULTS",
]

DATASET_DEFAULTS: dict[str, dict[str, object]] = {
    "digits": {
        "backbone": "digits_vit",
        "resolution": 32,
        "steps": 300,
        "lr": 2e-2,
        "pyramid_extent": 40,
        "classifier_epochs": 100,
        "workers": 0,
    },
}
"""Defaults a dataset owns, for every subcommand (and the demo) that reads it: the embedded digits
carry the demo's settings -- its backbone, 32 px, 300 steps at lr 2e-2 with a pyramid level every
40 steps (the authors' 5000 at 2e-3 every 200 would leave 2 levels after 300 steps), 100 epochs of
the real classifier (the authors' 10 epochs are only 100 steps on 1,257 digits), no loader workers
(the digits are in memory).  Flags given on the command line win; other datasets use the authors'."""


def dataset_defaults(spec: str | None) -> dict[str, object]:
    """The defaults the dataset ``spec`` owns (:data:`DATASET_DEFAULTS`; empty for other datasets)."""
    return dict(DATASET_DEFAULTS.get(spec or "", {}))


def digits(
    image_size: int = 32, crop: int | tuple[int, ...] | None = None, test_fraction: float = 0.3, seed: int = 0
) -> ImageData:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped in its wheel.

    Grey levels 0..16 become RGB in [0, 1], upsampled bilinearly to ``image_size``
    (``train``); ``train_eval``/``test`` are centre crops of ``crop`` (default: the whole
    image; a tuple: a tuple of crops per image, :class:`fastsfm.data.images.CropViews`).  A stratified
    split with a fixed ``seed`` keeps ``test_fraction`` of each class for testing.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).div(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in range(10):
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.cat(test_idx)] = True
    if isinstance(crop, tuple):
        train_eval, test = (CropViews(images[part], labels[part], crop) for part in (~is_test, is_test))
    else:
        cropped = center_crop(images, crop or image_size)
        train_eval, test = (TensorDataset(cropped[part], labels[part]) for part in (~is_test, is_test))
    return ImageData(
        TensorDataset(images[~is_test], labels[~is_test]),
        train_eval,
        test,
        [str(c) for c in range(10)],
        f"digits{image_size}",
    )


def image_folder(
    root: str | Path, resolution: int, crop: int | tuple[int, ...], test_root: str | Path | None = None
) -> ImageData:
    """ImageFolder dataset(s) (``root/<class>/<image>``) in the views of the module docstring."""
    from torchvision import datasets

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected root/<class>/<image> files)")
    train = datasets.ImageFolder(str(root), transform=view_transform(resolution, resolution), loader=read_image)
    test = None
    if test_root is not None:
        test = datasets.ImageFolder(str(test_root), transform=view_transform(resolution, crop), loader=read_image)
        if test.classes != train.classes:
            raise ValueError(f"test classes {test.classes[:5]}... differ from train classes {train.classes[:5]}...")
    return ImageData(
        train, with_transform(train, view_transform(resolution, crop)), test, list(train.classes), root.name
    )


def torchvision_dataset(name: str, root: str | Path, resolution: int, crop: int | tuple[int, ...]) -> ImageData:
    """A ``torchvision.datasets`` class by name on a local ``root``, never downloading: the train
    split (``train=True`` or ``split="train"``) and the test split (``"test"``, else ``"val"``)."""
    import inspect

    from torchvision import datasets

    cls = getattr(datasets, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Dataset)):
        raise ValueError(f"torchvision.datasets has no dataset class {name!r}")
    params = inspect.signature(cls).parameters

    def split(train: bool, transform) -> Dataset:
        kwargs = {"download": False} if "download" in params else {}
        if "train" in params:
            return cls(str(root), train=train, transform=transform, **kwargs)
        if "split" not in params:
            raise ValueError(f"torchvision.datasets.{name} has neither a train nor a split argument")
        for value in ("train",) if train else ("test", "val"):
            try:
                return cls(str(root), split=value, transform=transform, **kwargs)
            except ValueError:
                continue
        raise ValueError(f"torchvision.datasets.{name} has no test or val split")

    try:
        train = split(True, view_transform(resolution, resolution))
        test = split(False, view_transform(resolution, crop))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise FileNotFoundError(
            f"torchvision.datasets.{name} is not under {root} (fastsfm never downloads): {err}"
        ) from err
    classes = list(getattr(train, "classes", [])) or [str(c) for c in range(int(labels_of(train).max()) + 1)]
    return ImageData(train, with_transform(train, view_transform(resolution, crop)), test, classes, name.lower())


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset by name: the one grammar of ``--data`` and of a grid's ``datasets`` entries.

    * ``digits``: the embedded default;
    * ``<imagenet subset>[:<root>]`` (``imagenet-100:/data/imagenet``; :mod:`fastsfm.data.imagenet`);
    * ``torchvision:<Class>[:<root>]`` (``torchvision:CIFAR10:/data/cifar``), never downloading;
    * ``folder:<dir>``: ImageFolders ``dir/train`` and ``dir/val``;
    * ``hf:<path>``: a Hugging Face ``datasets`` copy on disk;
    * ``wds:<pattern>``: webdataset shards, ``test_root`` (``wds:<pattern>`` too) the test split's;
    * anything else: an ImageFolder root, with ``test_root`` the test split's (``--test-data``).

    A root left out of the text is ``root`` (a grid's ``root``; a subset or torchvision dataset
    without any is an error).
    """

    kind: str
    name: str
    root: str | None = None
    test_root: str | None = None

    @classmethod
    def parse(cls, text: str, root: str | None = None, test_root: str | None = None) -> DatasetSpec:
        if text == "digits":
            return cls("digits", "digits")
        if text.startswith("folder:"):
            folder = Path(text.split(":", 1)[1])
            return cls("folder", text, str(folder / "train"), str(folder / "val"))
        if text.startswith(("hf:", "wds:")):
            kind, _, given = text.partition(":")
            test = test_root.partition(":")[2] if test_root and test_root.startswith("wds:") else test_root
            return cls(kind, text, given, test)
        if text.startswith("torchvision:"):
            _, name, given = (text.split(":", 2) + [""])[:3]
            return cls("torchvision", name, cls._root(text, given or root))
        head, _, given = text.partition(":")
        if head in SUBSETS:
            return cls("imagenet", head, cls._root(text, given or root))
        return cls("folder", text, text, test_root)

    @staticmethod
    def _root(text: str, root: str | None) -> str:
        if not root:
            raise ValueError(
                f"dataset {text!r} needs a root (`name:/path`, or the grid's `root`; fastsfm never downloads)"
            )
        return root

    def load(self, resolution: int, crop: int | tuple[int, ...]) -> ImageData:
        """The dataset's :class:`fastsfm.data.images.ImageData` at ``resolution``, centre crops of ``crop``
        (a tuple: a tuple of views per image, one per size, from one decoding)."""
        if self.kind == "digits":
            return digits(resolution, crop)
        if self.kind == "torchvision":
            return torchvision_dataset(self.name, self.root, resolution, crop)
        if self.kind == "imagenet":
            return imagenet_subset(self.root, self.name, resolution, crop)
        if self.kind == "hf":
            return hf_dataset(self.root, resolution, crop)
        if self.kind == "wds":
            return tar_shards(self.root, resolution, crop, self.test_root)
        return image_folder(self.root, resolution, crop, self.test_root)


def load_data(spec: str, resolution: int, crop: int | tuple[int, ...], test_spec: str | None = None) -> ImageData:
    """:meth:`DatasetSpec.load` of ``DatasetSpec.parse(spec, test_root=test_spec)``."""
    return DatasetSpec.parse(spec, test_root=test_spec).load(resolution, crop)
