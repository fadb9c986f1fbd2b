"""Images for datasets: the views every dataset gives, adapters, sets of images, loaders.

Datasets by name (the embedded digits, ImageFolders, ImageNet subsets, torchvision) are
:mod:`fastsfm.data.datasets`; this module holds what they are built from.

Every dataset yields ``(image, label)`` with images as float tensors (3, H, W) in [0, 1]:
normalisation belongs to the backbone (:mod:`fastsfm.models.backbones`), so statistics, synthetic
images and probes all see pixels the same way.

Views of the real images, as the authors' loaders (``einsteinxia/SFM``, ``data/dataloaders``):

* ``train``: resized to ``resolution`` (shorter side) and centre-cropped to ``resolution``
  (256): the synthetic resolution, for real-image initialisation, LGM's real batches and
  the real-image baselines (which are then augmented like synthetic images);
* ``train_eval`` and ``test``: resized to ``resolution`` and centre-cropped to ``crop`` (224,
  the backbone's input), never augmented: class statistics, baseline selection, test accuracy.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset, default_collate

__all__ = [
    "BadImageError",
    "read_image",
    "decode_image",
    "to_float",
    "uint8_views",
    "check_shared_memory",
    "IndexedImages",
    "Checked",
    "collate_checked",
    "ImageData",
    "image_set_folder",
    "center_crop",
    "CropViews",
    "labels_of",
    "fingerprint",
    "stack_images",
    "view_transform",
    "with_transform",
    "default_workers",
    "loader_kwargs",
    "shm_items",
]


class BadImageError(ValueError):
    """An image file that cannot be decoded: its path and the decoder's reason, in one line."""


def read_image(path: str) -> object:
    """The RGB PIL image of a file, decoded in full now (a truncated file fails here, not later in a
    transform); :class:`BadImageError` naming the file when it cannot be decoded.  CMYK, greyscale,
    palette and PNG-named-JPEG files decode (PIL reads the content, not the name)."""
    with open(path, "rb") as f:
        return decode_image(f, path)


def decode_image(source, name: str) -> object:
    """The RGB PIL image of an open binary file or ``bytes`` (``name`` says where it came from in the
    :class:`BadImageError` of a file that cannot be decoded)."""
    import io

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's decode failures
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadImageError(f"cannot decode image {name}: {reason}") from None


class IndexedImages(Dataset):
    """Images read by index from some store (Hugging Face ``datasets``, tar shards, a flat folder):
    ``read(i)`` gives the encoded bytes of image ``i`` (or an open file) and its name, ``targets``
    the labels (read without any image), ``classes`` the class names, ``content_id`` what
    :func:`fingerprint` hashes.  Behaves as an ImageFolder for the rest of the package
    (:func:`with_transform`, :func:`labels_of`)."""

    def __init__(self, read, targets: list[int], classes: list[str], content_id: str, transform=None):
        self.read, self.targets, self.classes = read, list(targets), list(classes)
        self.content_id, self.transform = content_id, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        data, name = self.read(i)
        image = decode_image(data, name)
        return (self.transform(image) if self.transform else image), self.targets[i]


class Checked(Dataset):
    """``dataset`` whose undecodable items come back as ``(None, label, message)`` instead of raising
    in a loader worker (whose re-raised error carries a traceback): :func:`collate_checked` sets them
    apart, so a statistics pass can stop with one line naming the file, or skip and record it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except BadImageError as err:
            return None, -1, str(err)


def collate_checked(items: list) -> tuple[object, Tensor | None, list[str]]:
    """``(images, labels, bad)`` of a batch of :class:`Checked` items: the decodable ones collated
    (None and None when there are none), the messages of the others."""
    good = [item for item in items if item[0] is not None]
    bad = [item[2] for item in items if item[0] is None]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, bad


@dataclass
class ImageData:
    """Views of a train split (``train`` at the synthetic resolution, ``train_eval`` centre-cropped
    to the backbone's input) and a test split, with the class names."""

    train: Dataset
    train_eval: Dataset
    test: Dataset | None
    class_names: list[str]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central ``size`` x ``size`` crop of images (..., H, W)."""
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return images[..., top : top + size, left : left + size].contiguous()


def view_transform(resolution: int, crop: int | tuple[int, ...], uint8: bool = False):
    """Resize the shorter side to ``resolution``, centre-crop ``crop``, float RGB in [0, 1] (``uint8``:
    the same pixels before that conversion, which :func:`to_float` makes later, bit for bit).

    A tuple of crops gives a tuple of views, one centre crop per size, of one decoded and resized
    image: the statistics of several backbones with different input sizes in one pass
    (:func:`fastsfm.stats.dataset_stats_many`), each view equal to the one-crop transform's."""
    from torchvision.transforms import v2

    scale = [] if uint8 else [v2.ToDtype(torch.float32, scale=True)]
    if isinstance(crop, tuple):
        steps = [*scale, v2.Lambda(_to_rgb), v2.Lambda(functools.partial(_crops, crop))]
    else:
        steps = [v2.CenterCrop(crop), *scale, v2.Lambda(_to_rgb)]
    transform = v2.Compose([v2.ToImage(), v2.Resize(resolution, antialias=True), *steps])
    transform.fastsfm_view = (resolution, crop)  # what uint8_views rebuilds it from
    return transform


def to_float(images: Tensor) -> Tensor:
    """uint8 images as float32 in [0, 1] exactly as the float view makes them (torchvision's
    ``ToDtype(scale=True)``: a multiplication by 1/255); float images unchanged."""
    return images.to(torch.float32).mul_(1.0 / 255) if images.dtype == torch.uint8 else images


def uint8_views(dataset: Dataset) -> Dataset:
    """``dataset`` with its :func:`view_transform` giving uint8 pixels (a quarter of the bytes a
    loader worker hands over through shared memory; :func:`to_float` on the device after the copy),
    or ``dataset`` itself when its images are not decoded by a view transform (tensors in memory)."""
    view = getattr(getattr(dataset, "transform", None), "fastsfm_view", None)
    return dataset if view is None else with_transform(dataset, view_transform(*view, uint8=True))


def check_shared_memory(batch_bytes: int, workers: int, prefetch: int = 2) -> None:
    """Switch the loader workers to file-system sharing (with a warning) when the batches they keep
    in flight do not fit in half of ``/dev/shm`` -- a container's default 64 MB would otherwise kill
    them with a bus error mid-pass."""
    if workers > 0 and shm_items(batch_bytes, workers, prefetch) < 1:
        import logging

        import torch.multiprocessing as mp

        logging.getLogger(__name__).warning(
            "/dev/shm cannot hold %d workers x %d batches of %.0f MB: loader workers share batches through "
            "files instead (slower; give the container --shm-size)",
            workers,
            prefetch,
            batch_bytes / 2**20,
        )
        mp.set_sharing_strategy("file_system")


def _crops(sizes: tuple[int, ...], image: Tensor) -> tuple[Tensor, ...]:
    from torchvision.transforms.v2 import functional

    return tuple(functional.center_crop(image, [size, size]) for size in sizes)


class CropViews(Dataset):
    """In-memory images seen as several centre crops: item ``i`` is ``((crop_1, ..., crop_k), label)``,
    one crop per size of ``sizes`` (:func:`center_crop`): the tuple-of-views form of
    :func:`view_transform` for datasets held as tensors."""

    def __init__(self, images: Tensor, labels: Tensor, sizes: tuple[int, ...]):
        self.views = [center_crop(images, size) for size in sizes]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[tuple[Tensor, ...], Tensor]:
        return tuple(view[i] for view in self.views), self.labels[i]


def with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of a torchvision dataset with another transform (the file list is shared)."""
    other = copy.copy(dataset)
    other.transform = transform
    return other


def _to_rgb(x: Tensor) -> Tensor:
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]


def image_set_folder(root: str | Path, class_names: list[str], resolution: int) -> tuple[Tensor, Tensor]:
    """Images made by another method, one folder per class (``root/<class name>/<image>``), as
    ``(images (N, 3, R, R) in [0, 1], labels (N,))`` with labels in ``class_names``' order.

    Every folder must name a known class and hold at least one image (clear errors otherwise).
    """
    from torchvision import datasets

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in class_names]
    if not folders or unknown:
        raise ValueError(
            f"{root}: expected one folder per class named as the dataset's classes "
            f"({class_names[:3]}...), found {folders[:5] if not unknown else unknown[:5]}"
        )
    try:
        dataset = datasets.ImageFolder(str(root), transform=view_transform(resolution, resolution), loader=read_image)
    except FileNotFoundError as err:  # torchvision: a class folder without images
        raise ValueError(f"{root}: {err}") from err
    index = {name: class_names.index(name) for name in dataset.classes}
    images = stack_images(dataset, range(len(dataset)))
    labels = torch.tensor([index[dataset.classes[y]] for y in dataset.targets], dtype=torch.int64)
    return images, labels


def default_workers() -> int:
    """Data-loading workers of this process: the CPUs it may run on, shared among the processes of
    its node (``LOCAL_WORLD_SIZE`` under torchrun), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_kwargs(device: str | torch.device, workers: int | None = None) -> dict:
    """``DataLoader`` options that keep a device fed: :func:`default_workers` workers unless given,
    and on CUDA pinned batches (asynchronous copies) and persistent workers."""
    workers = default_workers() if workers is None else workers
    cuda = torch.device(device).type == "cuda"
    return {"num_workers": workers, "pin_memory": cuda, "persistent_workers": cuda and workers > 0}


def shm_items(item_bytes: int, workers: int, prefetch: int = 2, free: int | None = None, share: float = 0.5) -> int:
    """Items per batch such that the batches workers keep in flight (``workers * prefetch``) fit in
    ``share`` of the free shared memory (``/dev/shm``, through which workers hand tensors over; a
    container's default is 64 MB).  0: not even one item fits, load in the main process."""
    if free is None:
        try:
            stat = os.statvfs("/dev/shm")
            free = stat.f_bavail * stat.f_frsize
        except OSError:
            return 0
    return int(share * free // (max(workers, 1) * prefetch * max(item_bytes, 1)))


def labels_of(dataset: Dataset) -> Tensor:
    """All labels of a dataset as an int64 tensor, without loading any image."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    for name in ("targets", "_labels", "labels"):  # ImageFolder / CIFAR / MNIST, Flowers102 / Food101, SVHN
        if isinstance(getattr(dataset, name, None), (list, tuple, Tensor)) or hasattr(
            getattr(dataset, name, None), "__array__"
        ):
            return torch.as_tensor(getattr(dataset, name), dtype=torch.int64)
    raise TypeError(f"cannot read labels of {type(dataset).__name__} without loading it; use ImageFolder or tensors")


def stack_images(dataset: Dataset, indices: Tensor | range) -> Tensor:
    """Stack the images at ``indices`` into (K, 3, H, W)."""
    return torch.stack([dataset[int(i)][0] for i in indices])


def fingerprint(dataset: Dataset) -> str:
    """Short content hash identifying a dataset (file list for ImageFolder, bytes for tensors)."""
    h = hashlib.sha256()
    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            h.update(t.contiguous().numpy().tobytes())
    elif hasattr(dataset, "content_id"):
        h.update(dataset.content_id.encode())
    elif hasattr(dataset, "samples"):
        for path, label in dataset.samples:
            h.update(f"{Path(path).relative_to(dataset.root)}:{label};".encode())
    else:
        h.update(f"{type(dataset).__name__}:{len(dataset)}".encode())
    return h.hexdigest()[:16]
