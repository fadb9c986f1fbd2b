"""The precision policy: the backbone under ``torch.autocast``, statistics and losses in float32.

``bf16`` (default on CUDA) needs no loss scaling.  ``fp16`` follows the authors: a fixed
x1024 scale on the gradient that enters the backbone's backward, divided out of the image
gradients before the optimiser step (their ``AMP_SCALE``).  ``fp32`` (default on CPU) runs
without autocast.  The backbone's attention kernel is part of the policy too
(:func:`attention_kernels`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import Attention, Precision, choices

__all__ = ["autocast_dtype", "autocast", "loss_scale", "attention_kernels", "FP16_LOSS_SCALE", "SDPA"]

FP16_LOSS_SCALE = 1024.0
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(precision: Precision, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: no autocast, float32)."""
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    if precision not in choices(Precision):
        raise ValueError(f"precision must be one of {choices(Precision)}, got {precision!r}")
    return _DTYPES[precision]


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` for the backbone forward, or a no-op for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def loss_scale(dtype: torch.dtype | None) -> float:
    """Gradient scale for the backbone's backward: the authors' 1024 for float16, else 1."""
    return FP16_LOSS_SCALE if dtype == torch.float16 else 1.0


SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
"""The ``torch.nn.attention.SDPBackend`` of each :data:`fastsfm.config.Attention` choice but ``auto``."""


def attention_kernels(choice: Attention):
    """The scaled-dot-product attention kernel for the block: PyTorch's own choice (``auto``), or one backend."""
    return contextlib.nullcontext() if choice == "auto" else sdpa_kernel(SDPA[choice])
