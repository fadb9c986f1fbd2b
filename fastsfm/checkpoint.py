"""Atomic checkpoints of a distillation run, in one safetensors file.

Holds the synthetic set's levels, the optimiser's tensor state, the RNG states and, in the
metadata, the step, the optimiser's param groups and the run's identity (config and
statistics), so that a resumed run continues bit-for-bit and a checkpoint from another run
is refused.  Written to a temporary file and renamed: a crash never leaves half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from .io import atomic_save_safetensors, read_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


def save_checkpoint(
    path: str | Path,
    levels: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    step: int,
    identity: dict[str, str],
) -> None:
    state = optimizer.state_dict()
    tensors = dict(levels)
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    meta = {"step": str(step), "param_groups": json.dumps(state["param_groups"]), "identity": json.dumps(identity)}
    atomic_save_safetensors(tensors, path, meta)


def load_checkpoint(path: str | Path, identity: dict[str, str]) -> dict:
    """Read a checkpoint; raise :class:`CheckpointError` if it is unreadable or from another run.

    Returns ``{"step", "levels", "optimizer" (a state_dict), "rng"}``; nothing is restored here.
    """
    path = Path(path)
    try:
        tensors, meta = read_safetensors(path)
        step = int(meta["step"])
        groups = json.loads(meta["param_groups"])
        saved_identity = json.loads(meta["identity"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a fastsfm checkpoint ({err}); "
            "delete it to start over, or point --out elsewhere"
        ) from err
    diff = {k: (saved_identity.get(k), v) for k, v in identity.items() if saved_identity.get(k) != v}
    if diff:
        raise CheckpointError(f"checkpoint {path} belongs to another run; differing settings (checkpoint, now): {diff}")
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    return {
        "step": step,
        "levels": {k: v for k, v in tensors.items() if k.startswith("level_")},
        "optimizer": {"state": opt_state, "param_groups": groups},
        "rng": {k: v for k, v in tensors.items() if k.startswith("rng.")},
    }
