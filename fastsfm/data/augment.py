"""The differentiable augmentation of the SFM and LGM authors, batched, from per-image keys.

Operations and distribution (``GeorgeCazenavette/linear-gradient-matching``, ``augmentation/standard_aug.py``:
the authors' ``AugStandard``), in
their order, each drawn independently per image:

1. horizontal flip with probability 0.5;
2. random-resized crop: area ``s ~ U(0.08, 1)``, log aspect ``~ U(log 3/4, log 4/3)``, box
   ``w = sqrt(s r)``, ``h = sqrt(s / r)`` as fractions of the image, top-left corner uniform
   in ``[0, 1 - w] x [0, 1 - h]``; continuous (``affine_grid`` + ``grid_sample``, bilinear,
   zero padding, ``align_corners=False``) and never rejected, so boxes wider than the image
   (``w > 1``, about 14 % of them) are zero-padded, as in the authors' code;
3. additive Gaussian noise with probability 0.5, std 0.2 and mean ``noise_mean`` in [0, 1]
   pixel space, no clipping.  LGM's code had mean 0.5 (a brightness shift on half the views)
   when both papers were written and 0.0 since a later upstream change; SFM forked before
   it, so the default here is **0.5**; pass ``noise_mean=0.0`` for LGM's current code.

The flip is folded into the crop's affine map (a negative x scale).  That map is axis-aligned, so
the bilinear crop is **separable**: ``out[b, c] = Wy[b] @ image[b, c] @ Wx[b]^T`` with hat-function
weights ``max(0, 1 - |p - j|)`` of each output pixel's source coordinate ``p`` (``grid_sample``'s
``align_corners=False`` convention; zero padding is the weights of pixels outside the image
dropped).  It equals ``affine_grid`` + ``grid_sample`` (tested in float64, values and gradients)
and its backward is two more batched matrix products: no atomic adds (``grid_sample``'s CUDA
backward scatters every output pixel into four input pixels with atomics, so it was neither
deterministic nor fast).  Nothing is drawn from a stream:
every parameter of image ``b`` is a function of ``keys[b]`` (:mod:`fastsfm.rng`), so a
chunk, a rank or a resumed run re-creates the same augmentation exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import rng

__all__ = ["BatchAugment", "AugmentParams"]


@dataclass(frozen=True)
class AugmentParams:
    """Per-image draws (all (B,)): ``flip``/``noise`` bool; crop box ``width``, ``height``,
    ``left``, ``top`` as fractions of the image."""

    flip: Tensor
    width: Tensor
    height: Tensor
    left: Tensor
    top: Tensor
    noise: Tensor


class BatchAugment(nn.Module):
    """``(images (B, 3, H, W) in [0, 1], keys (B,) int64) -> (B, 3, size, size)``, differentiable.

    Args:
        size: output resolution (the backbone's input size, 224 in the papers).
        scale, ratio: random-resized-crop area and aspect ranges.
        flip: random horizontal flips (p = 0.5).
        noise_std, noise_mean, noise_p: the additive noise; ``noise_std=0`` disables it
            (evaluation uses flip + crop only, the authors' ``AugBasic``).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        noise_std: float = 0.2,
        noise_mean: float = 0.5,
        noise_p: float = 0.5,
    ):
        super().__init__()
        self.size, self.scale, self.flip = size, scale, flip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.noise_std, self.noise_mean, self.noise_p = noise_std, noise_mean, noise_p

    def params(self, keys: Tensor) -> AugmentParams:
        """The draws of each key: six uniforms per image."""
        u = rng.uniform(keys, 6)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 1]
        aspect = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[:, 2])
        width, height = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        return AugmentParams(
            flip=(u[:, 0] < 0.5) & self.flip,
            width=width,
            height=height,
            left=u[:, 3] * (1 - width),
            top=u[:, 4] * (1 - height),
            noise=(u[:, 5] < self.noise_p) & (self.noise_std > 0),
        )

    def _weights(self, scale: Tensor, shift: Tensor, pixels: int, like: Tensor) -> Tensor:
        """Bilinear sampling weights (B, size, pixels) along one axis: output pixel i samples the
        normalised coordinate ``scale * x_i + shift`` (``x_i = (2 i + 1) / size - 1``)."""
        grid = (2 * torch.arange(self.size, device=like.device, dtype=like.dtype) + 1) / self.size - 1
        source = ((scale[:, None] * grid + shift[:, None] + 1) * pixels - 1) / 2  # pixel coordinates
        offsets = source[:, :, None] - torch.arange(pixels, device=like.device, dtype=like.dtype)
        return (1 - offsets.abs()).clamp(min=0)

    def forward(self, images: Tensor, keys: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if keys.shape != (images.shape[0],):
            raise ValueError(f"expected one key per image ({images.shape[0]},), got {tuple(keys.shape)}")
        p = self.params(keys.to(images.device))
        sign = 1.0 - 2.0 * p.flip.to(images.dtype)
        wx = self._weights(sign * p.width, sign * (2 * p.left + p.width - 1), images.shape[3], images)
        wy = self._weights(p.height, 2 * p.top + p.height - 1, images.shape[2], images)
        out = wy[:, None] @ images @ wx[:, None].transpose(-1, -2)
        if self.noise_std > 0:
            noise = rng.normal(rng.derive(keys.to(images.device), 7), (3, self.size, self.size)).to(images.dtype)
            out = out + p.noise.to(images.dtype)[:, None, None, None] * (self.noise_std * noise + self.noise_mean)
        return out
