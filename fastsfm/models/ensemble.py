"""Several frozen backbones seen as one: SFM against several backbones at once.

A synthetic set distilled against one backbone transfers worse to others (README's demo); matching
several backbones' statistics at once is the usual remedy in statistic-matching distillation.
:class:`BackboneEnsemble` encodes the *same* augmented crops with every member and concatenates
their features, (B, D_1 + ... + D_K): the two-pass step, its chunks, offload and ranks run
unchanged, the class sums of the concatenation are the members' class sums side by side (one
all-reduce), and :class:`fastsfm.distill.objectives.SFMObjective` takes each member's flow loss on its
columns (:attr:`BackboneEnsemble.columns`) and minimises their weighted mean.

The members see one crop size and run under one precision (the step has one loss scale):
both are checked here, with an error that says which member differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .backbones import Backbone

__all__ = ["BackboneEnsemble", "members_of"]


class BackboneEnsemble(nn.Module):
    """Backbones ``members`` on the same images: ``ensemble(images) -> (B, sum D_k)`` float32, the
    members' features side by side (member k in :attr:`columns` ``[k]``).

    It has what the distillation step reads of a :class:`fastsfm.models.backbones.Backbone`:
    ``input_size``, ``feature_dim``, ``precision``, ``autocast_dtype()``, ``identity``, ``name``.
    """

    def __init__(self, members: Sequence[Backbone]):
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 backbones, got {len(members)}")
        for attr, what in (("input_size", "input sizes (give them one --image-size)"), ("precision", "precisions")):
            values = {m.name: getattr(m, attr) for m in members}
            if len(set(values.values())) > 1:
                raise ValueError(
                    f"the backbones of one SFM run see the same crops under one precision; {what} differ: {values}"
                )
        self.members = nn.ModuleList(members)
        bounds = [0]
        for member in members:
            bounds.append(bounds[-1] + member.feature_dim)
        self.columns = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.input_size, self.feature_dim = members[0].input_size, bounds[-1]

    @property
    def precision(self) -> str:
        return self.members[0].precision

    def autocast_dtype(self) -> torch.dtype | None:
        return self.members[0].autocast_dtype()

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.members)

    @property
    def identity(self) -> str:
        return " + ".join(m.identity for m in self.members)

    def forward(self, images: Tensor) -> Tensor:
        return torch.cat([member(images) for member in self.members], dim=1)


def members_of(backbone: Backbone | BackboneEnsemble) -> list[Backbone]:
    """The backbones a distillation matches: an ensemble's members, or the backbone itself."""
    return list(backbone.members) if isinstance(backbone, BackboneEnsemble) else [backbone]
