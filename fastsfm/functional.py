"""The statistical flow matching (SFM) loss: three implementations of one formula.

For a synthetic feature ``s_i`` with label ``c = y_i`` and real class centres ``mu``::

    L_i = 1/(C-1) * sum_{k != c} w[c, k] * (1 - cos(mu_k - s_i, mu_k - mu_c))

``mu_k - mu_c`` is the constant *real* statistical flow from the target centre to a
non-target centre, ``mu_k - s_i`` the *synthetic* flow.  Choices the paper leaves open
(arXiv 2602.05391 as stored holds only its abstract; see ``shared/DESIGN.md``):

* both norms are ``sqrt(|x|^2 + eps)`` so that a synthetic feature sitting exactly on a
  non-target centre, or two coinciding centres, give a finite loss and gradient;
* ``w`` is uniform (all ones) unless a (C, C) weight is given; its diagonal is ignored;
* the class statistics are constants of the real data: the fused path gives no gradient
  for them (and refuses means that require one); the reference paths differentiate them.

Precision: the expanded paths (lean, triton) compute each flow's inner product and norm
from GEMM entries.  Where a synthetic feature sits within about ``sqrt(machine eps) * |s|``
of a *non-target* centre, that one term's cosine is a ratio of two tiny rounded numbers:
``eps`` keeps it finite, but it is only accurate to the order of one term's weight.

Implementations:

* :func:`sfm_loss_literal`: the formula term by term; materialises (N, C-1, D) flows. Oracle.
* ``backend="lean"``: the algebraic expansion (one (N, C) GEMM plus per-row terms), autograd.
* ``backend="triton"``: :mod:`fastsfm.kernels`, fused forward and backward; never (N, C, D).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

Backend = Literal["auto", "triton", "lean", "literal"]
Reduction = Literal["mean", "sum", "none"]
Mode = Literal["sample", "class_mean"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = ["FlowGeometry", "flow_geometry", "sfm_loss", "sfm_loss_literal", "sfm_loss_from_geometry",
           "sfm_rows_lean", "class_mean_features", "validate_inputs"]


@dataclass(frozen=True)
class FlowGeometry:
    """Everything the expanded loss needs from the statistics, computed once per set of means.

    The centres are translated by ``origin`` (their mean): flows are differences, so this
    changes nothing mathematically, but it shrinks the numbers the expansion subtracts.

    Attributes (C classes, D dims, float32 or float64):
        origin: (D,) translation ``o``.
        centred: (C, D) ``mu - o``.
        origin_dot: (C,) ``o . (mu_k - o)``.
        sq_norm: (C,) ``|mu_k - o|^2``.
        num: (C, C) ``num[c, k] = <mu_k - o, mu_k - mu_c>``.
        inv: (C, C) ``w[c, k] / sqrt(|mu_k - mu_c|^2 + eps)``, zero on the diagonal.
        wsum: (C,) ``sum_{k != c} w[c, k]``.
    """

    origin: Tensor
    centred: Tensor
    origin_dot: Tensor
    sq_norm: Tensor
    num: Tensor
    inv: Tensor
    wsum: Tensor

    @property
    def num_classes(self) -> int:
        return self.centred.shape[0]

    @property
    def dim(self) -> int:
        return self.centred.shape[1]

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def flow_geometry(means: Tensor, weight: Tensor | None = None, eps: float = 1e-8) -> FlowGeometry:
    """Precompute :class:`FlowGeometry` from ``means`` (C, D) and an optional ``weight`` (C, C).

    Differentiable (plain torch ops), computed in float64 for float64 means, else float32.
    """
    work = torch.float64 if means.dtype == torch.float64 else torch.float32
    mu = means.to(work)
    origin = mu.mean(0)
    centred = mu - origin
    gram = centred @ centred.T
    sq_norm = gram.diagonal()
    num = sq_norm[None, :] - gram
    dist = torch.sqrt((sq_norm[None, :] + sq_norm[:, None] - 2.0 * gram).clamp_min(0.0) + eps)
    off_diag = 1.0 - torch.eye(means.shape[0], device=means.device, dtype=work)
    w = off_diag if weight is None else weight.to(work) * off_diag
    return FlowGeometry(origin=origin, centred=centred, origin_dot=centred @ origin, sq_norm=sq_norm, num=num,
                        inv=w / dist, wsum=w.sum(1))


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return type(t).__name__


def validate_inputs(features: Tensor, labels: Tensor, num_classes: int, dim: int, device: torch.device,
                    check_finite: bool = True) -> None:
    """Check ``features`` (N, D) and ``labels`` (N,) against statistics of ``num_classes`` x ``dim``.

    Raises ``TypeError``/``ValueError`` naming what was expected and what was given.
    """
    if not isinstance(features, Tensor) or features.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"features: expected a floating-point tensor (N, D), got {_describe(features)}")
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor (N,), got {_describe(labels)}")
    if num_classes < 2:
        raise ValueError(f"SFM needs at least 2 classes (flows go to non-target centres), got C={num_classes}")
    if features.dim() != 2:
        raise ValueError(f"features: expected shape (N, D={dim}), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("features: empty batch (N=0); SFM needs at least one synthetic feature")
    if features.shape[1] != dim:
        raise ValueError(f"features have D={features.shape[1]} but the class statistics have D={dim}: "
                         "were they computed with another backbone?")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels: expected shape ({features.shape[0]},) to match features, got {tuple(labels.shape)}")
    if features.device != device or labels.device != device:
        raise ValueError(f"device mismatch: statistics on {device}, features on {features.device}, "
                         f"labels on {labels.device}; move them to one device")
    lo, hi = torch.stack(torch.aminmax(labels)).tolist()  # one host sync for both bounds
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    if check_finite and not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or Inf")


def _validate_stats(means: Tensor, weight: Tensor | None) -> None:
    if not isinstance(means, Tensor) or means.dtype not in _FLOAT_DTYPES or means.dim() != 2:
        raise TypeError(f"means: expected a floating-point tensor (C, D), got {_describe(means)}")
    if means.shape[0] < 2:
        raise ValueError(f"SFM needs at least 2 classes (flows go to non-target centres), got C={means.shape[0]}")
    if not bool(torch.isfinite(means).all()):
        raise ValueError("class means contain NaN or Inf")
    if weight is not None:
        c = means.shape[0]
        if not isinstance(weight, Tensor) or weight.shape != (c, c):
            raise ValueError(f"weight: expected a ({c}, {c}) tensor, got {_describe(weight)}")
        if weight.device != means.device:
            raise ValueError(f"weight is on {weight.device} but means are on {means.device}")
        if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
            raise ValueError("weight must be finite and non-negative")


def class_mean_features(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean of ``features`` (N, D) for the classes present in ``labels``.

    Returns ``(means (K, D) in features.dtype, class ids (K,) int64)``; differentiable.
    Used by ``mode="class_mean"``: the loss then constrains only each class's average
    synthetic feature, leaving the individual images free to stay diverse.
    """
    sums = torch.zeros(num_classes, features.shape[1], device=features.device, dtype=torch.float32)
    sums = sums.index_add(0, labels, features.float())
    counts = torch.bincount(labels, minlength=num_classes)
    present = torch.nonzero(counts).squeeze(1)
    return (sums[present] / counts[present, None]).to(features.dtype), present


def sfm_loss_literal(features: Tensor, labels: Tensor, means: Tensor, weight: Tensor | None = None,
                     eps: float = 1e-8) -> Tensor:
    """Per-row losses (N,) from the formula term by term: the oracle for every other path.

    Materialises the synthetic flows ``mu_k - s_i`` and real flows ``mu_k - mu_c`` for the
    C-1 non-target classes of every row: (N, C-1, D) memory, use it on small inputs only.
    Computes in float32 (float64 for float64 inputs).
    """
    work = torch.float64 if features.dtype == torch.float64 else torch.float32
    s, mu = features.to(work), means.to(work)
    n, c = features.shape[0], means.shape[0]
    keep = torch.arange(c, device=labels.device)[None, :] != labels[:, None]
    others = torch.arange(c, device=labels.device).expand(n, c)[keep].view(n, c - 1)
    syn_flow = mu[others] - s[:, None, :]
    real_flow = mu[others] - mu[labels][:, None, :]
    cos = (syn_flow * real_flow).sum(-1) / (
        torch.sqrt((syn_flow * syn_flow).sum(-1) + eps) * torch.sqrt((real_flow * real_flow).sum(-1) + eps))
    w = torch.ones_like(cos) if weight is None else weight.to(work)[labels[:, None], others]
    return (w * (1.0 - cos)).sum(1) / (c - 1)


def sfm_rows_lean(features: Tensor, labels: Tensor, geo: FlowGeometry, eps: float) -> Tensor:
    """Per-row losses (N,) by the expansion: one (N, C) GEMM, O(N C) memory, autograd."""
    s = features.to(geo.centred.dtype) - geo.origin
    g = s @ geo.centred.T
    q = (s * s).sum(1, keepdim=True)
    a = geo.num[labels] - g + g.gather(1, labels[:, None])
    n = torch.sqrt((geo.sq_norm - 2.0 * g + q).clamp_min(0.0) + eps)
    return (geo.wsum[labels] - (geo.inv[labels] * a / n).sum(1)) / (geo.num_classes - 1)


class _FusedSFM(torch.autograd.Function):
    """Per-row losses through the Triton kernels; gradient for ``features`` only."""

    @staticmethod
    def forward(ctx, features: Tensor, labels: Tensor, centred: Tensor, origin: Tensor, origin_dot: Tensor,
                sq_norm: Tensor, num: Tensor, inv: Tensor, wsum: Tensor, eps: float, strategy: str) -> Tensor:
        from fastsfm import kernels

        rows = kernels.sfm_forward(features, labels, centred, origin, origin_dot, sq_norm, num, inv, wsum, eps)
        ctx.save_for_backward(features, labels, centred, origin, origin_dot, sq_norm, num, inv)
        ctx.eps, ctx.strategy = eps, strategy
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows: Tensor):
        from fastsfm import kernels

        features, labels, centred, origin, origin_dot, sq_norm, num, inv = ctx.saved_tensors
        grad = kernels.sfm_backward(features, labels, centred, origin, origin_dot, sq_norm, num, inv,
                                    grad_rows.float().contiguous(), ctx.eps, ctx.strategy)
        return (grad,) + (None,) * 10


def _fused_rows(features: Tensor, labels: Tensor, geo: FlowGeometry, eps: float, strategy: str) -> Tensor:
    if features.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the triton backend takes float32, bfloat16 or float16 features, got {features.dtype}; "
                        "use backend='lean' for float64")
    if any(t.requires_grad for t in geo.tensors().values()):
        raise ValueError("the triton backend treats class statistics as constants, but the means require grad; "
                         "detach them or use backend='lean'")
    if features.device.type != "cuda":
        from fastsfm.kernels import interpreter_active

        if not interpreter_active():
            raise ValueError(f"the triton backend needs CUDA tensors (got {features.device}); "
                             "set TRITON_INTERPRET=1 before importing triton to run it on CPU, or use backend='lean'")
    f32 = {k: v.float().contiguous() for k, v in geo.tensors().items()}
    return _FusedSFM.apply(features.contiguous(), labels.contiguous(),
                           f32["centred"].to(features.dtype).contiguous(), f32["origin"], f32["origin_dot"],
                           f32["sq_norm"], f32["num"], f32["inv"], f32["wsum"], float(eps), strategy)


def _resolve_backend(backend: str, features: Tensor) -> str:
    if backend not in ("auto", "triton", "lean", "literal"):
        raise ValueError(f"backend must be 'auto', 'triton', 'lean' or 'literal', got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if features.is_cuda and features.dtype in _KERNEL_DTYPES else "lean"


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def sfm_loss_from_geometry(features: Tensor, labels: Tensor, geo: FlowGeometry, *, means: Tensor | None = None,
                           weight: Tensor | None = None, reduction: Reduction = "mean", mode: Mode = "sample",
                           eps: float = 1e-8, backend: Backend = "auto", check_finite: bool = True,
                           fused_backward: str = "store") -> Tensor:
    """SFM loss with precomputed statistics geometry (what :class:`fastsfm.SFMLoss` calls).

    ``means``/``weight`` are only needed by ``backend="literal"``.  ``fused_backward`` picks
    the Triton backward: ``"store"`` (an (N, C) coefficient matrix and a cuBLAS GEMM) or
    ``"recompute"`` (nothing N x C stored); see :func:`fastsfm.kernels.sfm_backward`.  With ``mode="class_mean"``
    the rows are the classes present in ``labels`` (``reduction="none"`` returns one loss per
    present class, in increasing class order).
    """
    validate_inputs(features, labels, geo.num_classes, geo.dim, geo.centred.device, check_finite)
    if mode == "class_mean":
        features, labels = class_mean_features(features, labels, geo.num_classes)
    elif mode != "sample":
        raise ValueError(f"mode must be 'sample' or 'class_mean', got {mode!r}")
    chosen = _resolve_backend(backend, features)
    if chosen == "literal":
        if means is None:
            raise ValueError("backend='literal' needs the class means")
        rows = sfm_loss_literal(features, labels, means, weight, eps)
    elif chosen == "lean":
        rows = sfm_rows_lean(features, labels, geo, eps)
    else:
        if fused_backward not in ("store", "recompute"):
            raise ValueError(f"fused_backward must be 'store' or 'recompute', got {fused_backward!r}")
        rows = _fused_rows(features, labels, geo, eps, fused_backward)
    return _reduce(rows, reduction)


def sfm_loss(features: Tensor, labels: Tensor, means: Tensor, weight: Tensor | None = None, *,
             reduction: Reduction = "mean", mode: Mode = "sample", eps: float = 1e-8, backend: Backend = "auto",
             check_finite: bool = True) -> Tensor:
    """Statistical flow matching loss.

    Args:
        features: (N, D) synthetic features, float16/bfloat16/float32/float64, any strides.
        labels: (N,) integer class ids in [0, C).
        means: (C, D) real class centres, C >= 2.
        weight: optional (C, C) non-negative flow weights ``w[c, k]`` (diagonal ignored).
        reduction: ``"mean"`` over rows (default), ``"sum"``, or ``"none"`` for (N,) losses.
        mode: ``"sample"`` (every feature) or ``"class_mean"`` (per-class mean feature).
        eps: added to squared norms before the square root.
        backend: ``"auto"`` (Triton on CUDA, lean on CPU), ``"triton"``, ``"lean"`` or ``"literal"``.
        check_finite: reject NaN/Inf features (one device sync); disable in tight loops.

    Returns:
        Scalar loss, or per-row losses for ``reduction="none"``; float32 (float64 for float64).
    """
    _validate_stats(means, weight)
    geo = flow_geometry(means, weight, eps)
    return sfm_loss_from_geometry(features, labels, geo, means=means, weight=weight, reduction=reduction,
                                  mode=mode, eps=eps, backend=backend, check_finite=check_finite)
