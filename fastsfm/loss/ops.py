"""The SFM loss as three primitives with a Triton and a PyTorch implementation each.

The loss depends on the synthetic features only through per-class sums, so every path is

1. :func:`class_sums`: features (N, D) -> the **sums buffer**, float32 (C, W): per-class sums in
   columns 0..D-1 and the row counts in column D (one all-reduce moves both), rows padded to
   ``W = sums_width(D)``, a multiple of 16 elements, so the kernels that read and write it use
   aligned 16-byte vector accesses;
2. :func:`epilogue`: that buffer -> ``(loss, grad)``; ``grad`` is what the backward needs to
   rebuild ``G/n`` (``G = dL/dt`` (C, D) for the class means ``t``): on the torch path ``G/n``
   itself, on the Triton path a :class:`TritonGrad` (the sums and the epilogue's workspace);
3. :func:`grad_rows`: ``dL/dz_i = g * (G/n)[y_i]``.

:class:`_FusedSFM` wraps them in one ``torch.autograd.Function`` (the Triton path: three
launches per forward+backward, one allocation per direction); :func:`loss_torch` is the
differentiable PyTorch path (:mod:`fastsfm.loss.torch_path`; CPU, float64, ``gradcheck``).  The
chunked distillation objective calls the primitives directly (it accumulates sums over chunks
and back-propagates chunk by chunk).  This is the only module that imports
:mod:`fastsfm.kernels` (lazily: importing triton is slow and needs ``TRITON_INTERPRET`` set first).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ..config import Backend, Objective
from .reference import sfm_reference
from .torch_path import (
    FlowConstants,
    all_reduce,
    check_class_sums,
    flow_constants,
    loss_torch,
    means_loss,
    means_of,
    sums_width,
    work_dtype,
)

__all__ = [
    "FlowConstants",
    "flow_constants",
    "LabelPlan",
    "label_plan",
    "TritonGrad",
    "class_sums",
    "epilogue",
    "grad_rows",
    "check_class_sums",
    "dispatch",
    "loss_torch",
    "means_loss",
    "sums_width",
    "interpreter_active",
]


@dataclass(frozen=True)
class LabelPlan:
    """Rows grouped by class, for the segmented reduction and the backward.

    ``labels`` (N,) int64; ``offsets`` (C+1,) int64 class boundaries in class order;
    ``contiguous``: the labels are non-decreasing (the kernels read rows in place).  For the
    Triton path (``kernel`` is None on the torch path): ``perm`` (N,) int32 the rows in class
    order (stable), ``sorted`` (N,) int32 their classes, ``offsets32`` the boundaries as int32,
    ``items`` (P, 5) int32 the work of each program (:func:`fastsfm.kernels.sfm.sums.segment_items`),
    ``tiles`` the tile shape, ``slots`` the heavy-class slices, and per launch stream
    (:meth:`_KernelPlan.scratch`) ``carry`` (max(slots, 1), W) float32 rows for their partial
    sums and ``counter`` their int32 arrival counters (zero between calls).  Kept with the plan,
    so a loss call allocates neither; one pair per stream, so one plan's losses launched on two
    streams at once cannot mix their slices.  Depends on the labels only, so
    :class:`fastsfm.SFMLoss` builds it once per labels tensor.
    """

    labels: Tensor
    offsets: Tensor
    contiguous: bool
    kernel: _KernelPlan | None = None

    @property
    def counts(self) -> Tensor:
        return self.offsets.diff()


@dataclass(frozen=True)
class _KernelPlan:
    perm: Tensor
    sorted: Tensor
    offsets32: Tensor
    items: Tensor
    tiles: object
    slots: int
    width: int
    dim: int
    streams: dict = field(default_factory=dict, compare=False, repr=False)  # stream key -> (carry, counter)

    def scratch(self, device: torch.device, stream: tuple | None = None) -> tuple[Tensor, Tensor]:
        """``(carry, counter)`` of the current stream of ``device`` (made on its first use there);
        ``stream``: that stream's :func:`_stream_key` when the caller has it."""
        rows = max(self.slots, 1)
        # one counter per (heavy class, column block) of the narrowest column block a launch may use
        return _per_stream(
            self.streams,
            device,
            stream,
            lambda: (
                torch.empty(rows, self.width, device=device),
                torch.zeros(rows * -(-self.dim // 16), dtype=torch.int32, device=device),
            ),
        )


_KERNELS = []


def _kernels():
    """:mod:`fastsfm.kernels.sfm`, imported on first use (importing triton is slow and reads
    ``TRITON_INTERPRET`` once)."""
    if not _KERNELS:
        from fastsfm.kernels import sfm

        _KERNELS.append(sfm)
    return _KERNELS[0]


def label_plan(
    labels: Tensor, num_classes: int, contiguous: bool, dim: int | None = None, balance: bool = True
) -> LabelPlan:
    """Build a :class:`LabelPlan` on the labels' device.

    ``contiguous`` says the labels are non-decreasing (the caller knows it from validation);
    then no sort is needed.  With ``dim`` (the feature width D) the plan also holds the Triton
    kernels' work items; ``balance`` reads the class counts back (one host synchronisation,
    once per plan) to even out the rows per program for any count distribution; without it
    (no synchronisation) the items are groups of a fixed number of classes.
    """
    labels = labels.to(torch.int64).contiguous()
    if contiguous:
        ordered, perm = labels, None
    else:
        ordered, perm = torch.sort(labels, stable=True)
    bounds = torch.arange(num_classes + 1, device=labels.device, dtype=torch.int64)
    offsets = torch.searchsorted(ordered, bounds)
    if dim is None:
        return LabelPlan(labels, offsets, contiguous)
    k = _kernels()
    n = labels.shape[0]
    counts = offsets.diff().tolist() if balance else None
    items, slots = k.segment_items(counts, n, num_classes, dim)
    tiles = k.tiles_for(n, num_classes, dim)
    as32 = ordered.to(torch.int32)
    kernel = _KernelPlan(
        perm=as32 if perm is None else perm.to(torch.int32),
        sorted=as32,
        offsets32=offsets.to(torch.int32),
        items=torch.tensor(items, dtype=torch.int32, device=labels.device).reshape(-1, k.ITEM_FIELDS),
        tiles=tiles,
        slots=slots,
        width=sums_width(dim),
        dim=dim,
    )
    return LabelPlan(labels, offsets, contiguous, kernel)


def interpreter_active() -> bool:
    """True when the Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    from fastsfm.kernels.launch import interpreter_active as active

    return active()


def _on_device(t: Tensor):
    """The device guard of ``t``'s CUDA device when it is not the current one (Triton launches on
    the current device); nothing otherwise -- one guard per direction at most."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _stream_key(device: torch.device) -> tuple:
    """The launch stream of ``device``: the current CUDA stream's handle (what Triton launches on),
    the device itself elsewhere."""
    if device.type == "cuda":
        return device.index, torch._C._cuda_getCurrentRawStream(device.index)
    return device.type, device.index


def _per_stream(cache: dict, device: torch.device, stream: tuple | None, make):
    """``cache``'s scratch for the current stream of ``device`` (its :func:`_stream_key`
    ``stream``, looked up when None), made by ``make()`` on a miss.

    Launches on one stream run one after another, so scratch that must be zero between launches
    (arrival counters) is safe per stream, where it would race across streams.  Scratch first
    needed while a CUDA graph is being captured is not kept: its zero fill only runs when the
    graph replays, so an eager launch on the capture stream must not find it (the graph's pool
    keeps its memory).  A graph warmed up on its capture stream
    (:class:`fastsfm.distill.objectives.GraphedStep`) uses that stream's scratch: launch no loss
    on the capture stream while the graph replays elsewhere."""
    key = _stream_key(device) if stream is None else stream
    found = cache.get(key)
    if found is None:
        found = make()
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            cache[key] = found
    return found


_COUNTERS: dict[tuple, Tensor] = {}
"""The epilogue's int32 arrival counter per launch stream (:func:`_stream_key`), zero between launches."""


def _epilogue_counter(device: torch.device, stream: tuple | None = None) -> Tensor:
    """The epilogue's arrival counter for the current stream of ``device`` (:func:`_per_stream`)."""
    return _per_stream(_COUNTERS, device, stream, lambda: torch.zeros(1, dtype=torch.int32, device=device))


def _sums_into(out: Tensor, features: Tensor, plan: LabelPlan, accumulate: bool, stream: tuple | None = None) -> None:
    kp = plan.kernel
    carry, counter = kp.scratch(features.device, stream)
    _kernels().class_sums(
        features,
        kp.perm,
        kp.sorted,
        kp.offsets32,
        kp.items,
        out,
        carry,
        counter,
        kp.tiles,
        contiguous=plan.contiguous,
        accumulate=accumulate,
    )


def class_sums(features: Tensor, plan: LabelPlan, num_classes: int, backend: str, out: Tensor | None = None) -> Tensor:
    """Per-class sums and counts of ``features`` (N, D): a (C, W) sums buffer, no autograd.

    Accumulates into ``out`` when given (chunked steps).  float32, or float64 for float64
    features on the torch backend.  The Triton path writes every sum and count (and never the
    padding), so a fresh buffer needs no zero fill; it needs a plan made with ``dim``.
    """
    n, d = features.shape
    accumulate = out is not None
    if out is None:
        alloc = torch.empty if backend == "triton" else torch.zeros
        out = alloc(num_classes, sums_width(d), device=features.device, dtype=work_dtype(features))
    if backend == "triton":
        with _on_device(features):
            _sums_into(out, features, plan, accumulate)
        return out
    with torch.no_grad():
        out[:, :d].index_add_(0, plan.labels, features.to(out.dtype))
        out[:, d] += plan.counts.to(out.dtype)
    return out


class TritonGrad(NamedTuple):
    """What the Triton backward needs to rebuild ``G/n``: the (reduced) sums buffer (C, W), the
    epilogue's workspace (from element ``work_at`` of ``work``), the float32 constants and the
    loss options.  A tuple: made once per forward, at tuple cost."""

    sums: Tensor
    work: Tensor
    work_at: int
    consts: FlowConstants
    objective: str
    inv_k: float


def _epilogue_into(
    sums: Tensor,
    work: Tensor,
    work_at: int,
    consts: FlowConstants,
    objective: str,
    alpha: float,
    divisor: float,
    stream: tuple | None = None,
) -> TritonGrad:
    """Launch the epilogue (workspace from element ``work_at`` of ``work``; the loss in ``work``'s
    last element; ``stream`` the current stream's :func:`_stream_key` when the caller has it)."""
    c = consts.to(torch.float32)
    _kernels().flow_epilogue(
        sums,
        work,
        work_at,
        _epilogue_counter(sums.device, stream),
        c.flow,
        c.flow_sum,
        c.flow_sq,
        c.centers,
        c.nontarget,
        c.shift,
        objective=objective,
        alpha=alpha,
        inv_k=1.0 / divisor,
    )
    return TritonGrad(sums, work, work_at, c, objective, 1.0 / divisor)


def epilogue(
    buf: Tensor, consts: FlowConstants, objective: Objective, alpha: float, divisor: float, backend: str
) -> tuple[Tensor, Tensor | TritonGrad]:
    """``(loss (0-dim), grad)`` from a (C, W) sums buffer: ``grad`` is ``G/n`` (C, D) on the torch
    path, a :class:`TritonGrad` (which keeps ``buf``) on the Triton path."""
    if backend == "triton":
        k = _kernels()
        work = buf.new_empty(k.workspace_size(consts.num_classes, consts.dim, buf.shape[1]))
        with _on_device(buf):
            grad = _epilogue_into(buf, work, 0, consts, objective, alpha, divisor)
        return work[-1], grad
    means, counts = means_of(buf, consts.dim)
    means = means.detach().requires_grad_()
    with torch.enable_grad():
        loss = means_loss(means, consts.to(means.dtype), objective, alpha, divisor)
        (grad,) = torch.autograd.grad(loss, means)
    return loss.detach(), grad / counts[:, None]


def _backward_rows(grad: TritonGrad, plan: LabelPlan, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
    kp, c = plan.kernel, grad.consts
    return _kernels().backward_rows(
        grad.sums,
        grad.work,
        grad.work_at,
        c.flow,
        c.centers,
        c.nontarget,
        c.shift,
        kp.perm,
        kp.sorted,
        kp.offsets32,
        kp.items,
        grad_out,
        kp.tiles,
        plan.labels.shape[0],
        dtype,
        objective=grad.objective,
        inv_k=grad.inv_k,
        contiguous=plan.contiguous,
    )


def grad_rows(grad: Tensor | TritonGrad, plan: LabelPlan, grad_out: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    """``dL/dz`` (N, D) in ``dtype`` for the rows of ``plan``: row i is ``grad_out * (G/n)[labels[i]]``."""
    if backend == "triton":
        with _on_device(grad_out):
            return _backward_rows(grad, plan, grad_out.reshape(1).to(torch.float32), dtype)
    return (grad[plan.labels] * grad_out).to(dtype)


@functools.lru_cache(maxsize=64)
def _fused_rows(c: int, d: int, w: int) -> int:
    """Rows of W of the fused forward's one buffer: C rows of sums, then the epilogue's workspace
    (its loss ending the last row)."""
    work = _kernels().workspace_size(c, d, w)
    return c + -(-work // w)


class _FusedSFM(torch.autograd.Function):
    """The Triton path: sums (+ all-reduce) and the epilogue in the forward, one allocation (the
    sums, then the epilogue's workspace; the carry rows live in the plan, per stream); the backward rebuilds
    ``G/n`` per row, one allocation (``dL/dz``)."""

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
        c, d = consts.num_classes, consts.dim
        w = sums_width(d)
        rows = _fused_rows(c, d, w)
        device = features.device
        buf = torch.empty(rows, w, device=device, dtype=torch.float32)  # sums, then the workspace
        with _on_device(features):
            stream = _stream_key(device)
            _sums_into(buf, features, plan, False, stream)
            if group is not None:
                all_reduce(buf[:c], group)
            if validate:
                check_class_sums(buf[:c], d)
            ctx.grad = _epilogue_into(buf, buf, c * w, consts, objective, alpha, divisor, stream)
        ctx.plan, ctx.dtype = plan, features.dtype
        return buf[-1, -1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        return (_backward_rows(ctx.grad, ctx.plan, grad, ctx.dtype),) + (None,) * 7


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
        return loss_torch(features, plan.labels, plan.counts, consts, objective, alpha, divisor, group, validate)
    if group is not None:
        raise ValueError("backend='reference' runs in a single process; use 'torch' or 'triton' with a process group")
    if validate:
        check_class_sums(class_sums(features.detach(), plan, consts.num_classes, "torch"), consts.dim)
    return sfm_reference(features, plan.labels, consts.centers, objective, alpha, divisor)
