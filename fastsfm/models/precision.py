"""The precision policy: the backbone under ``torch.autocast``, statistics and losses in float32.

``bf16`` (default on CUDA) needs no loss scaling.  ``fp16`` follows the authors: a fixed
x1024 scale on the gradient that enters the backbone's backward, divided out of the image
gradients before the optimiser step (their ``AMP_SCALE``).  ``fp32`` (default on CPU) runs
without autocast.  The backbone's attention kernel is part of the policy too
(:func:`attention_kernels`), and so is the precision of the float32 matrix products around it
(:func:`tf32_matmuls`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import Attention, Precision, choices

__all__ = [
    "autocast_dtype",
    "autocast",
    "loss_scale",
    "attention_kernels",
    "tf32_matmuls",
    "FP16_LOSS_SCALE",
    "SDPA",
]

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


@contextlib.contextmanager
def _cublas_tf32():
    flags = torch.backends.cuda.matmul
    before = flags.allow_tf32  # the legacy flag: reading it never raises, whichever API the caller used
    flags.allow_tf32 = True
    try:
        yield
    finally:
        flags.allow_tf32 = before


def tf32_matmuls(dtype: torch.dtype | None):
    """TF32 tensor cores for cuBLAS's float32 matrix products while a bfloat16 step runs (else a no-op).

    A bf16 step's float32 products either take bf16-rounded operands or feed a bf16 computation:
    the pyramid render (one product per image set) and the separable crop feed the backbone,
    whose first op rounds their output to bf16 (unit roundoff 2**-9) and whose backward hands
    them a bf16 gradient; LGM's linear head reads bf16 features.  TF32 rounds the operands to 10
    mantissa bits (2**-11) and accumulates in float32, so its error stays below the rounding the
    step already applies (``benches/tf32_error.py`` measures it on the render and the crop, values
    and gradients, in float64 with the operands rounded as TF32 rounds them), and the products
    run on tensor cores instead of the SIMT units.  float16 steps (unit roundoff 2**-11, TF32's
    own) and float32 steps keep IEEE float32.  The flag is process-wide, so the backward, which
    autograd runs from its own thread, sees it too; it is restored on exit.
    """
    return _cublas_tf32() if dtype == torch.bfloat16 else contextlib.nullcontext()
