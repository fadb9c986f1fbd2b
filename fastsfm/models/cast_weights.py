"""A frozen backbone's Linear and conv weights cast to the autocast dtype once, not at every forward.

Under ``torch.autocast`` every ``linear``/``conv`` casts its float32 weight and bias to the compute
dtype, and autocast's cast cache keeps only casts of leaf tensors that require grad: a frozen
backbone's weights are cast again at every forward (ViT-B: 98 casts, 0.5 GB of traffic and ~100
launches per forward).  :class:`CastWeights` keeps one copy per dtype and device and runs the
model with it (``torch.func.functional_call``), so autocast finds those operands already in its
dtype and casts nothing.

Only what autocast itself casts is pre-cast: the weights and biases of ``nn.Linear`` and
``nn.ConvNd`` modules (the casts are the same rounding, so outputs and input gradients are bitwise
equal, tested).  LayerNorm, LayerScale, position embeddings and class tokens stay float32: under
autocast they meet the activations in float32 ops or promote them, as the authors' models run.
The float32 parameters stay too -- the real side (statistics, test features) runs without autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["CastWeights", "CAST_MODULES"]

CAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Modules whose parameters autocast casts to the compute dtype (its lower-precision op list)."""


class CastWeights:
    """``cast(x, dtype)``: ``model(x)`` with its Linear/conv parameters in ``dtype`` (one copy kept,
    made on first use for each dtype and device; call it inside ``torch.autocast``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._copies: dict[tuple[torch.dtype, torch.device], dict[str, Tensor]] = {}

    def names(self) -> list[str]:
        """The parameters pre-cast: those of the :data:`CAST_MODULES`, by their names in the model."""
        return [
            f"{module_name}.{name}" if module_name else name
            for module_name, module in self.model.named_modules()
            if isinstance(module, CAST_MODULES)
            for name, _ in module.named_parameters(recurse=False)
        ]

    def copies(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The pre-cast parameters in ``dtype`` on the model's device (made once; other copies dropped)."""
        key = (dtype, next(self.model.parameters()).device)  # every forward: no walk over all parameters
        if key not in self._copies:
            params = dict(self.model.named_parameters())
            self._copies = {key: {name: params[name].detach().to(dtype) for name in self.names()}}
        return self._copies[key]

    def __call__(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return functional_call(self.model, self.copies(dtype), (x,), strict=False)
