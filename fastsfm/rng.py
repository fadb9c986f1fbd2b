"""Counter-based random numbers: values that are a pure function of integer keys.

Distillation must re-create a chunk's augmentation in its second pass, give every rank the
draws a single process would make, and resume bit for bit.  A stream of draws cannot do
that cheaply (a chunk would have to replay everything before it), so every random number
here is a function of ``(key, counter)``: the augmentation of image ``i`` in view ``v`` of
step ``s`` comes from the key ``derive(seed, stream, s, v, i)``, whatever the chunk, rank or
device.

**The generator.**  ``mix64`` is the 64-bit finaliser of SplitMix64 (Steele, Lea and Flood
2014; the constants of Stafford's "Mix13"): a bijection of 64-bit words with full avalanche.
A key is a 64-bit word; :func:`derive` chains keys, ``k' = mix64(k ^ mix64(part + SALT))``;
word ``j`` of key ``k``'s stream is ``mix64((mix64(k) ^ j) + SALT)`` (``SALT``, SplitMix64's
golden-ratio increment, keeps the finaliser's fixed point 0 out of the streams).  Two distinct keys ``a``, ``b``
give the same word at counters ``i``, ``j`` only if ``mix64(a) ^ mix64(b) = i ^ j``, a 2^-46
event for 2^18 counters -- so streams of distinct keys are not shifted copies of each other,
unlike a hash of ``key + counter`` (the 32-bit linear scheme this replaces, whose streams
overlapped for keys closer than their length).  Each word gives two 24-bit uniforms (exact
in float32); normals come from Box-Muller on the two uniforms of a word.

Keys are Python ints (mixed in Python, no device work) until a tensor part enters; tensors are
int64 holding the 64 bits in two's complement (products wrap modulo 2^64, shifts are made
logical by masking), so the bits are identical on CPU and CUDA and for ints and tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "derive",
    "mix64",
    "words",
    "uniform",
    "normal",
    "augment_keys",
    "SYNTHETIC_STREAM",
    "REAL_STREAM",
    "HEAD_STREAM",
    "PYRAMID_STREAM",
]

SYNTHETIC_STREAM, REAL_STREAM, HEAD_STREAM, PYRAMID_STREAM = 0, 1, 2, 3
"""Streams of one run's keys: augmentation of synthetic images, real batches (LGM), random heads
(LGM), pyramid noise."""

_MASK = (1 << 64) - 1
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_SALT = 0x9E3779B97F4A7C15  # the golden-ratio increment of SplitMix64
_U24 = (1 << 24) - 1


def _signed(v: int) -> int:
    """A 64-bit word as the int64 value with the same bits."""
    v &= _MASK
    return v - (1 << 64) if v >> 63 else v


def _xorshift(z: Tensor | int, shift: int) -> Tensor | int:
    if isinstance(z, int):
        return z ^ (z >> shift)
    return z ^ ((z >> shift) & ((1 << (64 - shift)) - 1))  # a logical shift of the 64 bits


def mix64(z: Tensor | int) -> Tensor | int:
    """SplitMix64's finaliser of 64-bit words (an int in [0, 2^64), or an int64 tensor of the bits)."""
    if isinstance(z, int):
        z = ((z & _MASK) ^ ((z & _MASK) >> 30)) * _M1 & _MASK
        z = (z ^ (z >> 27)) * _M2 & _MASK
        return z ^ (z >> 31)
    z = _xorshift(z, 30) * _signed(_M1)
    z = _xorshift(z, 27) * _signed(_M2)
    return _xorshift(z, 31)


def _combine(key: Tensor | int, part: Tensor | int) -> Tensor | int:
    if isinstance(key, int) and isinstance(part, int):
        return mix64(key ^ mix64(part + _SALT))
    if isinstance(part, int):
        part = _signed(mix64(part + _SALT))
    else:
        part = mix64(part.to(torch.int64) + _signed(_SALT))
    if isinstance(key, int):
        key = _signed(key)
    return mix64(key ^ part)


def derive(base: Tensor | int, *parts: Tensor | int) -> Tensor | int:
    """A key from a base key and further non-negative integers: an int while every argument is
    one (no device work), else an int64 tensor broadcast over the tensor arguments."""
    key = base
    for part in parts:
        key = _combine(key, part)
    return key


def words(keys: Tensor, count: int) -> Tensor:
    """(B, count) int64: the first ``count`` 64-bit words of each key's stream."""
    counters = torch.arange(count, device=keys.device, dtype=torch.int64)
    return mix64((mix64(keys.to(torch.int64))[:, None] ^ counters[None, :]) + _signed(_SALT))


def _halves(w: Tensor) -> tuple[Tensor, Tensor]:
    """Two uniforms in (0, 1) from each word: its bits 40..63 and 16..39 (24 bits each, exact in float32)."""
    scale = 1.0 / (1 << 24)
    high = ((w >> 40) & _U24).to(torch.float32).add_(0.5).mul_(scale)
    low = ((w >> 16) & _U24).to(torch.float32).add_(0.5).mul_(scale)
    return high, low


def uniform(keys: Tensor, count: int) -> Tensor:
    """(B, count) float32 uniforms in (0, 1), row b a function of ``keys[b]`` only."""
    high, low = _halves(words(keys, (count + 1) // 2))
    return torch.stack([high, low], 2).flatten(1)[:, :count]


def normal(keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B, *shape) float32 standard normals, row b a function of ``keys[b]`` only (Box-Muller)."""
    numel = math.prod(shape)
    u1, u2 = _halves(words(keys, (numel + 1) // 2))
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], 1)[:, :numel].reshape(-1, *shape)


def augment_keys(
    seed: int, step: int | Tensor, views: int, image_ids: Tensor, stream: int = SYNTHETIC_STREAM
) -> Tensor:
    """(views * n,) augmentation keys of images ``image_ids`` (global indices) at ``step`` (an int, or a
    0-dim int64 tensor on the ids' device: the same keys), view-major."""
    view = torch.arange(views, device=image_ids.device)[:, None]
    return derive(derive(seed, stream, step), view, image_ids[None, :]).flatten()
