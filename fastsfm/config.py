"""Every configuration option of fastsfm, typed once.

The ``Literal`` types below are the single source of the choices that the Python API
accepts and the command line offers (``fastsfm.cli`` derives ``choices`` and help from them
with :func:`choices`).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["Objective", "Backend", "Validate", "choices"]

Objective = Literal["flow", "decouple"]
"""``flow``: the paper's flow cosine (default); ``decouple``: the authors' ``sfm_decouple`` MSE variant."""

Backend = Literal["auto", "triton", "torch", "reference"]
"""Loss implementation: ``auto`` (Triton on CUDA, PyTorch otherwise), ``triton`` (fused kernels),
``torch`` (vectorised PyTorch with autograd), ``reference`` (the literal oracle)."""

Validate = Literal["once", "always", "never"]
"""When :class:`fastsfm.SFMLoss` runs the checks that need a host synchronisation (label range,
empty classes, non-finite features): on the first call for each labels tensor, every call, or never."""


def choices(kind: object) -> list[str]:
    """The values of a ``Literal`` type, for argparse ``choices``."""
    return list(get_args(kind))
