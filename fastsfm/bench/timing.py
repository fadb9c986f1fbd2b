"""The timed distillation step: what the demo, the grid's projection and ``benches/`` measure.

:func:`distill_setup` builds a step as after the pyramid's last growth (random statistics and
images: time and memory do not depend on the values); :func:`run_step`, :func:`step_seconds`
and :func:`time_steps` time it; :func:`fastsfm.memory.peak_bytes` measures its peak memory.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["distill_setup", "run_step", "time_steps", "step_seconds", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing is queued on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Cycled(torch.utils.data.Dataset):
    """``base`` seen as ``length`` items (item i is ``base[i % len(base)]``): enough distinct indices
    for one real batch of LGM without holding that many random images."""

    def __init__(self, base, length: int):
        self.base, self.length = base, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.base[i % len(self.base)]


def distill_setup(
    backbone,
    config,
    classes: int,
    device: torch.device,
    real_per_class: int = 2,
    seed: int = 0,
):
    """What one timed distillation step needs: random statistics of ``backbone`` (of each member of a
    :class:`fastsfm.models.ensemble.BackboneEnsemble`) for ``classes`` classes, random real images at
    ``config.resolution``
    (``real_per_class`` each, cycled to as many indices as one LGM real batch needs), a synthetic set with every
    pyramid level (as after its last growth), its optimiser and the objective of
    ``config.method`` -- ``(synset, optim, objective)``.  Time and memory do not depend on the values."""
    from torch.utils.data import TensorDataset

    from ..distill.objectives import build_objective
    from ..distill.optim import ChunkAdam
    from ..distill.synset import SyntheticSet
    from ..models.ensemble import members_of
    from ..stats import ClassStats

    res = config.resolution
    gen = torch.Generator().manual_seed(seed)
    stats = [
        ClassStats(
            torch.randn(classes, member.feature_dim, generator=gen),
            torch.full((classes,), real_per_class),
            torch.zeros(classes, member.feature_dim),
            torch.zeros(classes),
            [str(i) for i in range(classes)],
            {"backbone": member.identity},
        ).to(device)
        for member in members_of(backbone)
    ]
    real = TensorDataset(
        torch.rand(classes * real_per_class, 3, res, res, generator=gen),
        torch.arange(classes).repeat_interleave(real_per_class),
    )
    batch = config.ipc * config.effective_views * classes  # LGM's real batch: at least that many indices
    real = _Cycled(real, max(len(real), batch))
    storage = "cpu" if config.offload else device
    synset = SyntheticSet(classes, config.ipc, res, extent=1, storage=storage, offload=bool(config.offload), seed=seed)
    step = 0
    while len(synset.levels) < len(synset.sizes):
        step += 1
        synset.grow(step, device)
    optim = ChunkAdam(
        synset,
        config.lr,
        check_finite=backbone.autocast_dtype() == torch.float16,
        optimizer_state=config.optimizer_state,
    )
    return synset, optim, build_objective(config, backbone, stats, device, real=real)


def run_step(objective, synset, optim, step: int) -> float:
    """One step as the distillation loop runs it: queue it, read the loss back, finish the optimiser step."""
    loss = float(objective.step(synset, optim, step))
    optim.finish_step()
    return loss


def time_steps(objective, synset, optim, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps, after one warm-up step (which also sizes the chunks):
    the mean of :func:`step_seconds`."""
    return statistics.fmean(step_seconds(objective, synset, optim, steps, device))


def step_seconds(objective, synset, optim, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` steps timed one by one (each reads its loss back), after one
    warm-up step: the samples whose median and spread a noisy host reports honestly."""
    run_step(objective, synset, optim, 0)
    synchronize(device)
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        run_step(objective, synset, optim, step)
        times.append(time.perf_counter() - start)
    return times
