"""``SFMLoss``: the drop-in ``nn.Module`` form of :func:`fastsfm.functional.sfm_loss`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import Backend, FlowGeometry, Mode, Reduction, _validate_stats, flow_geometry, sfm_loss_from_geometry

__all__ = ["SFMLoss"]


class SFMLoss(nn.Module):
    """Statistical flow matching loss built once from real class statistics.

    ``SFMLoss(stats)(features, labels)`` where ``stats`` is a :class:`fastsfm.ClassStats`
    (or a (C, D) tensor of class means), ``features`` is (N, D) and ``labels`` (N,) int.
    The statistics geometry (centred means, C x C flow terms) is computed once here and kept
    as buffers, so ``.to(device)`` moves it and each call costs only the fused GEMMs.

    The statistics are constants: no gradient reaches them.  See
    :mod:`fastsfm.functional` for the formula, ``reduction``, ``mode``, ``backend`` and
    ``fused_backward``.
    """

    def __init__(self, stats: "Tensor | object", weight: Tensor | None = None, *, reduction: Reduction = "mean",
                 mode: Mode = "sample", eps: float = 1e-8, backend: Backend = "auto", check_finite: bool = True,
                 fused_backward: str = "store"):
        super().__init__()
        means = stats if isinstance(stats, Tensor) else getattr(stats, "means", None)
        if means is None:
            raise TypeError(f"SFMLoss expects a ClassStats or a (C, D) tensor of means, got {type(stats).__name__}")
        means = means.detach()
        _validate_stats(means, weight)
        self.reduction, self.mode, self.eps, self.backend = reduction, mode, eps, backend
        self.check_finite, self.fused_backward = check_finite, fused_backward
        self.register_buffer("means", means.clone())
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self._geometry_names = []
        with torch.no_grad():
            for name, value in flow_geometry(means, weight, eps).tensors().items():
                self.register_buffer(f"geo_{name}", value)
                self._geometry_names.append(name)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def geometry(self) -> FlowGeometry:
        return FlowGeometry(**{name: getattr(self, f"geo_{name}") for name in self._geometry_names})

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """``features`` (N, D), ``labels`` (N,) -> scalar (or (N,) with ``reduction="none"``)."""
        return sfm_loss_from_geometry(features, labels, self.geometry(), means=self.means, weight=self.weight,
                                      reduction=self.reduction, mode=self.mode, eps=self.eps, backend=self.backend,
                                      check_finite=self.check_finite, fused_backward=self.fused_backward)

    def extra_repr(self) -> str:
        c, d = self.means.shape
        return f"classes={c}, dim={d}, reduction={self.reduction}, mode={self.mode}, backend={self.backend}"
