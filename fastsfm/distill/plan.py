"""The run planner: chunk size, placement and memory peaks of a whole distillation, decided before step 1.

A distillation's memory has two parts:

* **the state** -- every image's pyramid levels (float32) and Adam's two moments in the run's
  ``optimizer_state`` (:mod:`fastsfm.distill.moments`), at the *final* pyramid (levels only ever
  grow, so the last growth is the peak); resident on the GPU, or in exact-size page-locked host
  memory with ``offload`` (unset: resident when that fits, else offloaded).  Exact arithmetic (:func:`state_bytes`).
* **a chunk's step** -- per image: the backbone's forward+backward activations (``views`` crops),
  the render at the final pyramid, the chunk's copies of its levels, their gradient and the two
  float32 moments of the update (plus the 8-bit quantiser's temporaries); and a fixed part
  (weights, their bf16 copies, workspaces).  The backbone part is **measured**
  (:func:`probe_cost`: a forward+backward of the synthetic images at two chunk sizes, the slope per
  image and the intercept; on CUDA from ``torch.cuda.max_memory_allocated``, on a CPU from the
  profiler's allocation events), the rest is arithmetic.

:func:`plan_run` puts them against a :class:`Machine` -- a rank's device memory
(``torch.cuda.mem_get_info``, of which :data:`MEMORY_FRACTION` is planned), the host's memory
(``psutil``, :data:`HOST_FRACTION`, shared by the node's ranks) and ``/dev/shm`` -- and returns a
:class:`Plan`: the largest chunk that fits (one chunk: a single pass per step; else two), the GPU,
host and pinned peaks, or a refusal that names what would fit (the other placement, a compact
``--optimizer-state``, more ranks, a lower IPC).  The loop logs the plan in one line or exits 2
before step 1, so no run dies at a pyramid growth the planner could foresee; ``fastsfm distill
--plan`` prints it for any machine (given figures, nothing allocated but the probes).

**ImageNet-1k, IPC 50, 256 px, DINOv2-B/14, one 80 GB GPU and 128 GB of host memory**: the state
is 3.15 MB per image in fp32, 157 GB: neither the GPU nor the host holds it (refused); with
``--optimizer-state 8bit`` it is 1.6 MB per image, 79 GB pinned (offloaded: the planner's choice when
``offload`` is left unset): planned.  On 8 ranks the
fp32 state is 19.7 GB per rank, resident beside the chunks.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass

import torch

from ..config import DistillConfig, MachineConfig, OptimizerState, choices
from ..distributed import shard_classes
from ..memory import peak_bytes
from .moments import bytes_per_value
from .synset import level_sizes

__all__ = [
    "Machine",
    "machine_of",
    "StepCost",
    "Plan",
    "PlanError",
    "plan_run",
    "probe_cost",
    "state_bytes",
    "MEMORY_FRACTION",
    "HOST_FRACTION",
    "PROBE_SIZES",
]

MEMORY_FRACTION = 0.85
"""Share of a rank's free device memory the plan may fill."""
HOST_FRACTION = 0.85
"""Share of the host's available memory the node's ranks may fill together (pinned state included)."""
PROBE_SIZES = (2, 6)
"""Images of the first two probe forward+backward passes; the larger is doubled while the peak stays
under twice the smaller's (a fixed transient, not the images, made it)."""
HOST_WORKING = 512 * 2**20
"""Host bytes a rank needs beside its state (checkpoint streaming, buffers of the loop)."""
GIB = 2**30


class PlanError(ValueError):
    """The run cannot fit the machine; the message names what would (exit 2 on the command line)."""


@dataclass(frozen=True)
class Machine:
    """What one run may use: a rank's ``device`` memory (``device_bytes``; the host's own for a CPU run),
    the host memory of a node (``host_bytes``) shared by its ``local_ranks``, ``/dev/shm`` and the world size."""

    device: str
    device_bytes: float
    host_bytes: float
    shm_bytes: float | None = None
    ranks: int = 1
    local_ranks: int = 1

    @classmethod
    def detect(cls, device: torch.device, ranks: int = 1, local_ranks: int | None = None) -> Machine:
        """This machine: free memory of ``device`` now (with what PyTorch caches but does not use),
        available host memory, ``/dev/shm``'s size."""
        import psutil

        host = float(psutil.virtual_memory().available)
        device = torch.device(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        else:
            free = host
        shm = float(shutil.disk_usage("/dev/shm").total) if os.path.isdir("/dev/shm") else None
        local = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return cls(device.type, float(free), host, shm, ranks, max(1, min(local, ranks)))

    def describe(self) -> str:
        gpu = f"{self.device_bytes / GIB:.3g} GiB GPU" if self.device == "cuda" else "CPU"
        return f"{self.ranks} x {gpu}, {self.host_bytes / GIB:.3g} GiB host for {self.local_ranks} rank(s)"


def machine_of(config: MachineConfig, device: torch.device, ranks: int = 1) -> Machine:
    """The :class:`Machine` ``config`` describes: this one (``device``, ``ranks``) with its given figures
    in place (a given ``device_gib`` plans a CUDA run)."""
    here = Machine.detect(device, config.ranks or ranks)
    given_ranks = config.ranks or here.ranks
    local = config.ranks_per_host or (min(given_ranks, 8) if config.ranks else here.local_ranks)
    return dataclasses.replace(
        here,
        device="cuda" if config.device_gib is not None else here.device,
        device_bytes=config.device_gib * GIB if config.device_gib is not None else here.device_bytes,
        host_bytes=config.host_gib * GIB if config.host_gib is not None else here.host_bytes,
        ranks=given_ranks,
        local_ranks=local,
    )


@dataclass(frozen=True)
class StepCost:
    """Device bytes of a chunk's forward+backward through the backbone (render and augment included,
    at the pyramid of the probe): ``fixed`` + ``per_image`` x images; ``how`` it was obtained."""

    fixed: float
    per_image: float
    how: str


@dataclass(frozen=True)
class Plan:
    """A run's plan for one rank (``feasible``), or why it cannot run and what would (``message``)."""

    feasible: bool
    message: str
    images: int = 0
    chunk: int = 0
    placement: str = ""
    state: float = 0.0
    device_peak: float = 0.0
    host_peak: float = 0.0
    pinned: float = 0.0

    @property
    def passes(self) -> int:
        """Passes over the set per step: one when a chunk holds every image (its graph is kept), else two."""
        return 1 if self.chunk >= self.images else 2

    def check(self) -> Plan:
        """The plan, or :class:`PlanError` with its message."""
        if not self.feasible:
            raise PlanError(self.message)
        return self


def state_bytes(config: DistillConfig, mode: OptimizerState | None = None) -> tuple[float, float]:
    """Bytes per image of the final pyramid's levels and of its two Adam moments in ``mode``
    (default: the config's).  ImageNet at 256 px, RGB: 1.05 MB of levels; moments 2.1 MB (fp32),
    1.05 MB (bf16), 0.53 MB (8bit)."""
    channels = 1 if config.channels == "grey" else 3
    sizes = [config.resolution] if config.param == "pixels" else level_sizes(config.pyramid_start, config.resolution)
    mode = mode or config.optimizer_state
    levels = sum(4.0 * channels * s * s for s in sizes)
    moments = sum(2 * channels * s * s * bytes_per_value(mode, channels * s * s) for s in sizes)
    return levels, moments


def _chunk_bytes(config: DistillConfig, cost: StepCost) -> float:
    """Device bytes of one more image in a chunk at the final pyramid: its crops' forward+backward
    (measured), the render's product of the coarse levels, its level copies, gradient and float32
    moments, and the 8-bit quantiser's temporaries (int64 codes of the binary search, the scaled copy)."""
    levels, _ = state_bytes(config)
    channels = 1 if config.channels == "grey" else 3
    r = config.resolution
    coarse = sum(level_sizes(config.pyramid_start, r)[:-1]) if config.param == "pyramid" else 0
    render = 4.0 * channels * r * coarse * 2  # [A_l Q_l] (n, c, R, sum S) and its gradient
    quantiser = 28.0 * channels * r * r if config.optimizer_state == "8bit" else 0.0
    return config.effective_views * (cost.per_image + render) + 4 * levels + quantiser


def _size(nbytes: float) -> str:
    """``nbytes`` in GiB (one decimal), or MiB under one GiB."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.0f} MiB"


def _fit(config: DistillConfig, num_classes: int, cost: StepCost, machine: Machine) -> Plan:
    """The plan of exactly these settings (no alternatives searched); ``offload=None`` on CUDA: resident
    when that fits, else host-pinned."""
    if config.offload is None and machine.device == "cuda":
        resident = _fit(dataclasses.replace(config, offload=False), num_classes, cost, machine)
        return (
            resident
            if resident.feasible
            else _fit(dataclasses.replace(config, offload=True), num_classes, cost, machine)
        )
    images = len(shard_classes(num_classes, 0, machine.ranks)) * config.ipc  # rank 0 holds the largest shard
    levels, moments = state_bytes(config)
    state = images * (levels + moments)
    per_image = _chunk_bytes(config, cost)
    host_budget = HOST_FRACTION * machine.host_bytes / machine.local_ranks
    if machine.device != "cuda":
        placement, budget, pinned = "host", host_budget - state - HOST_WORKING - cost.fixed, 0.0
    elif config.offload:
        placement, budget, pinned = "host-pinned", MEMORY_FRACTION * machine.device_bytes - cost.fixed, state
    else:
        placement, budget, pinned = "GPU-resident", MEMORY_FRACTION * machine.device_bytes - state - cost.fixed, 0.0
    chunk = images if config.chunk_size is None else min(config.chunk_size, images)
    chunk = int(max(0, min(chunk, budget // per_image)))
    device_peak = (state if placement != "host-pinned" else 0.0) + cost.fixed + chunk * per_image
    host_peak = pinned + HOST_WORKING + (device_peak if placement == "host" else 0.0)
    feasible = chunk >= 1 and pinned + HOST_WORKING <= host_budget
    passes = "1 pass/step" if chunk >= images else "2 passes/step"
    shown = (
        f"plan: {placement}, optimizer_state {config.optimizer_state}, {images} images/rank x {machine.ranks} "
        f"rank(s), chunk {chunk} images/rank, {'GPU' if machine.device == 'cuda' else 'CPU'} peak "
        f"{_size(device_peak)}, host {_size(host_peak)} ({_size(pinned)} pinned), {passes}, state "
        f"{_size(state)} ({(levels + moments) / 1e6:.2f} MB/image); {cost.how}"
    )
    return Plan(feasible, shown, images, chunk, placement, state, device_peak, host_peak, pinned)


def _alternatives(config: DistillConfig, num_classes: int, cost: StepCost, machine: Machine) -> list[str]:
    """What would fit instead: the other placement, a compact optimiser state, more ranks, a lower IPC."""
    found = []
    placements = (False, True) if machine.device == "cuda" and config.offload is not None else (config.offload,)
    for mode in choices(OptimizerState):
        for offload in placements:
            if (mode, offload) == (config.optimizer_state, config.offload):
                continue
            option = dataclasses.replace(config, optimizer_state=mode, offload=offload)
            if (plan := _fit(option, num_classes, cost, machine)).feasible:
                flags = " ".join(
                    [f"--optimizer-state {mode}"] * (mode != config.optimizer_state)
                    + ["--offload" if offload else "--no-offload"] * (offload != config.offload)
                )
                found.append(f"{flags} ({plan.placement}, state {_size(plan.state)}/rank)")
    for ranks in (2, 4, 8, 16, 32, 64, 128):
        if ranks > machine.ranks and ranks <= num_classes:
            more = dataclasses.replace(
                machine, ranks=ranks, local_ranks=min(ranks, 8) if machine.local_ranks > 1 else 1
            )
            if _fit(config, num_classes, cost, more).feasible:
                found.append(f"{ranks} ranks (torchrun --nproc_per_node / --nnodes)")
                break
    low, high = 0, config.ipc - 1  # the largest IPC that fits these settings
    while low < high:
        mid = (low + high + 1) // 2
        fits = _fit(dataclasses.replace(config, ipc=mid), num_classes, cost, machine).feasible
        low, high = (mid, high) if fits else (low, mid - 1)
    if low >= 1:
        found.append(f"--ipc {low}")
    return found


def _placement(config: DistillConfig) -> str:
    return {None: "resident or offloaded", True: "offloaded", False: "resident"}[config.offload]


def plan_run(config: DistillConfig, num_classes: int, cost: StepCost, machine: Machine) -> Plan:
    """The plan of a run of ``config`` over ``num_classes`` classes on ``machine`` (module docstring);
    infeasible plans carry the alternatives that would fit in their message."""
    plan = _fit(config, num_classes, cost, machine)
    if plan.feasible:
        return plan
    if plan.chunk < 1:
        beside = " beside the state" * (plan.placement == "GPU-resident")
        where = "the host" if machine.device != "cuda" else f"a rank's GPU{beside}"
        why = f"not even one image's step fits {where}"
    else:
        why = f"{_size(plan.pinned)} pinned exceed the host's share"
    options = _alternatives(config, num_classes, cost, machine)
    instead = "; would fit: " + "; ".join(options) if options else "; nothing nearby fits: use a larger machine"
    return dataclasses.replace(
        plan,
        message=(
            f"plan: refused: IPC {config.ipc} x {num_classes} classes at {config.resolution} px, optimizer_state "
            f"{config.optimizer_state}, {_placement(config)}, on {machine.describe()}: "
            f"the state is {_size(plan.state)} per rank and {why}{instead}"
        ),
    )


def probe_cost(objective, synset) -> StepCost:
    """The :class:`StepCost` of ``objective``'s chunks (a :class:`fastsfm.distill.objectives.step.TwoPassStep`)
    from two probe forward+backward passes of ``synset``'s first images at its current pyramid.  The
    probes' draws are keyed like any step's: no random stream is consumed."""
    device = objective.device

    def probe(size: int) -> float:
        def run():
            feats, _ = objective.features(synset, 0, size, 0, grad=True)
            feats.float().sum().backward()

        return float(peak_bytes(run, device))

    n = synset.num_images
    sizes = sorted({min(s, n) for s in PROBE_SIZES})
    peaks = {s: probe(s) for s in sizes}
    while peaks[sizes[-1]] < 2 * peaks[sizes[0]] and sizes[-1] < n and len(sizes) < 6:
        sizes.append(min(2 * sizes[-1], n))  # until the images, not a fixed transient, make the peak
        peaks[sizes[-1]] = probe(sizes[-1])
    a, b = sizes[-2:] if len(sizes) > 1 else (sizes[0], sizes[0])
    pa, pb = peaks[a], peaks[b]
    slope = max((pb - pa) / (b - a), 1.0) if b > a else max(pa / a, 1.0)
    precision = objective.dtype or torch.float32
    how = f"step memory measured on {device} ({str(precision).removeprefix('torch.')}, probes of {a} and {b} images)"
    return StepCost(max(pa - a * slope, 0.0), slope, how)
