"""``SFMLoss``: the drop-in ``nn.Module`` form of :func:`fastsfm.sfm_loss`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import Backend, Objective, Validate, choices
from . import ops
from .functional import check_batch, check_centers, check_options, resolve_backend
from .reference import divisor_for

__all__ = ["SFMLoss"]

_F32 = "_f32"
"""Suffix of the float32 copies of float64 constants (non-persistent buffers: not in the state dict)."""


class SFMLoss(nn.Module):
    """The SFM loss against fixed real statistics: ``SFMLoss(stats)(features, labels) -> 0-dim``.

    Args:
        stats_or_centers: a :class:`fastsfm.ClassStats` or a (C, D) tensor of real class centres.
        objective, alpha, nontarget_divisor, backend: as in :func:`fastsfm.sfm_loss`.
        process_group: a ``torch.distributed`` group (or ``dist.group.WORLD``).  Each rank
            passes its own rows; per-class sums and counts (C*D + C numbers) are all-reduced
            inside the forward, every rank gets the same loss, and ``backward`` gives each
            rank its exact share of the global gradient (no communication in the backward).
        validate: ``"once"`` (default) runs the checks that need a host synchronisation --
            label range, classes without rows, non-finite features -- on the first call for
            each labels tensor (same object, unmodified) and then never again, so a training
            loop that reuses its labels has no host synchronisation and can be captured in a
            CUDA graph; ``"always"`` checks every call; ``"never"`` skips them (the labels
            are then assumed unsorted).

    The centres' derived constants (non-target means, real flows) are computed once in
    float64 and kept as float32 buffers (float64 for float64 centres, with float32 copies
    outside the state dict for the Triton path), so ``.to(device)`` moves them.  The per-labels
    row plan (class order, boundaries) is cached as well.

    **torch.compile**: a step that calls the module compiles with ``fullgraph=True`` (both
    backends).  While Dynamo traces, the module runs no check that needs a host
    synchronisation (a data-dependent ``raise`` cannot be traced): the label range, empty classes
    and non-finite features are not checked.  With fixed labels (a distillation step), call
    :meth:`prepare` once: the compiled step then uses the prepared row plan as a constant;
    otherwise the plan is rebuilt inside the graph (a sort of the labels per call).  Validate
    eagerly first (:meth:`prepare`, one eager call, or :func:`fastsfm.sfm_loss`) when the labels
    or features may be bad.
    """

    def __init__(
        self,
        stats_or_centers: Tensor | object,
        *,
        objective: Objective = "flow",
        alpha: float = 1.0,
        nontarget_divisor: float | None = None,
        process_group=None,
        backend: Backend = "auto",
        validate: Validate = "once",
    ):
        super().__init__()
        centers = stats_or_centers if isinstance(stats_or_centers, Tensor) else getattr(stats_or_centers, "means", None)
        if centers is None:
            raise TypeError(
                f"SFMLoss expects a ClassStats or a (C, D) tensor of centres, got {type(stats_or_centers).__name__}"
            )
        divisor = check_options(objective, alpha, nontarget_divisor)
        check_centers(centers)
        if validate not in choices(Validate):
            raise ValueError(f"validate must be one of {choices(Validate)}, got {validate!r}")
        if backend not in choices(Backend):
            raise ValueError(f"backend must be one of {choices(Backend)}, got {backend!r}")
        self.objective, self.alpha, self.backend, self.validate = objective, float(alpha), backend, validate
        self.divisor = divisor_for(divisor, centers.shape[0])
        self.process_group = process_group
        dtype = torch.float64 if centers.dtype == torch.float64 else torch.float32
        consts = ops.flow_constants(centers, dtype)
        for name, value in consts.tensors().items():
            self.register_buffer(name, value)
        if dtype != torch.float32:  # the Triton epilogue reads float32: cast once here, not in every call
            for name, value in consts.to(torch.float32).tensors().items():
                self.register_buffer(name + _F32, value, persistent=False)
        self._consts: dict[str, ops.FlowConstants] = {}
        self._prepared: ops.LabelPlan | None = None
        self._plan: ops.LabelPlan | None = None
        self._plan_key: tuple | None = None
        self._hot: tuple | None = None  # the last call's inputs and what they resolved to (:meth:`forward`)

    @property
    def num_classes(self) -> int:
        return self.centers.shape[0]

    def constants(self, backend: str = "torch") -> ops.FlowConstants:
        """The real side's constants: float64 ones for float64 centres, their float32 copies for ``triton``.

        Built once per backend; ``.to()``/``.cuda()`` (:meth:`_apply`) drop it with the plan."""
        suffix = _F32 if backend == "triton" and "centers" + _F32 in self._buffers else ""
        cached = self._consts.get(suffix)
        if cached is None:
            tensors = [self._buffers[f + suffix] for f in ops.FlowConstants.__dataclass_fields__]
            cached = self._consts[suffix] = ops.FlowConstants(*tensors)
        return cached

    def _apply(self, fn, *args, **kwargs):
        """Module moves and casts replace the buffers: forget the constants and the plan built on them."""
        self._consts, self._plan, self._plan_key, self._prepared, self._hot = {}, None, None, None, None
        return super()._apply(fn, *args, **kwargs)

    def _new_plan(self, labels: Tensor, contiguous: bool, backend: str, balance: bool) -> ops.LabelPlan:
        """A row plan of ``labels``, with the kernels' work items when ``backend`` is Triton."""
        dim = self.centers.shape[1] if backend == "triton" else None
        return ops.label_plan(labels, self.num_classes, contiguous, dim, balance=balance)

    def _label_plan(self, features: Tensor, labels: Tensor, backend: str) -> tuple[ops.LabelPlan, bool]:
        """The cached plan for ``labels`` (rebuilt, and validated, when they change); whether to validate sums."""
        key = (labels, labels._version, labels.device, backend == "triton")
        fresh = self._plan is None or self._plan_key[0] is not labels or self._plan_key[1:] != key[1:]
        check = self.validate != "never"
        contiguous = check_batch(
            features, labels, self.num_classes, self.centers.shape[1], self.centers.device, sync=fresh and check
        )
        if fresh:
            self._plan, self._plan_key = self._new_plan(labels, contiguous, backend, balance=check), key
        return self._plan, self.validate == "always" or (fresh and self.validate == "once")

    def prepare(self, labels: Tensor, features: Tensor) -> SFMLoss:
        """Validate ``labels`` and build their row plan now, for the backend ``features`` select
        (one host synchronisation).  A compiled step that calls the module with labels of the same
        shape then uses this plan as a constant -- no sort of the labels inside the graph -- and
        does not read its labels argument: pass the prepared labels.  Returns the module."""
        backend = resolve_backend(self.backend, features)
        self._prepared = self._label_plan(features, labels, backend)[0]
        return self

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """``features`` (N, D), ``labels`` (N,) -> the loss (0-dim).

        A call with the previous call's labels (same object, unmodified) and features of the same
        shape, dtype and device (and the same ``backend`` setting) goes straight to the loss with
        the previous call's backend, plan and constants: every check of a call depends only on
        those (the host-synchronising ones ran on the first call, ``validate="once"``), so a
        training loop pays them once."""
        hot = self._hot
        if (
            hot is not None
            and not torch.compiler.is_compiling()  # Dynamo: no guards on the cache
            and hot[0] is labels
            and hot[1] == (labels._version, features.shape, features.dtype, features.device, self.backend)
        ):
            return self._dispatch(features, *hot[2:], False)
        backend = resolve_backend(self.backend, features)
        if torch.compiler.is_compiling():
            check_batch(features, labels, self.num_classes, self.centers.shape[1], self.centers.device, sync=False)
            prepared = self._prepared
            if prepared is not None and prepared.labels.shape == labels.shape:
                plan = prepared
            else:  # no prepared plan: build one inside the graph (a sort; no host synchronisation)
                plan = self._new_plan(labels, False, backend, balance=False)
            check = False
        else:
            plan, check = self._label_plan(features, labels, backend)
            if self.validate != "always":
                signature = (labels._version, features.shape, features.dtype, features.device, self.backend)
                self._hot = (labels, signature, plan, self.constants(backend), backend)
        return self._dispatch(features, plan, self.constants(backend), backend, check)

    def _dispatch(
        self, features: Tensor, plan: ops.LabelPlan, consts: ops.FlowConstants, backend: str, check: bool
    ) -> Tensor:
        return ops.dispatch(
            features,
            plan,
            consts,
            objective=self.objective,
            alpha=self.alpha,
            divisor=self.divisor,
            backend=backend,
            group=self.process_group,
            validate=check,
        )

    def extra_repr(self) -> str:
        c, d = self.centers.shape
        return (
            f"classes={c}, dim={d}, objective={self.objective}, alpha={self.alpha}, divisor={self.divisor}, "
            f"backend={self.backend}, validate={self.validate}"
        )
