"""Atomic checkpoints of a distillation run, in one safetensors file.

Tensors: the synthetic set's levels, the optimiser's moments and the RNG states; metadata:
the step, the optimiser's step count and the run's identity (config and statistics), so
that a resumed run continues bit for bit and a checkpoint of another run is refused.  The
file is written to a temporary name and renamed: a crash never leaves half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor

from ..io import atomic_save_safetensors, read_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


def save_checkpoint(
    path: str | Path, tensors: dict[str, Tensor], step: int, optimizer_steps: int, identity: dict[str, str]
) -> None:
    """Write ``tensors`` plus the RNG states, ``step`` and ``identity``, atomically."""
    tensors = dict(tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    meta = {"step": str(step), "optimizer_steps": str(optimizer_steps), "identity": json.dumps(identity)}
    atomic_save_safetensors(tensors, path, meta)


def load_checkpoint(path: str | Path, identity: dict[str, str]) -> dict:
    """Read a checkpoint; raise :class:`CheckpointError` if it is unreadable or of another run.

    Returns ``{"step", "optimizer_steps", "tensors"}`` (the RNG states are restored here).
    """
    path = Path(path)
    try:
        tensors, meta = read_safetensors(path)
        step, optimizer_steps = int(meta["step"]), int(meta["optimizer_steps"])
        saved_identity = json.loads(meta["identity"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a fastsfm checkpoint ({err}); "
            "delete it to start over, or point --out elsewhere"
        ) from err
    diff = {k: (saved_identity.get(k), v) for k, v in identity.items() if saved_identity.get(k) != v}
    if diff:
        raise CheckpointError(f"checkpoint {path} belongs to another run; differing settings (checkpoint, now): {diff}")
    torch.set_rng_state(tensors.pop("rng.cpu"))
    cuda = [tensors.pop(k) for k in sorted(k for k in list(tensors) if k.startswith("rng.cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return {"step": step, "optimizer_steps": optimizer_steps, "tensors": tensors}
