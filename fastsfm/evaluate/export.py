"""A distilled set as an image folder: ``<out>/<class name>/<image>.png`` plus ``synset.json``.

The folder is what ``fastsfm eval --synset DIR``, torchvision's ``ImageFolder``, timm's training
scripts and LGM's evaluation read.  Images are written as lossless 8-bit RGB PNGs at the set's
resolution: the only change is the rounding of each channel to 1/255 (at most 1/510 per value);
``README.md`` reports what that does to the accuracy on the demo.  ``synset.json`` keeps the
set's metadata (method, backbone, dataset, IPC, configuration, class names, source).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.setfile import load_images
from ..io import atomic_folder

__all__ = ["export_image_folder", "to_uint8", "SET_JSON"]

SET_JSON = "synset.json"
"""The metadata file beside the class folders."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``images`` (N, 3, R, R) in [0, 1] as (N, R, R, 3) uint8, rounded to the nearest level."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _check_names(names: list[str]) -> None:
    bad = [n for n in names if not n or n in (".", "..") or "/" in n or "\0" in n or n != n.strip()]
    if bad or len(set(names)) != len(names):
        raise ValueError(
            f"class names must be distinct folder names (no '/', not empty or '.'), got {bad[:5] or names}"
        )


def export_image_folder(synset: str | Path, out: str | Path, class_names: list[str] | None = None) -> Path:
    """Write the set ``synset`` (a ``synset.safetensors`` file or a run folder holding one) to the
    image folder ``out`` (which must not exist yet, or be empty); return ``out``.

    Class folder names are ``class_names`` (those of the statistics) or the names stored in the
    set's metadata.  The folder appears whole or not at all: it is written beside ``out`` and
    renamed into place.
    """
    path = Path(synset)
    if path.is_dir():
        path = path / "synset.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no synthetic set at {synset} (a synset.safetensors file or a run folder)")
    images, labels, meta = load_images(path)
    names = class_names if class_names is not None else json.loads(meta.get("class_names", "null") or "null")
    num_classes = int(meta.get("num_classes", 0)) or (int(labels.max()) + 1)
    if names is None:
        names = [str(c) for c in range(num_classes)]
    if len(names) != num_classes or int(labels.max()) >= len(names):
        raise ValueError(f"{path} has {num_classes} classes, but {len(names)} class names were given")
    _check_names(names)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: choose a new --out")
    with atomic_folder(out) as tmp:
        pixels = to_uint8(images)
        counts: dict[int, int] = {}
        for image, label in zip(pixels, labels.tolist(), strict=True):
            folder = tmp / names[label]
            folder.mkdir(exist_ok=True)
            Image.fromarray(image, mode="RGB").save(folder / f"{counts.get(label, 0):05d}.png", optimize=False)
            counts[label] = counts.get(label, 0) + 1
        info = {k: v for k, v in meta.items() if k != "class_names"}
        info.update(
            {
                "class_names": names,
                "source": str(path),
                "images": len(labels),
                "resolution": int(images.shape[-1]),
                "encoding": "8-bit RGB PNG (each value rounded to 1/255)",
            }
        )
        (tmp / SET_JSON).write_text(json.dumps(info, indent=1))
    return out
