"""The synthetic set: image parameterisation, initialisation, storage and export.

Parameterisation (LGM's pyramid, which SFM inherits; ``GeorgeCazenavette/linear-gradient-matching``,
``synsets/pyramid.py``): an image
is ``sigmoid(2 * D(sum_l up(P_l)))`` where ``P_l`` are levels of resolution ``start, 2 start,
..., resolution`` upsampled bilinearly to full size and ``D`` is the fixed 3x3 colour
decorrelation matrix (Olah et al. 2017) divided by its largest column norm.  Training starts
with the coarsest level; the next level is added at steps ``extent + 1``, ``2 extent + 1``,
... (201, 401, ... by default: the authors' ``(step - 1) % extent == 0 and step > 1``), existing
levels scaled by old/new level count, the new one noise / new count, and the optimiser state is
reset, as in LGM.  ``param="pixels"`` is the same machinery with the finest level alone.

``channels="grey"`` (not the papers'; for grey data such as the demo's digits): every level has
one channel, there is no colour decorrelation, and the rendered grey image is replicated to RGB.

Initialisation: ``"noise"`` (random colours growing into images) or ``"real"`` (given real
images: every level is active from the start and the finest holds the inverse of the
image, so step 0 renders the real images exactly).

Storage: the levels are plain tensors on a *storage* device -- the compute device, or
exact-size page-locked host memory for ``offload`` (:mod:`fastsfm.distill.pinned`: the set pins what it
holds, and a new level is drawn straight into its destination) -- and are handed out a chunk of
images at a time (:meth:`SyntheticSet.chunk`): views when resident, copies when offloaded.  Every random
number is keyed by the image's global index (:mod:`fastsfm.rng`), so a set sharded over
ranks, chunked or offloaded holds exactly the images of the single-process set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import rng
from ..config import Channels, Init, Param, choices
from . import pinned

__all__ = ["SyntheticSet", "COLOR_DECORRELATION", "upsample_matrix", "level_sizes"]

COLOR_DECORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_NOISE_BATCH = 256  # images per batch when drawing a new level's noise (bounds temporary memory)


def upsample_matrix(size: int, resolution: int) -> Tensor:
    """(resolution, size) float64 matrix ``A`` of bilinear upsampling along one axis, half-pixel
    centres (``align_corners=False``), no antialiasing: ``A @ x @ A.T`` is LGM's ``Upsample_256``
    of an (size, size) image ``x``.  Output pixel i samples ``(i + 0.5) * size / resolution - 0.5``,
    clamped at 0, between its two neighbors (the last one repeated at the edge)."""
    pos = ((torch.arange(resolution, dtype=torch.float64) + 0.5) * (size / resolution) - 0.5).clamp(min=0.0)
    low = pos.floor().long()
    frac = pos - low
    rows = torch.arange(resolution)
    out = torch.zeros(resolution, size, dtype=torch.float64)
    out.index_put_((rows, low), 1.0 - frac, accumulate=True)
    out.index_put_((rows, (low + 1).clamp(max=size - 1)), frac, accumulate=True)
    return out


def level_sizes(start: int, resolution: int) -> list[int]:
    """Resolutions of a pyramid's levels: ``start``, doubling, then ``resolution`` (``start`` capped at it)."""
    start = min(start, resolution)
    sizes = [start]
    while sizes[-1] * 2 < resolution:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != resolution:
        sizes.append(resolution)
    return sizes


class SyntheticSet:
    """``num_classes * ipc`` learnable images with labels ``[f]*ipc + [f+1]*ipc + ...``
    (``f = first_class``, nonzero for a rank's shard of classes under torch.distributed).

    ``levels`` (list of (N, K, s, s) float32 tensors on ``storage``, K = 3, or 1 for grey) are
    the parameters; :meth:`render` / :meth:`render_levels` give (N, 3, R, R) images in [0, 1].
    """

    def __init__(
        self,
        num_classes: int,
        ipc: int,
        resolution: int,
        param: Param = "pyramid",
        init: Init = "noise",
        real_images: Tensor | None = None,
        start_res: int = 1,
        extent: int = 200,
        decorrelate: bool = True,
        seed: int = 0,
        first_class: int = 0,
        storage: str | torch.device = "cpu",
        offload: bool = False,
        channels: Channels = "rgb",
    ):
        if param not in choices(Param):
            raise ValueError(f"param must be one of {choices(Param)}, got {param!r}")
        if init not in choices(Init):
            raise ValueError(f"init must be one of {choices(Init)}, got {init!r}")
        if num_classes < 1 or ipc < 1 or resolution < 1:
            raise ValueError(f"need num_classes, ipc, resolution >= 1, got {num_classes}, {ipc}, {resolution}")
        n = num_classes * ipc
        self.num_classes, self.ipc, self.resolution, self.extent, self.seed = num_classes, ipc, resolution, extent, seed
        self.storage, self.offload = torch.device(storage), offload
        self.sizes = [resolution] if param == "pixels" else level_sizes(start_res, resolution)
        classes = torch.arange(first_class, first_class + num_classes)
        self.labels = classes.repeat_interleave(ipc)
        self.image_ids = torch.arange(first_class * ipc, first_class * ipc + n)
        decor = COLOR_DECORRELATION / COLOR_DECORRELATION.norm(dim=0).max()
        if channels not in choices(Channels):
            raise ValueError(f"channels must be one of {choices(Channels)}, got {channels!r}")
        self.channels = 3 if channels == "rgb" else 1
        self.decor = decor if decorrelate and self.channels == 3 else torch.eye(self.channels)
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}
        if init == "real":
            if real_images is None or real_images.shape != (n, 3, resolution, resolution):
                got = None if real_images is None else tuple(real_images.shape)
                raise ValueError(
                    f"init='real' needs real_images of shape ({n}, 3, {resolution}, {resolution}), got {got}"
                )
            pixels = real_images.float() if self.channels == 3 else real_images.float().mean(1, keepdim=True)
            logits = 0.5 * torch.logit(pixels.clamp(1e-3, 1 - 1e-3))
            finest = torch.einsum("ij,njhw->nihw", torch.linalg.inv(self.decor), logits)
            zeros = [self.store(torch.zeros(n, self.channels, s, s)) for s in self.sizes[:-1]]
            self.levels = zeros + [self.store(finest)]
        else:
            self.levels = [self._noise(0, self.storage, 1.0)]

    @property
    def num_images(self) -> int:
        return self.labels.numel()

    def bytes_per_image(self, final: bool = False) -> int:
        """Bytes of one image's parameters: its current levels, or (``final``) all of them."""
        sizes = self.sizes if final else [level.shape[-1] for level in self.levels]
        return 4 * self.channels * sum(s * s for s in sizes)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """An uninitialised tensor on the storage device (exact-size page-locked host memory when
        offloaded, :mod:`fastsfm.distill.pinned`)."""
        if self.offload and self.storage.type == "cpu":
            return pinned.empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=self.storage)

    def store(self, t: Tensor) -> Tensor:
        """A copy of ``t`` (its dtype) on the storage device (see :meth:`empty`)."""
        out = self.empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def on_device(self, name: str, device: torch.device) -> Tensor:
        """``labels``, ``image_ids`` or ``decor`` on ``device``, copied once (no copy, hence no
        host synchronisation, on later steps)."""
        key = (name, torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(key[1])
        return self._on_device[key]

    def _noise(self, level: int, device: torch.device, scale: float) -> Tensor:
        """``scale`` * N(0, 1) of level ``level`` for every image, keyed by (seed, level, global image
        id), drawn on ``device`` a batch of images at a time straight into a new storage tensor."""
        size = self.sizes[level]
        out = self.empty((self.num_images, self.channels, size, size))
        ids = self.on_device("image_ids", device)
        for start in range(0, self.num_images, _NOISE_BATCH):
            keys = rng.derive(rng.derive(self.seed, rng.PYRAMID_STREAM, level), ids[start : start + _NOISE_BATCH])
            out[start : start + _NOISE_BATCH].copy_(rng.normal(keys, (self.channels, size, size)).mul_(scale))
        return out

    def grow(self, step: int, device: str | torch.device | None = None) -> bool:
        """Add the next level at its first step (``count * extent + 1``, the authors' schedule); True if added.

        Existing levels are scaled in place by ``count / (count + 1)`` and the new one is
        N(0, 1) / (count + 1), drawn on ``device`` (default: the storage device).
        """
        count = len(self.levels)
        if count >= len(self.sizes) or step < count * self.extent + 1:
            return False
        for level in self.levels:
            level.mul_(count / (count + 1))
        device = torch.device(device) if device is not None else self.storage
        self.levels.append(self._noise(count, device, 1 / (count + 1)))
        return True

    def chunk(self, start: int, stop: int, device: str | torch.device, requires_grad: bool = False) -> list[Tensor]:
        """The levels of images ``start:stop`` on ``device``: views of the storage when it is that
        device and the set is not offloaded (an optimiser step on them updates the set), copies
        otherwise (offloaded sets always hand out copies, on CPU too); leaves with ``requires_grad``."""
        device = torch.device(device)
        out = []
        for level in self.levels:
            part = level[start:stop].detach()
            if part.device != device or self.offload:
                part = part.to(device, non_blocking=True, copy=True)
            out.append(part.requires_grad_(requires_grad))
        return out

    def _upsamplers(self, sizes: tuple[int, ...], like: Tensor) -> tuple[list[Tensor], Tensor]:
        """The coarse levels' :func:`upsample_matrix` ``A_l`` (R, S_l) and ``[A_1 | ... | A_k]`` (R, sum S_l),
        in ``like``'s dtype on its device, made once per pyramid."""
        key = (f"upsample {sizes} {like.dtype}", like.device)
        if key not in self._on_device:
            parts = [upsample_matrix(size, self.resolution).to(like.device, like.dtype) for size in sizes]
            self._on_device[key] = (parts, torch.cat(parts, 1))
        return self._on_device[key]

    def render_levels(self, levels: list[Tensor]) -> Tensor:
        """Images (n, 3, R, R) in [0, 1] from the levels of n images (differentiable).

        ``sum_l A_l Q_l A_l^T`` over the coarser levels Q_l (n, c, S, S), with A_l the (R, S)
        bilinear matrix (the numbers of ``F.interpolate(mode="bilinear")``), is **one matrix
        product** ``[A_1 Q_1 | ... | A_k Q_k] @ [A_1 | ... | A_k]^T`` plus the finest level; its
        backward is matrix products too, where interpolate's CUDA backward scatters every output
        pixel into the input with atomic adds (all 65,536 of a 256 px plane into one pixel for the
        1x1 level).  The colour decorrelation is a matrix product over the channels (contiguous
        in both directions, where an einsum's permuted layout cloned the gradient per level)."""
        r = self.resolution
        coarse = [level for level in levels if level.shape[-1] != r]
        total = next((level for level in levels if level.shape[-1] == r), None)
        if coarse:
            parts, stacked = self._upsamplers(tuple(level.shape[-1] for level in coarse), coarse[0])
            left = torch.cat([a @ level for a, level in zip(parts, coarse, strict=True)], -1)  # (n, c, R, sum S)
            total = left @ stacked.T if total is None else torch.add(total, left @ stacked.T)
        n, c = total.shape[:2]
        decor = self.on_device("decor", total.device).to(total.dtype)
        images = torch.sigmoid(2.0 * (decor @ total.reshape(n, c, r * r))).view(n, -1, r, r)
        return images if self.channels == 3 else images.expand(-1, 3, -1, -1)

    @torch.no_grad()
    def render(
        self, start: int = 0, stop: int | None = None, device: str | torch.device | None = None, batch: int = 256
    ) -> Tensor:
        """Images ``start:stop`` (default all) rendered on ``device`` (default: storage), returned
        on the storage device, ``batch`` images at a time."""
        stop = self.num_images if stop is None else stop
        device = self.storage if device is None else device
        parts = [
            self.render_levels(self.chunk(a, min(a + batch, stop), device)).to(self.storage)
            for a in range(start, stop, batch)
        ]
        return torch.cat(parts)

    def state(self) -> dict[str, Tensor]:
        """The levels, for checkpoints (``level_0 ... level_k``)."""
        return {f"level_{i}": level for i, level in enumerate(self.levels)}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Restore levels saved by :meth:`state` (their count may exceed the current one)."""
        count = len([k for k in tensors if k.startswith("level_")])
        if count < 1 or count > len(self.sizes):
            raise ValueError(f"checkpoint has {count} pyramid levels; this set allows 1..{len(self.sizes)}")
        for i in range(count):
            expected = (self.num_images, self.channels, self.sizes[i], self.sizes[i])
            if tuple(tensors[f"level_{i}"].shape) != expected:
                raise ValueError(
                    f"checkpoint level {i} has shape {tuple(tensors[f'level_{i}'].shape)}, "
                    f"this synthetic set expects {expected}"
                )
        self.levels = [self.store(tensors[f"level_{i}"].float()) for i in range(count)]
