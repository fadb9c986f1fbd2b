"""The PyTorch side of the SFM loss: the real side's constants, the sums buffer's layout and
checks, and the differentiable PyTorch path (CPU, float64, ``gradcheck``).

The Triton path (:mod:`fastsfm.loss.ops`) shares the constants, the buffer layout and the checks;
nothing here imports triton.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import Objective
from .reference import real_flow, synthetic_flow

__all__ = [
    "FlowConstants",
    "flow_constants",
    "sums_width",
    "ROW_ALIGN",
    "check_class_sums",
    "means_loss",
    "means_of",
    "loss_torch",
    "all_reduce",
    "work_dtype",
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
    column sums and squared norm; ``shift`` (D,) the mean of the centres (the Triton
    epilogue accumulates means minus it, see :mod:`fastsfm.kernels`).
    """

    centers: Tensor
    nontarget: Tensor
    flow: Tensor
    flow_sum: Tensor
    flow_sq: Tensor
    shift: Tensor

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
        "shift": mu.mean(0),
    }
    return FlowConstants(**{k: v.to(dtype).contiguous() for k, v in values.items()})


def work_dtype(features: Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def check_class_sums(buf: Tensor, d: int) -> None:
    """Raise ``ValueError`` for a class without rows or non-finite sums of a (C, W) sums buffer.

    Non-finite features make their class sum non-finite, so checking the (C, D) sums is
    checking the (N, D) features at a fraction of the cost.  One host synchronisation: the
    two (C,) flags are read back together.
    """
    flags = torch.stack([buf[:, d] == 0, ~torch.isfinite(buf[:, :d]).all(1)]).cpu()
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


def means_of(buf: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Class means (C, D) and counts (C,) of a (C, W) sums buffer."""
    return buf[:, :d] / buf[:, d : d + 1], buf[:, d]


def all_reduce(buf: Tensor, group) -> Tensor:
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
        return all_reduce(buf.clone(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def loss_torch(
    features: Tensor,
    labels: Tensor,
    counts: Tensor,
    consts: FlowConstants,
    objective: Objective,
    alpha: float,
    divisor: float,
    group=None,
    validate: bool = False,
) -> Tensor:
    """The PyTorch path: ``index_add`` sums of ``features`` (N, D) over ``labels`` (N,) with the class
    ``counts`` (C,), optional all-reduce, :func:`means_loss`; plain autograd."""
    work = work_dtype(features)
    d = features.shape[1]
    sums = torch.zeros(consts.num_classes, d, device=features.device, dtype=work)
    sums = sums.index_add(0, labels, features.to(work))
    packed = torch.cat([sums, counts.to(work)[:, None]], 1)
    if group is not None:
        packed = _AllReduceSum.apply(packed, group)
    if validate:
        check_class_sums(packed.detach(), d)
    means, _ = means_of(packed, d)
    return means_loss(means, consts.to(work), objective, alpha, divisor)
