"""torch.hub DINOv2's position embedding in timm's ``VisionTransformer``.

torch.hub's DINOv2 keeps its native 37x37 position table and re-interpolates it **at every
forward** to the input's patch grid (its ``interpolate_pos_encoding``); timm would resample the
table once at load, with antialiasing -- a different table.  :func:`use_hub_positions` makes a timm
model (built at its native size with ``dynamic_img_size=True``) compute the hub's.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["use_hub_positions"]


def use_hub_positions(model: nn.Module) -> None:
    """Replace ``model._pos_embed`` (timm's ``VisionTransformer``) by the hub's (:func:`_hub_pos_embed`)."""
    model._pos_embed = types.MethodType(_hub_pos_embed, model)


def _hub_pos_embed(self, x: Tensor) -> Tensor:
    """torch.hub DINOv2's position embedding, as a replacement of timm's ``VisionTransformer._pos_embed``:
    the native table (37x37 for DINOv2) re-interpolated at every forward to the patch grid of ``x``
    (B, H, W, C): bicubic with ``scale_factor = ((H + 0.1) / 37, (W + 0.1) / 37)``, no antialias,
    computed in float32 (the hub's ``interpolate_pos_encoding``)."""
    b, h, w, c = x.shape
    table = self.pos_embed.float()
    cls_pos, patch_pos = table[:, :1], table[:, 1:]
    n = math.isqrt(patch_pos.shape[1])
    if (h, w) != (n, n):
        grid = patch_pos.reshape(1, n, n, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic", align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, c)
    tokens = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
    return self.pos_drop(tokens + torch.cat([cls_pos, patch_pos], dim=1).to(tokens.dtype))
