"""Atomic checkpoints of a distillation run, in one safetensors file.

Tensors: the synthetic set's levels, the optimiser's moments and the RNG states; metadata:
the step, the optimiser's step count and the run's identity (config and statistics), so
that a resumed run continues bit for bit and a checkpoint of another run is refused.  The
file is written to a temporary name and renamed: a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..io import atomic_save_safetensors, read_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "load_resharded", "CheckpointError"]


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


RESUMABLE = ("world_size",)
"""Identity entries a checkpoint may differ in and still resume (it is resharded)."""


def _check_identity(path: Path, saved: dict, identity: dict[str, str]) -> None:
    """Refuse a checkpoint whose identity differs from ``identity`` in any entry either holds (but
    :data:`RESUMABLE`): an option left at its default is absent from both, so older runs resume."""
    keys = sorted((set(identity) | set(saved)) - set(RESUMABLE))
    diff = {k: (saved.get(k), identity.get(k)) for k in keys if saved.get(k) != identity.get(k)}
    if diff:
        raise CheckpointError(f"checkpoint {path} belongs to another run; differing settings (checkpoint, now): {diff}")


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
    _check_identity(path, saved_identity, identity)
    torch.set_rng_state(tensors.pop("rng.cpu"))
    cuda = [tensors.pop(k) for k in sorted(k for k in list(tensors) if k.startswith("rng.cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return {"step": step, "optimizer_steps": optimizer_steps, "tensors": tensors}


def load_resharded(paths: list[Path], identity: dict[str, str], classes: range, num_classes: int, ipc: int) -> dict:
    """The checkpoint of the images of ``classes`` from the per-rank checkpoints ``paths`` (rank
    order) that another world size wrote: each rank held a contiguous block of classes
    (:func:`fastsfm.distributed.shard_classes`) and its images, ``ipc`` per class, in class order,
    so the rows of ``classes`` are read from the files that hold them -- only those rows (a
    safetensors slice), never a whole file.  Every file must belong to this run and be at the same
    step.  Returns what :func:`load_checkpoint` returns (the RNG states are not restored: the
    run's draws are keyed by seed, step and image, :mod:`fastsfm.rng`)."""
    from ..distributed import shard_classes

    parts = {}
    with contextlib.ExitStack() as stack:
        try:
            handles = [stack.enter_context(safe_open(str(p), "pt")) for p in paths]
            metas = [h.metadata() or {} for h in handles]
            steps = {(int(m["step"]), int(m["optimizer_steps"])) for m in metas}
            saved = [json.loads(m["identity"]) for m in metas]
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"checkpoints {paths[0].parent} are corrupt or not fastsfm checkpoints ({err})"
            ) from err
        for path, their in zip(paths, saved, strict=True):
            _check_identity(path, their, identity)
        if len(steps) != 1:
            raise CheckpointError(f"the checkpoints in {paths[0].parent} are of different steps: {sorted(steps)}")
        keys = [k for k in handles[0].keys() if not k.startswith("rng.")]
        for r, handle in enumerate(handles):
            held = shard_classes(num_classes, r, len(paths))
            lo, hi = max(held.start, classes.start), min(held.stop, classes.stop)
            if lo >= hi:
                continue
            rows = slice((lo - held.start) * ipc, (hi - held.start) * ipc)
            for key in keys:
                parts.setdefault(key, []).append(handle.get_slice(key)[rows])
    ((step, optimizer_steps),) = steps
    return {"step": step, "optimizer_steps": optimizer_steps, "tensors": {k: torch.cat(v) for k, v in parts.items()}}
