"""``torch.distributed`` helpers: process groups from ``torchrun``, sharding, rank-0 work, gathering.

fastsfm never launches processes itself: run ``torchrun --nproc_per_node=K -m fastsfm.cli ...``
(or the ``fastsfm`` script) and each process calls :func:`init_from_env`.  Statistics shard
the *images* across ranks (sums and counts are all-reduced); distillation shards the
*classes* (SFM's loss of an image needs only the global statistics, so ranks never talk
during optimisation but for one all-reduce of the class sums per step).

**Waiting is never done in an NCCL collective.**  Work that only rank 0 does (baselines,
evaluations, tables of the grid) can take hours while NCCL's watchdog aborts a collective after
its timeout (10 minutes by default).  The other ranks therefore wait on a separate **gloo
control group** (host memory, TCP) whose timeout is ``wait_hours`` (24 by default), and
:func:`run_on_rank0` / :func:`run_on_all` exchange the outcome there: an exception on one rank
is raised on every rank (``RuntimeError: rank r failed: ...``), so nobody hangs on a dead peer.
Objects (cached features, shard file names) travel over the control group too, and only to
rank 0 (:func:`gather_to_rank0`): no rank holds another rank's data except rank 0 when it must.

**Every process that joined leaves with** :func:`shutdown` (the CLI does, in a ``finally``).  A
group still alive when Python finalises is torn down by its own gloo threads, which may then need
the already-finalised interpreter and abort the process (``terminate called without an active
exception``, SIGABRT after the job's work is done).  For the same reason :func:`init_from_env`
imports timm *before* joining: importing ``torch.distributed.fsdp`` (which timm does) while a
default group exists keeps that group alive past ``destroy_process_group`` (measured with torch
2.14: its gloo threads survive the destroy), so no shutdown could end it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

__all__ = [
    "init_from_env",
    "rank_world",
    "shard_dataset",
    "shard_classes",
    "interleave_shards",
    "control_group",
    "run_on_rank0",
    "run_on_all",
    "barrier",
    "gather_to_rank0",
    "all_gather",
    "broadcast_from_rank0",
    "shutdown",
    "COLLECTIVE_MINUTES",
    "WAIT_HOURS",
]

T = TypeVar("T")
COLLECTIVE_MINUTES = 30.0
"""Timeout of the default (NCCL) group's collectives: long enough for a slow step, short enough to notice a hang."""
WAIT_HOURS = 24.0
"""Default timeout of the gloo control group, where ranks wait for each other's long work."""
_control: dict[str, object] = {}


def init_from_env(
    wait_hours: float = WAIT_HOURS, collective_minutes: float = COLLECTIVE_MINUTES
) -> torch.device | None:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); return this rank's device.

    NCCL bound to ``cuda:LOCAL_RANK`` (``device_id``) with ``collective_minutes`` as its timeout
    when CUDA is available, gloo and CPU otherwise; then the gloo control group with a timeout
    of ``wait_hours``.  Returns None (and does nothing) outside torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    import timm  # noqa: F401 - before the group exists (see the module docstring)

    if not dist.is_initialized():
        kwargs = {"timeout": timedelta(minutes=collective_minutes)}
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, **kwargs)
        else:
            dist.init_process_group("gloo", **kwargs)
    control_group(wait_hours)
    return device


def shutdown() -> None:
    """Leave every process group this process joined and forget the control group (no-op when
    none was joined).  Call it once per process at the end, on success and on error alike."""
    _control.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size), (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def control_group(wait_hours: float = WAIT_HOURS):
    """The gloo group for waiting and objects: the default group when it is gloo, else a new gloo
    group with a ``wait_hours`` timeout (created on first call, which every rank must make together:
    :func:`init_from_env` makes it)."""
    default = dist.distributed_c10d._get_default_group()
    if _control.get("default") is not default:  # first call, or a new default group
        group = dist.group.WORLD if dist.get_backend() == "gloo" else None
        _control.update(
            default=default, group=group or dist.new_group(backend="gloo", timeout=timedelta(hours=wait_hours))
        )
    return _control["group"]


def _outcome(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 - re-raised by the caller after the peers are told
        return None, err


def _raise_first(statuses: list[str | None], error: BaseException | None) -> None:
    if error is not None:
        raise error
    for rank, status in enumerate(statuses):
        if status is not None:
            raise RuntimeError(f"rank {rank} failed: {status}")


def run_on_rank0(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 while the others wait on the control group; its result on rank 0 (None
    elsewhere).  An exception on rank 0 is raised there and as ``RuntimeError`` on every other rank."""
    rank, world = rank_world()
    if world == 1:
        return fn()
    result, error = _outcome(fn) if rank == 0 else (None, None)
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0, group=control_group())
    _raise_first(status, error)
    return result


def run_on_all(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, then an exchange of outcomes on the control group: an exception on
    any rank is raised on every rank."""
    if rank_world()[1] == 1:
        return fn()
    result, error = _outcome(fn)
    statuses: list[str | None] = [None] * rank_world()[1]
    dist.all_gather_object(
        statuses, None if error is None else f"{type(error).__name__}: {error}", group=control_group()
    )
    _raise_first(statuses, error)
    return result


def barrier() -> None:
    """Wait for every rank on the control group (no-op in a single process)."""
    if rank_world()[1] > 1:
        dist.barrier(group=control_group())


def gather_to_rank0(obj: T) -> list[T] | None:
    """Every rank's ``obj`` on rank 0 (in rank order) over the control group; None on the others."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=control_group())
    return out


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj`` on every rank (in rank order) over the control group."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj, group=control_group())
    return out


def broadcast_from_rank0(obj: T | None) -> T:
    """Rank 0's ``obj`` on every rank over the control group (the others pass anything, e.g. None)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


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
