"""``torch.distributed`` helpers: process groups from ``torchrun``, data and class sharding.

fastsfm never launches processes itself: run ``torchrun --nproc_per_node=K -m fastsfm.cli ...``
(or the ``fastsfm`` script) and each process calls :func:`init_from_env`.  Statistics shard
the *images* across ranks (sums and counts are all-reduced); distillation shards the
*classes* (SFM's loss of an image needs only the global statistics, so ranks never talk
during optimisation).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

__all__ = ["init_from_env", "rank_world", "shard_dataset", "shard_classes", "interleave_shards"]


def init_from_env() -> torch.device | None:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); return this rank's device.

    NCCL and ``cuda:LOCAL_RANK`` when CUDA is available, gloo and CPU otherwise.  Returns None
    (and does nothing) outside torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    """(rank, world size), (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_dataset(dataset: Dataset, rank: int, world: int) -> Subset:
    """Images ``rank, rank + world, ...``.  Unlike ``DistributedSampler`` it never pads with
    repeated images (which would count them twice in the class sums)."""
    return Subset(dataset, range(rank, len(dataset), world))


def interleave_shards(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard_dataset` for per-image tensors: rank r's rows go to r::world."""
    world = len(parts)
    out = torch.empty(sum(len(p) for p in parts), *parts[0].shape[1:], dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def shard_classes(num_classes: int, rank: int, world: int) -> range:
    """Contiguous block of classes owned by ``rank`` (sizes differ by at most one)."""
    if world > num_classes:
        raise ValueError(f"cannot shard {num_classes} classes over {world} ranks; use at most {num_classes}")
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
