"""Adam's moments of one pyramid level, stored between steps as float32, bfloat16 or 8-bit codes.

:class:`fastsfm.distill.optim.ChunkAdam` steps a chunk of images at a time; for each level it
asks the level's two :class:`Moment` stores for the chunk's moments as float32 tensors on the
compute device (:meth:`Moment.fetch`, :meth:`Moment.decode`), lets ``torch.optim.Adam`` update
them, and hands them back (:meth:`Moment.encode`, :meth:`Moment.put`).  Only the storage differs
between modes (``DistillConfig.optimizer_state``):

``fp32``
    The moments themselves: exact Adam.  Resident on the compute device, :meth:`fetch` and
    :meth:`decode` return views and the step updates them in place.
``bf16``
    Rounded to nearest bfloat16 at every save (deterministic; no stochastic rounding).
``8bit``
    Blockwise dynamic 8-bit quantisation (Dettmers et al., "8-bit Optimizers via Block-wise
    Quantization", 2021): each block of ``block`` consecutive values of *one image's* level is
    scaled by its absolute maximum (a float32 scale) and coded on the dynamic-exponent map --
    signed for the first moment, unsigned for the second.  The quantiser and the map are
    torchao's (``torchao.optim.quant_utils``), the functions its ``OptimState8bit`` uses, so the
    codes equal torchao's for the same block size (tested).  Blocks never cross images, so a
    chunk's codes are the whole set's codes of those images: chunked = whole, offloaded =
    resident, and a checkpoint resharded by image rows stays valid.  ``block`` is the largest
    divisor of the image's level size up to 256 (torchao's block); a level whose block would be
    under 64 values (a pyramid's coarse levels: 3 to 192 values per image) stays float32, as
    torchao keeps small tensors unquantised -- negligible bytes.

Bytes per parameter stored with its image (the level itself float32): 12 (fp32), 8 (bf16),
6.03 (8bit at block 256).  At ImageNet-1k, IPC 50, 256 px (1.05 MB of levels per image) that is
157 GB, 105 GB and 79 GB for the whole set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..config import OptimizerState

__all__ = ["Moment", "block_size", "bytes_per_value", "MAX_BLOCK", "MIN_BLOCK"]

MAX_BLOCK = 256
"""Values per quantisation block (torchao's and bitsandbytes' default)."""
MIN_BLOCK = 64
"""Smallest block that is quantised; levels with a smaller per-image block stay float32."""

Allocate = Callable[[tuple[int, ...], torch.dtype], Tensor]
"""Storage of the synthetic set: an uninitialised tensor of a shape and dtype (``SyntheticSet.empty``)."""


def block_size(values_per_image: int) -> int | None:
    """The 8-bit block of a level with ``values_per_image`` values per image, None if it stays float32."""
    block = next(b for b in range(min(MAX_BLOCK, values_per_image), 0, -1) if values_per_image % b == 0)
    return block if block >= MIN_BLOCK else None


def bytes_per_value(mode: OptimizerState, values_per_image: int) -> float:
    """Bytes one moment takes per parameter of a level in ``mode`` (scales included)."""
    if mode == "fp32":
        return 4.0
    if mode == "bf16":
        return 2.0
    block = block_size(values_per_image)
    return 4.0 if block is None else 1.0 + 4.0 / block


_QMAPS: dict[tuple[bool, torch.device], Tensor] = {}


def _qmap(signed: bool, device: torch.device) -> Tensor:
    """torchao's dynamic 8-bit map (256 sorted float32 values), signed or unsigned, on ``device``, made once."""
    key = (signed, device)
    if key not in _QMAPS:
        from torchao.optim.quant_utils import create_dynamic_map

        _QMAPS[key] = torch.tensor(create_dynamic_map(signed=signed), dtype=torch.float32, device=device)
    return _QMAPS[key]


class Moment:
    """One Adam moment of one level: ``shape`` (N, K, s, s) per-image values stored in ``mode``.

    ``signed``: the 8-bit map of the first moment (signed) or the second (non-negative).
    Stored tensors (:meth:`tensors`) are allocated by ``allocate`` (the set's storage: the
    compute device, or exact-size page-locked host memory when offloaded).
    """

    def __init__(self, shape: tuple[int, ...], mode: OptimizerState, signed: bool, allocate: Allocate):
        self.shape, self.signed = tuple(shape), signed
        per_image = int(torch.Size(shape[1:]).numel())
        self.block = block_size(per_image) if mode == "8bit" else None
        self.mode = mode if mode != "8bit" or self.block is not None else "fp32"
        if self.mode == "8bit":
            self.codes = allocate(self.shape, torch.uint8).zero_()
            self.scale = allocate((shape[0], per_image // self.block), torch.float32).zero_()
        else:
            self.values = allocate(self.shape, torch.float32 if self.mode == "fp32" else torch.bfloat16).zero_()

    def zero_(self) -> None:
        for t in self.stored():
            t.zero_()

    def stored(self) -> list[Tensor]:
        """The stored tensors, rows = images (fp32/bf16: the values; 8bit: codes and scales)."""
        return [self.codes, self.scale] if self.mode == "8bit" else [self.values]

    def fetch(self, start: int, stop: int, device: torch.device) -> list[Tensor]:
        """The stored rows ``start:stop`` on ``device`` (views when they are there already)."""
        return [t[start:stop].to(device, non_blocking=True) for t in self.stored()]

    def decode(self, parts: list[Tensor]) -> Tensor:
        """Float32 moments from :meth:`fetch`'s parts (the parts themselves for fp32: a resident
        moment's views, which the step updates in place)."""
        if self.mode == "8bit":
            from torchao.optim.quant_utils import dequant_with_qmap

            codes, scale = parts
            return dequant_with_qmap(codes, _qmap(self.signed, codes.device), scale.reshape(-1))
        return parts[0] if self.mode == "fp32" else parts[0].float()

    def encode(self, value: Tensor) -> list[Tensor]:
        """The stored form of float32 moments ``value`` (n, ...) on their device: bf16 rounded to nearest,
        or torchao's blockwise codes and per-block scales (n, blocks)."""
        if self.mode == "8bit":
            from torchao.optim.quant_utils import quantize_8bit_with_qmap, scale_tensor

            scaled, scale = scale_tensor(value, self.block)
            return [quantize_8bit_with_qmap(scaled, _qmap(self.signed, value.device)), scale.view(len(value), -1)]
        return [value] if self.mode == "fp32" else [value.to(torch.bfloat16)]

    def put(
        self, start: int, stop: int, parts: list[Tensor], non_blocking: bool = False
    ) -> list[tuple[Tensor, Tensor]]:
        """Store :meth:`encode`'s parts as rows ``start:stop``; with ``non_blocking`` return the
        (stored rows, part) pairs to copy instead (a download stream's work, :mod:`fastsfm.distill.streams`)."""
        pairs = [(t[start:stop], part) for t, part in zip(self.stored(), parts, strict=True)]
        pairs = [(dst, part) for dst, part in pairs if dst.data_ptr() != part.data_ptr()]
        if non_blocking:
            return pairs
        for dst, part in pairs:
            dst.copy_(part)
        return []

    def tensors(self, key: str) -> dict[str, Tensor]:
        """The stored tensors under ``key`` (fp32/bf16: ``key``; 8bit: ``key.codes``, ``key.scale``)."""
        names = [f"{key}.codes", f"{key}.scale"] if self.mode == "8bit" else [key]
        return dict(zip(names, self.stored(), strict=True))

    def load_tensors(self, saved: dict[str, Tensor], key: str, store: Callable[[Tensor], Tensor]) -> None:
        """Restore what :meth:`tensors` gave under ``key`` (a checkpoint's), bit for bit, through ``store``."""
        mine = self.tensors(key)
        for name, tensor in mine.items():
            if name not in saved:
                raise ValueError(f"the checkpoint has no {name}: it was written with another optimizer_state")
            got = saved[name]
            if got.dtype != tensor.dtype or tuple(got.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {name} is {got.dtype} {tuple(got.shape)}, expected {tensor.dtype} "
                    f"{tuple(tensor.shape)} (another optimizer_state or set)"
                )
        restored = {name: store(saved[name]) for name in mine}
        if self.mode == "8bit":
            self.codes, self.scale = restored[f"{key}.codes"], restored[f"{key}.scale"]
        else:
            self.values = restored[key]
