"""The single differentiable augmentation pass applied to the synthetic batch each step.

SFM augments the synthetic images *once* per step (LGM augments several copies).  The
operations are LGM's (``shared/references/lgm.md``): per-image horizontal flip (p=0.5),
random-resized crop (scale 0.08-1, aspect 3/4-4/3, bilinear) and, with probability 0.5,
additive Gaussian noise of std 0.2 in [0, 1] pixel space (mean 0, as in LGM's current
code; no clipping, so gradients are never cut).  All of them are torchvision
``transforms.v2`` operations on tensors, which back-propagate to the input pixels.

Parameters are drawn per image (v2 draws once per call), hence one call per image; the
draws come from torch's global RNG, so a seeded run is reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

__all__ = ["SinglePassAugment"]


class SinglePassAugment(nn.Module):
    """``(N, 3, H, W)`` in [0, 1] -> ``(N, 3, size, size)``, differentiable, fresh parameters per image.

    Args:
        size: output resolution (the backbone's input size).
        scale: random-resized-crop area range.
        noise_std: std of the additive noise; ``noise_p`` its probability; 0 disables it.
        flip: random horizontal flips.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        noise_std: float = 0.2,
        noise_p: float = 0.5,
        flip: bool = True,
    ):
        super().__init__()
        ops: list[nn.Module] = [v2.RandomResizedCrop(size, scale=scale, antialias=False)]
        if flip:
            ops.append(v2.RandomHorizontalFlip(0.5))
        if noise_std > 0 and noise_p > 0:
            ops.append(v2.RandomApply([v2.GaussianNoise(mean=0.0, sigma=noise_std, clip=False)], p=noise_p))
        self.transform = v2.Compose(ops)
        self.size = size

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
        return torch.stack([self.transform(img) for img in images])
