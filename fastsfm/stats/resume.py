"""Checkpoints of a statistics pass: its running sums, so a preempted pass resumes where it stopped.

A pass over ImageNet-1k (1.28 M images) takes hours; what it accumulates is small beside the
images: per backbone the float64 class sums (C, D) and the counts, plus the float16 features it
caches for the real-data classifier.  :class:`PassCheckpoint` keeps them in a folder, one
sub-folder per rank (each rank's sums are its shard's until the final all-reduce):

* ``state.safetensors``: the sums and counts, the batches done, the images skipped as
  undecodable, and the pass's identity (backbones, dataset, classes, batch size, world size,
  precision) -- a checkpoint of another pass is refused;
* ``features-KKKKK.safetensors``: the cached features and labels of the batches since the
  previous save, so a save writes only what is new (the state names how many shards count: one
  written by a save that crashed before its state is ignored).

Files are written atomically.  The same batches follow in the same order on resume (the data are
read in order, never shuffled), so a resumed pass equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor

from ..io import atomic_save_safetensors, read_safetensors

__all__ = ["PassState", "PassCheckpoint", "checkpoint_folder"]


@dataclass
class PassState:
    """What a statistics pass has accumulated: per backbone float64 ``sums`` (C, D), ``counts`` (C,)
    int64, per backbone the cached float16 ``features`` of each batch, their ``labels``, the
    undecodable images skipped (``bad``: one line each) and ``batches`` done."""

    sums: list[Tensor]
    counts: Tensor
    features: list[list[Tensor]] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    batches: int = 0

    @classmethod
    def empty(cls, dims: list[int], classes: int, device) -> PassState:
        return cls(
            [torch.zeros(classes, d, dtype=torch.float64, device=device) for d in dims],
            torch.zeros(classes, dtype=torch.int64, device=device),
            [[] for _ in dims],
        )


def checkpoint_folder(out: str | Path) -> Path:
    """Where the statistics pass writing ``out`` keeps its checkpoint: ``<out>.partial`` beside a
    file, ``<out>/.partial`` inside a folder."""
    out = Path(out)
    return out.with_name(out.name + ".partial") if out.suffix == ".safetensors" else out / ".partial"


class PassCheckpoint:
    """The checkpoint of one rank's statistics pass in ``folder`` (module docstring), saved every
    ``minutes`` (:meth:`due`) and at the end of the pass; ``identity`` must match on load."""

    def __init__(self, folder: str | Path, identity: dict[str, str], rank: int = 0, minutes: float = 10.0):
        self.root, self.folder = Path(folder), Path(folder) / f"rank{rank}"
        self.identity, self.minutes = identity, minutes
        self._saved_at, self._shards = time.monotonic(), 0
        self._kept = 0  # entries of the state's feature lists already written to shards

    def exists(self) -> bool:
        return (self.folder / "state.safetensors").exists()

    def due(self) -> bool:
        return time.monotonic() - self._saved_at >= 60 * self.minutes

    def save(self, state: PassState) -> None:
        """Write the batches cached since the last save as a new feature shard, then the state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if len(state.labels) > self._kept:  # entries of the lists not yet in a shard
            new = {f"features.{i}": torch.cat(f[self._kept :]) for i, f in enumerate(state.features)}
            new["labels"] = torch.cat(state.labels[self._kept :])
            atomic_save_safetensors(new, self.folder / f"features-{self._shards:05d}.safetensors", {})
            self._shards, self._kept = self._shards + 1, len(state.labels)
        tensors = {f"sums.{i}": s for i, s in enumerate(state.sums)} | {"counts": state.counts}
        meta = {
            "identity": json.dumps(self.identity),
            "batches": str(state.batches),
            "shards": str(self._shards),
            "bad": json.dumps(state.bad),
        }
        atomic_save_safetensors(tensors, self.folder / "state.safetensors", meta)
        self._saved_at = time.monotonic()

    def load(self, device) -> tuple[PassState, bool]:
        """The checkpoint's state; a clear error when it is damaged or of another pass."""
        path = self.folder / "state.safetensors"
        try:
            tensors, meta = read_safetensors(path)
            saved = json.loads(meta["identity"])
            batches, shards = int(meta["batches"]), int(meta["shards"])
            parts = [read_safetensors(self.folder / f"features-{k:05d}.safetensors")[0] for k in range(shards)]
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise ValueError(
                f"statistics checkpoint {self.folder} is damaged ({type(err).__name__}: {err}); delete "
                f"{self.root} to start the pass over"
            ) from err
        diff = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                f"statistics checkpoint {self.root} is of another pass; differing (checkpoint, now): {diff}; "
                f"delete it to start over"
            )
        n = sum(1 for k in tensors if k.startswith("sums."))
        state = PassState(
            [tensors[f"sums.{i}"].to(device) for i in range(n)],
            tensors["counts"].to(device),
            [[p[f"features.{i}"] for p in parts] for i in range(n)],
            [p["labels"] for p in parts],
            json.loads(meta["bad"]),
            batches,
        )
        self._shards, self._kept = shards, shards  # one list entry per shard
        return state

    def remove(self) -> None:
        """Delete this rank's checkpoint (the folder too once no rank's is left)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()
