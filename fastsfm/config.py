"""Every configuration option of fastsfm, typed once.

The ``Literal`` types are the single source of the choices that the Python API accepts and
the command line offers: :mod:`fastsfm.cli` derives each ``--flag``, its type, its choices and
its help from the dataclass fields below (:func:`cli_fields`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

__all__ = [
    "Objective",
    "Backend",
    "Validate",
    "Method",
    "Param",
    "Init",
    "Precision",
    "Preprocess",
    "DistillConfig",
    "choices",
    "cli_fields",
]

Objective = Literal["flow", "decouple"]
"""``flow``: the paper's flow cosine (default); ``decouple``: the authors' ``sfm_decouple`` MSE variant."""

Backend = Literal["auto", "triton", "torch", "reference"]
"""Loss implementation: ``auto`` (Triton on CUDA, PyTorch otherwise), ``triton`` (fused kernels),
``torch`` (vectorised PyTorch with autograd), ``reference`` (the literal oracle)."""

Validate = Literal["once", "always", "never"]
"""When :class:`fastsfm.SFMLoss` runs the checks that need a host synchronisation (label range,
empty classes, non-finite features): on the first call for each labels tensor, every call, or never."""

Method = Literal["sfm", "lgm"]
"""Distillation objective: statistical flow matching, or the linear gradient matching baseline."""

Param = Literal["pyramid", "pixels"]
"""Synthetic image parameterisation: LGM's multi-scale pyramid (the papers') or plain pixels."""

Init = Literal["noise", "real"]
"""Synthetic image initialisation: random colours growing with the pyramid (the papers'), or real images."""

Precision = Literal["auto", "bf16", "fp16", "fp32"]
"""Backbone precision under ``torch.autocast``: ``auto`` is bf16 on CUDA and fp32 on CPU; fp16 uses
the authors' fixed x1024 loss scale.  Statistics and losses are always float32."""

Preprocess = Literal["authors", "model"]
"""Backbone input normalisation: ``authors`` (ImageNet mean/std for every backbone, as both papers'
code does) or ``model`` (the mean/std of the model's own timm configuration)."""


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DistillConfig:
    """Settings of one distillation run; all are recorded in checkpoints and outputs.

    Defaults are the authors' (``einsteinxia/SFM`` ``config/distill_config.py``, inherited from LGM).
    """

    method: Method = _opt("sfm", "objective: SFM, or the LGM baseline")
    ipc: int = _opt(1, "synthetic images per class")
    steps: int = _opt(5000, "optimisation steps (the authors' loop runs 5000 + 1)")
    lr: float = _opt(2e-3, "Adam learning rate")
    resolution: int = _opt(256, "stored synthetic resolution; the backbone sees random crops at its input size")
    param: Param = _opt("pyramid", "image parameterisation")
    init: Init = _opt("noise", "initialisation (real: random real images of each class, needs --data)")
    pyramid_start: int = _opt(1, "resolution of the first pyramid level")
    pyramid_extent: int = _opt(200, "steps between pyramid levels")
    decorrelate: bool = _opt(True, "colour decorrelation of the pyramid")
    views: int = _opt(1, "SFM: augmented copies of the synthetic set per step (extra rows of the loss)")
    objective: Objective = _opt("flow", "SFM objective")
    alpha: float = _opt(1.0, "decouple: weight of MSE(mu, t)")
    nontarget_divisor: float | None = _opt(
        None, "divisor of the synthetic non-target mean (default C-1; the released script uses C*IPC-1)"
    )
    noise_std: float = _opt(0.2, "augmentation noise std (0 disables the noise)")
    noise_mean: float = _opt(0.5, "augmentation noise mean (0.5: LGM's code when SFM forked it; 0.0: LGM's current)")
    lgm_augs: int = _opt(10, "LGM: augmented copies of the synthetic set (real batch: ipc x augs x C)")
    precision: Precision = _opt("auto", "backbone precision")
    chunk_size: int | None = _opt(None, "images per chunk of the exact two-pass step (default: from free memory)")
    offload: bool = _opt(False, "keep the synthetic set and its Adam state in pinned host memory")
    seed: int = _opt(0, "seed of every random draw of the run")
    checkpoint_every: int = _opt(100, "steps between checkpoints")

    def __post_init__(self) -> None:
        for name in (
            "ipc",
            "steps",
            "resolution",
            "pyramid_start",
            "pyramid_extent",
            "views",
            "lgm_augs",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 image, got {self.chunk_size}")
        for name, kind in typing.get_type_hints(DistillConfig).items():
            if typing.get_origin(kind) is Literal and getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {list(get_args(kind))}, got {getattr(self, name)!r}")

    def identity(self) -> dict[str, str]:
        """What must match for a checkpoint to be resumed: everything but the length and the
        execution choices (steps may grow; chunking, offload and checkpoint cadence do not change results)."""
        free = ("steps", "checkpoint_every", "chunk_size", "offload")
        return {k: json.dumps(v) for k, v in asdict(self).items() if k not in free}


def choices(kind: object) -> list[str]:
    """The values of a ``Literal`` type, for argparse ``choices``."""
    return list(get_args(kind))


def cli_fields(cls: type) -> list[tuple[str, object, object, str]]:
    """``(name, type, default, help)`` of a config dataclass, types resolved (for argparse)."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]
