"""Image-set files: a distilled (or any) set of images with labels and metadata in one safetensors
file (``synset.safetensors``), and its picture.

Written by the distillation, read by evaluation and export: the format lives here, below both.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..io import atomic_save_safetensors

__all__ = ["SYNSET_FORMAT", "save_images", "load_images", "save_grid"]

SYNSET_FORMAT = "fastsfm-synset-v1"


def save_images(path: str | Path, images: Tensor, labels: Tensor, meta: dict[str, str]) -> None:
    """Atomically write an image set: ``images`` (N, 3, R, R), ``labels`` (N,), string metadata."""
    atomic_save_safetensors({"images": images, "labels": labels}, path, {**meta, "format": SYNSET_FORMAT})


def load_images(path: str | Path, rows: int | None = None) -> tuple[Tensor, Tensor, dict[str, str]]:
    """Read an exported set: ``(images (N, 3, R, R), labels (N,), metadata)``; ``rows``: only the first
    rows (read as a slice of the file).  Anything else -- a statistics file, a checkpoint, a
    truncated or empty file -- is a ``ValueError`` that says what the file holds."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as fh:
            keys, meta = set(fh.keys()), dict(fh.metadata() or {})
            if not {"images", "labels"} <= keys or meta.get("format", SYNSET_FORMAT) != SYNSET_FORMAT:
                raise ValueError(
                    f"{path} is not a synthetic set (a synset.safetensors written by `fastsfm distill`): it holds "
                    f"{sorted(keys)[:5]}{' ...' if len(keys) > 5 else ''} with format {meta.get('format')!r}"
                )
            images = fh.get_slice("images")[:rows] if rows else fh.get_tensor("images")
            labels = fh.get_slice("labels")[:rows] if rows else fh.get_tensor("labels")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors synthetic set: {err}") from err
    if images.dim() != 4 or images.shape[1] != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{path}: expected images (N, 3, R, R) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    return images, labels, meta


def save_grid(images: Tensor, labels: Tensor, class_names: list[str], path: str | Path, title: str = "") -> None:
    """PNG grid, one row per class (at most 20 rows and 10 images per row shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(set(labels.tolist()))[:20]
    per_row = min(10, max(int((labels == c).sum()) for c in classes))
    fig, axes = plt.subplots(
        len(classes), per_row, figsize=(1.2 * per_row + 1, 1.2 * len(classes) + 0.4), squeeze=False
    )
    for r, c in enumerate(classes):
        row = images[labels == c][:per_row]
        for j in range(per_row):
            ax = axes[r][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(row[j].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        axes[r][0].text(-0.1, 0.5, class_names[c], transform=axes[r][0].transAxes, ha="right", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
