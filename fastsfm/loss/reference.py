"""The SFM objective written literally, as the authors' code computes it: the oracle of every test.

Source: ``einsteinxia/SFM``, ``distillation/linear_gm.py`` (``get_real_flow``, ``get_flow``,
``match_flow``; arXiv 2602.05391).  Nothing here is optimised: class
means are taken one class at a time with boolean masks, flows are built as whole (C, D)
matrices and the loss is ``torch.nn.functional.cosine_similarity`` of their flattenings,
exactly as the released script does.

* ``mu`` (C, D): real class centres (statistics, constants).
* ``t`` (C, D): ``t_c`` = mean of the synthetic feature rows labelled ``c``.
* ``nu_c = (sum_k mu_k - mu_c) / (C - 1)``; ``nu_syn_c = (sum_k t_k - t_c) / k`` with
  ``k = C - 1`` unless ``nontarget_divisor`` is given (the released script uses
  ``C * IPC - 1``).
* ``flow``: ``1 - cos(vec(nu - mu), vec(nu_syn - t))``.
* ``decouple``: ``alpha * MSE(mu, t) + (1 - alpha) * MSE(nu, nu_syn)``, MSE over all C*D entries.

Computed in float64 for float64 inputs, float32 otherwise.  Differentiable in ``features``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sfm_reference", "real_flow", "synthetic_flow", "class_means_literal", "divisor_for"]


def class_means_literal(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, D) mean of the rows of each class, one boolean mask per class."""
    return torch.stack([features[labels == c].mean(0) for c in range(num_classes)])


def divisor_for(nontarget_divisor: float | None, num_classes: int) -> float:
    """The non-target divisor ``k``: ``nontarget_divisor``, or ``C - 1`` when it is None (the one
    place the default is resolved)."""
    return float(num_classes - 1 if nontarget_divisor is None else nontarget_divisor)


def real_flow(centers: Tensor) -> tuple[Tensor, Tensor]:
    """``(nu, nu - mu)`` for real centres (C, D): the mean of the non-target centres and the flow."""
    num_classes = centers.shape[0]
    nontarget = (centers.sum(0, keepdim=True) - centers) / (num_classes - 1)
    return nontarget, nontarget - centers


def synthetic_flow(means: Tensor, divisor: float) -> tuple[Tensor, Tensor]:
    """``(nu_syn, nu_syn - t)`` for synthetic class means ``t`` (C, D) and the non-target divisor."""
    nontarget = (means.sum(0, keepdim=True) - means) / divisor
    return nontarget, nontarget - means


def sfm_reference(
    features: Tensor,
    labels: Tensor,
    centers: Tensor,
    objective: str = "flow",
    alpha: float = 1.0,
    nontarget_divisor: float | None = None,
) -> Tensor:
    """The SFM loss (0-dim) of synthetic ``features`` (N, D) with ``labels`` (N,) against ``centers`` (C, D).

    Every class must have at least one row; no validation (see :func:`fastsfm.sfm_loss`).
    """
    work = torch.float64 if features.dtype == torch.float64 else torch.float32
    z, mu = features.to(work), centers.to(work)
    num_classes = mu.shape[0]
    t = class_means_literal(z, labels, num_classes)
    nu, flow_real = real_flow(mu)
    nu_syn, flow_syn = synthetic_flow(t, divisor_for(nontarget_divisor, num_classes))
    if objective == "flow":
        return 1.0 - F.cosine_similarity(flow_real.flatten(), flow_syn.flatten(), dim=0)
    if objective == "decouple":
        return alpha * F.mse_loss(mu, t) + (1.0 - alpha) * F.mse_loss(nu, nu_syn)
    raise ValueError(f"objective must be 'flow' or 'decouple', got {objective!r}")
