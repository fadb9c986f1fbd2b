"""``sfm_loss``: the public functional API of the statistical flow matching loss.

The objective is the SFM authors' (``einsteinxia/SFM``, ``distillation/linear_gm.py``;
:mod:`fastsfm.loss.reference` writes it literally).  With real class centres ``mu`` (C, D) and
``t_c`` the mean of the synthetic feature rows labelled ``c``::

    nu_c     = (sum_k mu_k - mu_c) / (C - 1)          # mean of the non-target centres
    nu_syn_c = (sum_k t_k  - t_c)  / k                 # k = C - 1, or nontarget_divisor
    flow:      L = 1 - cos(vec(nu - mu), vec(nu_syn - t))          # one cosine over (C, D)
    decouple:  L = alpha * MSE(mu, t) + (1 - alpha) * MSE(nu, nu_syn)

With ``k = C - 1``, ``nu_c - t_c = -(C / (C - 1)) (t_c - mean_k t_k)``: the loss is one minus
the cosine between the mean-centred class-mean matrices of real and synthetic features.
It depends on the features only through per-class sums, which is why it fuses into a
segmented reduction, an O(C D) epilogue and a broadcast (:mod:`fastsfm.loss.ops`).

This module validates at the public boundary and dispatches to a backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import Backend, Objective, check_loss_options, choices
from . import ops
from .reference import divisor_for

__all__ = ["sfm_loss", "check_options", "check_centers", "check_batch", "resolve_backend"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return type(t).__name__


def check_options(objective: str, alpha: float, nontarget_divisor: float | None) -> float | None:
    """Validate the loss options (:func:`fastsfm.config.check_loss_options`); return the divisor as a
    float, or None for ``C - 1``."""
    check_loss_options(objective, alpha, nontarget_divisor)
    return None if nontarget_divisor is None else float(nontarget_divisor)


def check_centers(centers: object) -> Tensor:
    """Validate real class centres (C, D): floating point, C >= 2, finite (one host synchronisation)."""
    if not isinstance(centers, Tensor) or centers.dtype not in _FLOAT_DTYPES or centers.dim() != 2:
        raise TypeError(f"centers: expected a floating-point tensor (C, D), got {_describe(centers)}")
    if centers.shape[0] < 2:
        raise ValueError(
            f"SFM needs at least 2 classes (flows point to the other classes' centres), got C={centers.shape[0]}"
        )
    if centers.shape[1] == 0:
        raise ValueError("centers: D=0 features per class")
    if not bool(torch.isfinite(centers).all()):
        raise ValueError("centers contain NaN or Inf")
    return centers


def check_batch(
    features: object, labels: object, num_classes: int, dim: int, device: torch.device, sync: bool = True
) -> bool:
    """Validate ``features`` (N, D) and ``labels`` (N,) against statistics of C x D on ``device``.

    With ``sync`` also checks the label range (one host synchronisation) and returns whether
    the labels are non-decreasing (the class-contiguous fast path); without, returns False.
    """
    if not isinstance(features, Tensor) or features.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"features: expected a floating-point tensor (N, D), got {_describe(features)}")
    if (
        not isinstance(labels, Tensor)
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or labels.dtype == torch.bool
    ):
        raise TypeError(f"labels: expected an integer tensor (N,), got {_describe(labels)}")
    if features.dim() != 2:
        raise ValueError(f"features: expected shape (N, D={dim}), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("features: empty batch (N=0); SFM needs at least one row per class")
    if features.shape[1] != dim:
        raise ValueError(
            f"features have D={features.shape[1]} but the centres have D={dim}: "
            "were the statistics computed with another backbone?"
        )
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels: expected shape ({features.shape[0]},) to match features, got {tuple(labels.shape)}")
    if features.device != device or labels.device != device:
        raise ValueError(
            f"device mismatch: centres on {device}, features on {features.device}, labels on "
            f"{labels.device}; move them to one device"
        )
    if not sync:
        return False
    ordered = (labels[1:] >= labels[:-1]).all()
    lo, hi, contiguous = torch.stack([labels.min(), labels.max(), ordered.to(labels.dtype)]).tolist()
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return bool(contiguous)


def resolve_backend(backend: str, features: Tensor) -> str:
    """``auto`` -> ``triton`` for CUDA float16/bfloat16/float32 features, else ``torch``; checks the others."""
    if backend not in choices(Backend):
        raise ValueError(f"backend must be one of {choices(Backend)}, got {backend!r}")
    if backend == "auto":
        return "triton" if features.is_cuda and features.dtype in _KERNEL_DTYPES else "torch"
    if backend == "triton":
        if features.dtype not in _KERNEL_DTYPES:
            raise TypeError(
                f"the triton backend takes float32, bfloat16 or float16 features, got {features.dtype}; "
                "use backend='torch' for float64"
            )
        if not features.is_cuda:
            if not ops.interpreter_active():
                raise ValueError(
                    f"the triton backend needs CUDA tensors (got {features.device}); set "
                    "TRITON_INTERPRET=1 before importing triton to run it on CPU, or use backend='torch'"
                )
    return backend


def sfm_loss(
    features: Tensor,
    labels: Tensor,
    centers: Tensor,
    *,
    objective: Objective = "flow",
    alpha: float = 1.0,
    nontarget_divisor: float | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """The SFM loss of synthetic features against real class centres: a 0-dim tensor.

    Args:
        features: (N, D) synthetic features, float16/bfloat16/float32/float64, any strides.
            Several augmented views of an image are simply more rows with the same label
            (equal to the authors' averaging over views).
        labels: (N,) integer classes in [0, C), any order, unequal counts; every class needs a row.
        centers: (C, D) real class centres ``mu``, C >= 2; constants (no gradient reaches them).
        objective: ``"flow"`` (the paper's flow cosine) or ``"decouple"`` (``alpha`` MSE variant).
        alpha: weight of ``MSE(mu, t)`` in ``decouple``, in [0, 1].
        nontarget_divisor: divisor of the synthetic non-target mean (default ``C - 1``;
            the released script uses ``C * IPC - 1``).
        backend: see :data:`fastsfm.config.Backend`.

    Returns:
        The loss, float32 (float64 for float64 features on the torch/reference backends).
        Gradients flow to ``features``.  Validation costs three host synchronisations per call
        (finite centres; label range and order; empty classes and non-finite features, read from
        the class sums); for a training loop use :class:`fastsfm.SFMLoss`, which validates once
        per labels tensor (two synchronisations, then none).
    """
    divisor = check_options(objective, alpha, nontarget_divisor)
    check_centers(centers)
    num_classes, dim = centers.shape
    contiguous = check_batch(features, labels, num_classes, dim, centers.device)
    chosen = resolve_backend(backend, features)
    work = torch.float64 if centers.dtype == torch.float64 and chosen != "triton" else torch.float32
    consts = ops.flow_constants(centers, work)
    plan = ops.label_plan(labels, num_classes, contiguous, dim if chosen == "triton" else None)
    return ops.dispatch(
        features,
        plan,
        consts,
        objective=objective,
        alpha=float(alpha),
        divisor=divisor_for(divisor, num_classes),
        backend=chosen,
        validate=True,
    )
