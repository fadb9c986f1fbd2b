"""``gca_loss`` and ``GCALoss``: the generalized contrastive alignment losses, validated and dispatched.

GCA (arXiv 2502.20141, ``nerdslab/gca``) replaces the softmax of InfoNCE by an entropic optimal
transport plan between the two views of a batch; :mod:`fastsfm.loss.gca_torch` states the
definition.  Backends: ``triton`` (:mod:`fastsfm.loss.gca_ops`: O(n D) memory, fused passes),
``torch`` (dense (2n, 2n) matrices, any dtype including float64; ``reference`` is the same).

Scale: at n = 8,192 pairs and D = 128 the authors' formulation keeps 10-13 (2n)^2 float32
buffers (43-54 GB at n = 16,384 rows); the fused path keeps the rows and 42 vectors (about 11 MB)
and spends 2 (2n)^2 D FLOP per pass, 42 passes for fwd+bwd at 10 iterations (about 0.9 PFLOP
at 16,384 rows, D = 128; tensor cores for 16-bit inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import Backend, GCAKind, GCAOptions, Pairing, choices
from .functional import _FLOAT_DTYPES, _describe, resolve_backend
from .gca_ops import gca_fused
from .gca_torch import gca_loss_torch

__all__ = ["gca_loss", "GCALoss", "check_embeddings"]


def check_embeddings(z: object) -> Tensor:
    """Validate ``z`` (2n, D): floating point, an even number >= 2 of rows, D >= 1, finite (one host
    synchronisation)."""
    if not isinstance(z, Tensor) or z.dtype not in _FLOAT_DTYPES or z.dim() != 2:
        raise TypeError(f"z: expected a floating-point tensor (2n, D) of two views per sample, got {_describe(z)}")
    rows, dim = z.shape
    if rows < 2 or rows % 2:
        raise ValueError(f"z: expected an even number >= 2 of rows (two views of each sample), got {rows}")
    if dim == 0:
        raise ValueError("z: D=0 features per row")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z contains NaN or Inf")
    return z


def _dispatch(z: Tensor, options: GCAOptions, backend: str) -> Tensor:
    check_embeddings(z)
    if resolve_backend(backend, z) == "triton":
        return gca_fused(z, options)
    return gca_loss_torch(z, options)


def gca_loss(
    z: Tensor,
    kind: GCAKind = "ince",
    epsilon: float = 0.5,
    iterations: int = 10,
    lam: float = 0.01,
    q: float = 0.98,
    relax: tuple[float, float] = (0.2, 0.2),
    r1: float = 1.0,
    r2: float = 0.02,
    pairing: Pairing = "interleaved",
    tf32: bool = False,
    *,
    backend: Backend = "auto",
) -> Tensor:
    """The GCA loss of the projections ``z`` (2n, D) of two views of n samples: a 0-dim tensor.

    Args:
        z: (2n, D) float16/bfloat16/float32/float64; normalised per row inside (as the authors').
        kind: ``ince``, ``rince`` (``INCE^q / q``) or ``uot`` (unbalanced, :data:`fastsfm.config.GCAKind`).
        epsilon: entropic regularisation (> 0); iterations: Sinkhorn rounds (>= 1).
        lam, q: the robust and unbalanced terms' weight and exponent; relax: ``uot``'s KL relaxations
            (rho1, rho2); r1, r2: ``uot``'s weights of the cross-entropy and of the positive terms.
        pairing: ``interleaved`` (rows 2i, 2i+1 are one sample) or ``blocks`` (rows i, i + n).
        tf32: float32 inputs on the Triton path use TF32 tensor-core products (faster, ~1e-3 relative).
        backend: ``auto`` (Triton for CUDA 16/32-bit inputs), ``triton``, ``torch`` or ``reference``.

    Returns float32 (float64 for float64 inputs on the torch path).  Defaults: the authors' CIFAR-10
    settings.  Validation costs one host synchronisation (finite ``z``).
    """
    options = GCAOptions(kind, epsilon, iterations, lam, q, relax, r1, r2, pairing, tf32)
    return _dispatch(z, options, backend)


class GCALoss(nn.Module):
    """:func:`gca_loss` as a module: the options are validated once, at construction."""

    def __init__(self, *args, backend: Backend = "auto", **kwargs):
        """The arguments of :func:`gca_loss` (``kind``, ``epsilon``, ... ``pairing``, ``backend``)."""
        super().__init__()
        self.options = GCAOptions(*args, **kwargs)
        if backend not in choices(Backend):
            raise ValueError(f"backend must be one of {choices(Backend)}, got {backend!r}")
        self.backend = backend

    def forward(self, z: Tensor) -> Tensor:
        """The loss of ``z`` (2n, D), as :func:`gca_loss`."""
        return _dispatch(z, self.options, self.backend)

    def extra_repr(self) -> str:
        o = self.options
        return f"kind={o.kind!r}, epsilon={o.epsilon}, iterations={o.iterations}, pairing={o.pairing!r}"
