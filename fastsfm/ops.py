"""The SFM loss as three primitives with a Triton and a PyTorch implementation each.

The loss depends on the synthetic features only through per-class sums, so every path is

1. :func:`class_sums`: features (N, D) -> the **sums buffer**, float32 (SPLIT, C, W): per-class
   sums in columns 0..D-1 and the row counts in column D (one all-reduce moves both), rows
   padded to ``W = sums_width(D)``, a multiple of 16 elements, so the kernels that read and
   write it use aligned 16-byte vector accesses;
2. :func:`epilogue`: that buffer -> ``(loss, G/n)``, ``G = dL/dt`` (C, D) for the class means ``t``;
3. :func:`grad_rows`: ``dL/dz_i = g * (G/n)[y_i]``.

:class:`_FusedSFM` wraps them in one ``torch.autograd.Function`` (the Triton path);
:func:`loss_torch` is the differentiable PyTorch path (CPU, float64, ``gradcheck``).  The
chunked distillation objective calls the primitives directly (it accumulates sums over
chunks and back-propagates ``G/n`` chunk by chunk).  This is the only module that imports
:mod:`fastsfm.kernels` (lazily: importing triton is slow and needs ``TRITON_INTERPRET`` set first).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor

from .config import Backend, Objective
from .reference import real_flow, sfm_reference, synthetic_flow

__all__ = [
    "FlowConstants",
    "flow_constants",
    "LabelPlan",
    "label_plan",
    "class_sums",
    "epilogue",
    "grad_rows",
    "check_class_sums",
    "dispatch",
    "loss_torch",
    "means_loss",
    "sums_width",
    "interpreter_active",
    "ROW_ALIGN",
]

ROW_ALIGN = 16
"""Rows of the sums buffer are padded to a multiple of this many elements (64 bytes of float32)."""


def sums_width(d: int) -> int:
    """Row width W of the sums buffer for D features: D sums, the count, padding to :data:`ROW_ALIGN`."""
    return -(-(d + 1) // ROW_ALIGN) * ROW_ALIGN


@dataclass(frozen=True)
class FlowConstants:
    """What the loss needs from the real centres ``mu`` (C, D), computed once (in float64, then cast).

    Attributes: ``centers`` mu (C, D); ``nontarget`` nu (C, D), the mean of the other
    classes' centres; ``flow`` nu - mu (C, D); ``flow_sum`` (D,) and ``flow_sq`` (1,) its
    column sums and squared norm; ``centers_sum`` (D,) the column sums of mu.
    """

    centers: Tensor
    nontarget: Tensor
    flow: Tensor
    flow_sum: Tensor
    flow_sq: Tensor
    centers_sum: Tensor

    @property
    def num_classes(self) -> int:
        return self.centers.shape[0]

    @property
    def dim(self) -> int:
        return self.centers.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.centers.dtype

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, dtype: torch.dtype) -> FlowConstants:
        if dtype == self.dtype:
            return self
        return FlowConstants(**{k: v.to(dtype) for k, v in self.tensors().items()})


def flow_constants(centers: Tensor, dtype: torch.dtype = torch.float32) -> FlowConstants:
    """:class:`FlowConstants` of ``centers`` (C, D), computed in float64 and stored as ``dtype``."""
    mu = centers.detach().double()
    nu, flow = real_flow(mu)
    values = {
        "centers": mu,
        "nontarget": nu,
        "flow": flow,
        "flow_sum": flow.sum(0),
        "flow_sq": (flow * flow).sum().reshape(1),
        "centers_sum": mu.sum(0),
    }
    return FlowConstants(**{k: v.to(dtype).contiguous() for k, v in values.items()})


@dataclass(frozen=True)
class LabelPlan:
    """Rows grouped by class, for the segmented reduction.

    ``labels`` (N,) int64; ``perm`` (N,) the rows in class order (stable; ``labels`` itself
    when ``contiguous``, then unused); ``offsets`` (C+1,) class boundaries in that order.
    Depends on the labels only, so :class:`fastsfm.SFMLoss` builds it once per labels tensor.
    """

    labels: Tensor
    perm: Tensor
    offsets: Tensor
    contiguous: bool

    @property
    def counts(self) -> Tensor:
        return self.offsets.diff()


def label_plan(labels: Tensor, num_classes: int, contiguous: bool) -> LabelPlan:
    """Build a :class:`LabelPlan` on the labels' device without a host synchronisation.

    ``contiguous`` says the labels are non-decreasing (the caller knows it from validation);
    then no sort is needed and the kernel reads rows in place.
    """
    labels = labels.to(torch.int64).contiguous()
    if contiguous:
        ordered, perm = labels, labels
    else:
        ordered, perm = torch.sort(labels, stable=True)
    bounds = torch.arange(num_classes + 1, device=labels.device, dtype=torch.int64)
    return LabelPlan(labels, perm.contiguous(), torch.searchsorted(ordered, bounds), contiguous)


def _kernels():
    from fastsfm import kernels

    return kernels


def interpreter_active() -> bool:
    """True when the Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _kernels().interpreter_active()


def _work_dtype(features: Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def class_sums(
    features: Tensor, plan: LabelPlan, num_classes: int, backend: str, out: Tensor | None = None, split: int = 1
) -> Tensor:
    """Per-class sums and counts of ``features`` (N, D): a (SPLIT, C, W) sums buffer, no autograd.

    Accumulates into ``out`` when given (chunked steps).  float32, or float64 for float64
    features on the torch backend.  The Triton path writes every sum and count (and never the
    padding), so a fresh buffer needs no zero fill.
    """
    n, d = features.shape
    accumulate = out is not None
    if out is None:
        alloc = torch.empty if backend == "triton" else torch.zeros
        out = alloc(split, num_classes, sums_width(d), device=features.device, dtype=_work_dtype(features))
    if backend == "triton":
        _kernels().class_sums(features, plan.perm, plan.offsets, out, contiguous=plan.contiguous, accumulate=accumulate)
        return out
    with torch.no_grad():
        out[0, :, :d].index_add_(0, plan.labels, features.to(out.dtype))
        out[0, :, d] += plan.counts.to(out.dtype)
    return out


def check_class_sums(buf: Tensor, d: int) -> None:
    """Raise ``ValueError`` for a class without rows or non-finite sums of a (SPLIT, C, W) buffer.

    Non-finite features make their class sum non-finite, so checking the (C, D) sums is
    checking the (N, D) features at a fraction of the cost.  One host synchronisation: the
    two (C,) flags are read back together.
    """
    total = buf.sum(0)
    flags = torch.stack([total[:, d] == 0, ~torch.isfinite(total[:, :d]).all(1)]).cpu()
    empty, bad = (torch.nonzero(f).flatten()[:10].tolist() for f in flags)
    if empty:
        raise ValueError(
            f"every class needs at least one feature row (SFM averages each class); classes without "
            f"rows: {empty}{' ...' if len(empty) == 10 else ''}"
        )
    if bad:
        raise ValueError(f"features contain NaN or Inf (rows of classes {bad})")


def means_loss(means: Tensor, consts: FlowConstants, objective: Objective, alpha: float, divisor: float) -> Tensor:
    """The loss (0-dim) of synthetic class means ``t`` (C, D): differentiable torch ops."""
    nu_syn, flow_syn = synthetic_flow(means, divisor)
    if objective == "flow":
        return 1.0 - torch.nn.functional.cosine_similarity(consts.flow.flatten(), flow_syn.flatten(), dim=0)
    return alpha * torch.nn.functional.mse_loss(consts.centers, means) + (1.0 - alpha) * torch.nn.functional.mse_loss(
        consts.nontarget, nu_syn
    )


def _means(buf: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Class means (C, D) and counts (C,) of a (SPLIT, C, W) sums buffer."""
    total = buf.sum(0)
    return total[:, :d] / total[:, d : d + 1], total[:, d]


def epilogue(
    buf: Tensor, consts: FlowConstants, objective: Objective, alpha: float, divisor: float, backend: str
) -> tuple[Tensor, Tensor]:
    """``(loss (0-dim), G/n (C, D))`` from a sums buffer; ``G = dL/dt`` for the class means ``t``.

    The Triton path writes ``G/n`` over the buffer (it returns a view of it): the sums are
    consumed.
    """
    if backend == "triton":
        c = consts.to(torch.float32)
        loss, gn = _kernels().flow_epilogue(
            buf,
            c.flow,
            c.flow_sum,
            c.flow_sq,
            c.centers,
            c.nontarget,
            c.centers_sum,
            objective=objective,
            alpha=alpha,
            inv_k=1.0 / divisor,
        )
        return loss.reshape(()), gn
    means, counts = _means(buf, consts.dim)
    means = means.detach().requires_grad_()
    with torch.enable_grad():
        loss = means_loss(means, consts.to(means.dtype), objective, alpha, divisor)
        (grad,) = torch.autograd.grad(loss, means)
    return loss.detach(), grad / counts[:, None]


def grad_rows(gn: Tensor, labels: Tensor, grad_out: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    """``dL/dz`` (N, D) in ``dtype``: row i is ``grad_out * gn[labels[i]]``."""
    if backend == "triton":
        return _kernels().broadcast_grad(gn, labels, grad_out.reshape(1).to(torch.float32), dtype)
    return (gn[labels] * grad_out).to(dtype)


def _all_reduce(buf: Tensor, group) -> Tensor:
    if group is not None:
        dist.all_reduce(buf, group=group)
    return buf


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; the backward is the identity.

    Every rank computes the same loss from the reduced sums and calls ``backward`` on it, so
    the gradient of its local sums is the gradient of the reduced ones (an all-reduce in
    the backward would count the loss once per rank).
    """

    @staticmethod
    def forward(ctx, buf: Tensor, group) -> Tensor:
        return _all_reduce(buf.clone(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _FusedSFM(torch.autograd.Function):
    """The Triton path: sums (+ all-reduce) -> epilogue in the forward; a broadcast in the backward."""

    @staticmethod
    def forward(
        ctx,
        features: Tensor,
        plan: LabelPlan,
        consts: FlowConstants,
        objective: str,
        alpha: float,
        divisor: float,
        group,
        validate: bool,
    ) -> Tensor:
        split = (
            1 if group is not None else _kernels().default_split(*features.shape, consts.num_classes, features.device)
        )
        buf = _all_reduce(class_sums(features, plan, consts.num_classes, "triton", split=split), group)
        if validate:
            check_class_sums(buf, consts.dim)
        loss, gn = epilogue(buf, consts, objective, alpha, divisor, "triton")
        ctx.save_for_backward(gn, plan.labels)
        ctx.dtype = features.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        gn, labels = ctx.saved_tensors
        return (grad_rows(gn, labels, grad, ctx.dtype, "triton"),) + (None,) * 7


def loss_torch(
    features: Tensor,
    plan: LabelPlan,
    consts: FlowConstants,
    objective: Objective,
    alpha: float,
    divisor: float,
    group=None,
    validate: bool = False,
) -> Tensor:
    """The PyTorch path: ``index_add`` sums, optional all-reduce, :func:`means_loss`; plain autograd."""
    work = _work_dtype(features)
    d = features.shape[1]
    sums = torch.zeros(consts.num_classes, d, device=features.device, dtype=work)
    sums = sums.index_add(0, plan.labels, features.to(work))
    packed = torch.cat([sums, plan.counts.to(work)[:, None]], 1)
    if group is not None:
        packed = _AllReduceSum.apply(packed, group)
    if validate:
        check_class_sums(packed.detach()[None], d)
    means, _ = _means(packed[None], d)
    return means_loss(means, consts.to(work), objective, alpha, divisor)


def dispatch(
    features: Tensor,
    plan: LabelPlan,
    consts: FlowConstants,
    *,
    objective: Objective,
    alpha: float,
    divisor: float,
    backend: Backend,
    group=None,
    validate: bool = False,
) -> Tensor:
    """Dispatch to a resolved backend (``triton``, ``torch`` or ``reference``); inputs already validated."""
    if backend == "triton":
        return _FusedSFM.apply(features, plan, consts, objective, alpha, divisor, group, validate)
    if backend == "torch":
        return loss_torch(features, plan, consts, objective, alpha, divisor, group, validate)
    if group is not None:
        raise ValueError("backend='reference' runs in a single process; use 'torch' or 'triton' with a process group")
    if validate:
        check_class_sums(class_sums(features.detach(), plan, consts.num_classes, "torch"), consts.dim)
    return sfm_reference(features, plan.labels, consts.centers, objective, alpha, divisor)
