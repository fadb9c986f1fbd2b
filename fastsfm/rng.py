"""Counter-based random numbers: values that are a pure function of integer keys.

Distillation must re-create a chunk's augmentation in its second pass, give every rank the
draws a single process would make, and resume bit for bit.  A stream of draws cannot do
that cheaply (a chunk would have to replay everything before it), so every random number
here is a hash of ``(key, counter)``: the augmentation of image ``i`` in view ``v`` of step
``s`` is derived from ``derive(seed, s, v, i)``, whatever the chunk, rank or device.

The hash is Thomas Mueller's 32-bit integer finaliser (two multiply/xor-shift rounds) on
int64 tensors, with multipliers below 2**30 so that no product leaves int64; uniforms keep
the top 24 bits (exact in float32), normals come from Box-Muller.  Identical on CPU and CUDA.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["derive", "uniform", "normal"]

_MASK = 0xFFFFFFFF
_MUL = 0x045D9F3B
_STEP = 0x27D4EB2D


def _hash32(x: Tensor) -> Tensor:
    """Mix int64 values in [0, 2**32) into [0, 2**32) (in place on ``x``)."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(_MUL).bitwise_and_(_MASK)
    return x.bitwise_xor_(x >> 16)


def derive(base: Tensor | int, *parts: Tensor | int) -> Tensor:
    """A key (int64 tensor, broadcast over all arguments) from a base key and further integers."""
    tensors = [p for p in (base, *parts) if isinstance(p, Tensor)]
    device = tensors[0].device if tensors else None
    key = torch.as_tensor(base, dtype=torch.int64, device=device) & _MASK
    for part in parts:
        part = torch.as_tensor(part, dtype=torch.int64, device=key.device) & _MASK
        key = _hash32((key * _STEP + part + 1) & _MASK)
    return key


def uniform(keys: Tensor, count: int) -> Tensor:
    """(B, count) float32 uniforms in (0, 1), row b a function of ``keys[b]`` only."""
    counters = torch.arange(count, device=keys.device, dtype=torch.int64)
    bits = derive(keys[:, None], counters[None, :]) >> 8
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def normal(keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B, *shape) float32 standard normals, row b a function of ``keys[b]`` only (Box-Muller)."""
    numel = math.prod(shape)
    half = (numel + 1) // 2
    u = uniform(keys, 2 * half)
    radius = torch.sqrt(-2.0 * torch.log(u[:, :half]))
    angle = (2.0 * math.pi) * u[:, half:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], 1)[:, :numel].reshape(-1, *shape)
