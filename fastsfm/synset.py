"""The synthetic set: image parameterisation, initialisation and export.

Parameterisation (LGM's pyramid, which SFM's paper inherits; ``shared/references/lgm.md``):
an image is ``sigmoid(2 * D(sum_l up(P_l)))`` where ``P_l`` are levels of resolution
``start, 2*start, ..., resolution`` upsampled bilinearly to full size and ``D`` is the fixed
3x3 colour-decorrelation matrix (Olah et al. 2017), normalised by its largest column norm.
Training starts with the coarsest level only; every ``extent`` steps the next finer level is
added (existing levels scaled by old/new level count, the new one noise / new count) and
the optimiser is reset, as in LGM.  ``param="pixels"`` is the same machinery with the
finest level alone.

Initialisation: ``"noise"`` (random colours growing into images) or ``"real"`` (given real
images: every level is active from the start and the finest holds the inverse of the
image, so step 0 renders the real images exactly).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import atomic_save_safetensors, read_safetensors

__all__ = ["SyntheticSet", "COLOR_DECORRELATION", "save_grid", "save_images"]

COLOR_DECORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def _level_sizes(start: int, resolution: int) -> list[int]:
    sizes = [start]
    while sizes[-1] * 2 < resolution:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != resolution:
        sizes.append(resolution)
    return sizes


class SyntheticSet(nn.Module):
    """``num_classes * ipc`` learnable images with labels ``[f]*ipc + [f+1]*ipc + ...``
    (``f = first_class``, nonzero for a rank's shard of classes under torch.distributed).

    ``render()`` -> (N, 3, R, R) in [0, 1].  ``grow(step)`` adds a pyramid level when the
    schedule says so and returns True (the caller then resets its optimiser).
    """

    def __init__(
        self,
        num_classes: int,
        ipc: int,
        resolution: int,
        param: str = "pyramid",
        init: str = "noise",
        real_images: Tensor | None = None,
        start_res: int = 1,
        extent: int = 200,
        decorrelate: bool = True,
        seed: int = 0,
        first_class: int = 0,
    ):
        super().__init__()
        if param not in ("pyramid", "pixels"):
            raise ValueError(f"param must be 'pyramid' or 'pixels', got {param!r}")
        if init not in ("noise", "real"):
            raise ValueError(f"init must be 'noise' or 'real', got {init!r}")
        if num_classes < 1 or ipc < 1 or resolution < 1:
            raise ValueError(f"need num_classes, ipc, resolution >= 1, got {num_classes}, {ipc}, {resolution}")
        n = num_classes * ipc
        self.num_classes, self.ipc, self.resolution = num_classes, ipc, resolution
        self.param, self.extent = param, extent
        self.sizes = [resolution] if param == "pixels" else _level_sizes(min(start_res, resolution), resolution)
        classes = torch.arange(first_class, first_class + num_classes)
        self.register_buffer("labels", classes.repeat_interleave(ipc))
        decor = COLOR_DECORRELATION / COLOR_DECORRELATION.norm(dim=0).max()
        self.register_buffer("decor", decor if decorrelate else torch.eye(3))
        self.levels = nn.ParameterList()
        gen = torch.Generator().manual_seed(seed)
        if init == "real":
            if real_images is None or real_images.shape != (n, 3, resolution, resolution):
                got = None if real_images is None else tuple(real_images.shape)
                raise ValueError(
                    f"init='real' needs real_images of shape ({n}, 3, {resolution}, {resolution}), got {got}"
                )
            for size in self.sizes[:-1]:
                self.levels.append(nn.Parameter(torch.zeros(n, 3, size, size)))
            logits = 0.5 * torch.logit(real_images.float().clamp(1e-3, 1 - 1e-3))
            inv = torch.linalg.inv(self.decor)
            self.levels.append(nn.Parameter(torch.einsum("ij,njhw->nihw", inv, logits)))
        else:
            self.levels.append(nn.Parameter(torch.randn(n, 3, self.sizes[0], self.sizes[0], generator=gen)))

    @property
    def num_images(self) -> int:
        return self.labels.numel()

    def grow(self, step: int) -> bool:
        """Add the next level if ``step`` reached its start (``len(levels) * extent``)."""
        count = len(self.levels)
        if count >= len(self.sizes) or step < count * self.extent:
            return False
        with torch.no_grad():
            for level in self.levels:
                level.mul_(count / (count + 1))
            size = self.sizes[count]
            ref = self.levels[0]
            # Global RNG: its state is checkpointed, so a resumed run grows the same level.
            noise = torch.randn(ref.shape[0], 3, size, size) / (count + 1)
            self.levels.append(nn.Parameter(noise.to(ref.device)))
        return True

    def render(self) -> Tensor:
        r = self.resolution
        total = sum(
            level if level.shape[-1] == r else F.interpolate(level, size=(r, r), mode="bilinear", align_corners=False)
            for level in self.levels
        )
        return torch.sigmoid(2.0 * torch.einsum("ij,njhw->nihw", self.decor, total))

    def level_tensors(self) -> dict[str, Tensor]:
        return {f"level_{i}": level.detach() for i, level in enumerate(self.levels)}

    def load_levels(self, tensors: dict[str, Tensor]) -> None:
        """Restore levels saved by :meth:`level_tensors` (their count may exceed the current one)."""
        count = len([k for k in tensors if k.startswith("level_")])
        if count < 1 or count > len(self.sizes):
            raise ValueError(f"checkpoint has {count} pyramid levels; this set allows 1..{len(self.sizes)}")
        for i in range(count):
            expected = (self.num_images, 3, self.sizes[i], self.sizes[i])
            if tuple(tensors[f"level_{i}"].shape) != expected:
                raise ValueError(
                    f"checkpoint level {i} has shape {tuple(tensors[f'level_{i}'].shape)}, "
                    f"this synthetic set expects {expected}"
                )
        device = self.labels.device
        self.levels = nn.ParameterList([nn.Parameter(tensors[f"level_{i}"].to(device).clone()) for i in range(count)])

    def save(self, path: str | Path, meta: dict[str, str]) -> None:
        """Export rendered images (N, 3, R, R) float32 and labels (N,) to safetensors."""
        with torch.no_grad():
            save_images(
                path, self.render(), self.labels, {**meta, "ipc": str(self.ipc), "num_classes": str(self.num_classes)}
            )

    @staticmethod
    def load_images(path: str | Path) -> tuple[Tensor, Tensor, dict[str, str]]:
        """Read an exported set: ``(images, labels, metadata)``."""
        tensors, meta = read_safetensors(path)
        return tensors["images"], tensors["labels"], meta


def save_images(path: str | Path, images: Tensor, labels: Tensor, meta: dict[str, str]) -> None:
    """Atomically write an image set: ``images`` (N, 3, R, R), ``labels`` (N,), string metadata."""
    atomic_save_safetensors({"images": images, "labels": labels}, path, meta)


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
