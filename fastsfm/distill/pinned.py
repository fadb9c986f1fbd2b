"""Exact-size page-locked host tensors, for state offloaded to host memory and streamed to a GPU.

``tensor.pin_memory()`` and ``torch.empty(..., pin_memory=True)`` go through PyTorch's caching
host allocator, which rounds every block up to a power of two and keeps freed blocks for
reuse: a 146 GiB offloaded synthetic set pins about 256 GiB, more while a level is replaced.
:func:`empty` instead allocates plain host memory of the exact size (a NumPy buffer) and
page-locks it with ``cudaHostRegister``; the registration is undone when the last tensor
viewing the memory is freed.  Copies from and to such memory are asynchronous DMA transfers,
as from pinned memory (``tensor.is_pinned()`` is True).  Without CUDA the memory is plain.

:func:`stats` reports the bytes registered now and at most, so benchmarks can check that
offloaded state pins what it holds and no more.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

__all__ = ["empty", "zeros", "stats", "reset_peak"]

_lock = threading.Lock()
_registered = {"current": 0, "peak": 0}


def _unregister(ptr: int, nbytes: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)
    with _lock:
        _registered["current"] -= nbytes


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised host tensor of exactly ``shape`` x ``dtype``, page-locked when CUDA is available."""
    numel = int(np.prod(shape, dtype=np.int64))
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = np.empty(max(numel * itemsize, 1), dtype=np.uint8)
    tensor = torch.from_numpy(buffer)[: numel * itemsize].view(dtype).view(shape)
    if torch.cuda.is_available() and numel:
        ptr, nbytes = buffer.ctypes.data, buffer.nbytes
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(err)}")
        weakref.finalize(buffer, _unregister, ptr, nbytes)  # runs before NumPy frees the buffer
        with _lock:
            _registered["current"] += nbytes
            _registered["peak"] = max(_registered["peak"], _registered["current"])
    return tensor


def zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`empty`, filled with zeros."""
    return empty(shape, dtype).zero_()


def stats() -> dict[str, int]:
    """Bytes page-locked by :func:`empty`: ``current`` and ``peak`` (since the last :func:`reset_peak`)."""
    with _lock:
        return dict(_registered)


def reset_peak() -> None:
    with _lock:
        _registered["peak"] = _registered["current"]
