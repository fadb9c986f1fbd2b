"""Adam over the synthetic set, stepped a chunk of images at a time, wherever the set is stored.

Adam is elementwise, and an image's parameters are its own pyramid levels, so stepping the
images chunk by chunk -- right after each chunk's gradient is known -- is exactly one Adam
step of the whole set.  That is what lets a set in host memory (``offload``) be optimised on
the GPU one chunk at a time: the chunk's levels and moments are copied in, stepped by
``torch.optim.Adam`` there, and copied back (asynchronously; the loop's loss readback, queued
after them on the same stream, orders them before any host read).  Without offload the
chunk's tensors are views of the stored ones and the step happens in place.  Either way the
same code runs, so offloaded and resident runs give the same images.

The moments live beside the levels (same storage, exact-size page-locked host memory when
offloaded) in the run's ``optimizer_state`` (:mod:`fastsfm.distill.moments`: float32, bfloat16 or
blockwise 8-bit codes; the update is float32 in every mode, on moments loaded for the chunk and
stored back after it); a new pyramid level zeroes them in place and adds moments for the new
level only, as LGM re-creates its optimiser at each level.

**Non-finite gradients** (``check_finite``, the fp16 policy): each chunk's gradients are
unscaled and checked on the device (``torch._amp_foreach_non_finite_check_and_unscale_``, no
host synchronisation); a chunk with an Inf or NaN keeps its parameters and moments for that
step (the update is undone on the device), as a gradient scaler skips a step, and
:attr:`ChunkAdam.skipped` counts such chunks for the loop to report.  So an overflow never
poisons the images, their moments or a checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import OptimizerState
from .moments import Moment
from .streams import ChunkStreams
from .synset import SyntheticSet

__all__ = ["ChunkAdam"]


class ChunkAdam:
    """Adam (``torch.optim.Adam`` semantics, no weight decay) for a :class:`SyntheticSet`.

    ``in_step`` is True from the first chunk of a step until :meth:`finish_step`, which the
    loop calls once the step's loss is on the host.  ``fused`` (default: on CUDA) runs
    ``torch.optim.Adam(fused=True)``: one kernel for all the chunk's levels, its step count a
    device tensor (kept on the device between steps, so no step copies a count from the host).
    """

    def __init__(
        self,
        synset: SyntheticSet,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        check_finite: bool = False,
        fused: bool | None = None,
        optimizer_state: OptimizerState = "fp32",
    ):
        self.synset, self.lr, self.betas, self.eps, self.check_finite = synset, lr, betas, eps, check_finite
        self.fused, self.mode = fused, optimizer_state
        self._device_steps: Tensor | None = None  # the fused path's step count, on the device
        self.in_step = False
        self.skipped: Tensor | None = None  # chunks skipped for non-finite gradients (device counter)
        self.exp_avg: list[Moment] = []
        self.exp_avg_sq: list[Moment] = []
        self.reset()

    def reset(self) -> None:
        """Zero moments and step count for every level (at start and whenever a level is added):
        existing moments are zeroed in place, only the new levels' are allocated."""
        for moments, signed in ((self.exp_avg, True), (self.exp_avg_sq, False)):
            for m in moments:
                m.zero_()
            for level in self.synset.levels[len(moments) :]:
                moments.append(Moment(tuple(level.shape), self.mode, signed, self.synset.empty))
        self.steps, self._device_steps = 0, None

    def _unscale(self, params: list[Tensor], grad_scale: float) -> Tensor | None:
        """Multiply the gradients by ``grad_scale``; with ``check_finite`` also return a (1,) flag of
        non-finite ones."""
        grads = [p.grad for p in params]
        if not self.check_finite:
            if grad_scale != 1.0:
                torch._foreach_mul_(grads, grad_scale)
            return None
        device = params[0].device
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.full((1,), grad_scale, device=device))
        return found

    def stored_rows(self, start: int, stop: int) -> list[Tensor]:
        """The stored moment tensors' rows ``start:stop``, level by level (first moment's, then second's
        parts): what :meth:`step_chunk` takes as ``moments`` once they are on the device."""
        return [
            t[start:stop]
            for a, b in zip(self.exp_avg, self.exp_avg_sq, strict=True)
            for m in (a, b)
            for t in m.stored()
        ]

    def step_chunk(
        self,
        start: int,
        stop: int,
        params: list[Tensor],
        grad_scale: float = 1.0,
        moments: list[Tensor] | None = None,
        streams: ChunkStreams | None = None,
    ) -> None:
        """One Adam step of images ``start:stop``, whose levels ``params`` (from
        ``synset.chunk(start, stop, device, requires_grad=True)``) hold their gradients,
        multiplied by ``grad_scale`` first (the inverse of a loss scale).

        ``moments``: :meth:`stored_rows` already on the device (an offloaded set's upload stream
        fetched them during the previous chunk); default: fetched now.  ``streams``: the updated
        levels and moments of an offloaded set are written back on its download stream
        (:mod:`fastsfm.distill.streams`); default: copied on the compute stream."""
        self.in_step = True
        device = params[0].device
        found = self._unscale(params, grad_scale)
        fused = self.fused if self.fused is not None else device.type == "cuda"
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()  # a CUDA graph's step
        opt = torch.optim.Adam(
            params, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused or None, capturable=capturing
        )
        parts = iter(moments) if moments is not None else None
        states = []
        for i, p in enumerate(params):
            state = {"step": self._step_count(device) if fused else torch.tensor(float(self.steps))}
            for name, m in (("exp_avg", self.exp_avg[i]), ("exp_avg_sq", self.exp_avg_sq[i])):
                fetched = m.fetch(start, stop, device) if parts is None else [next(parts) for _ in m.stored()]
                state[name] = m.decode(fetched)
            opt.state[p] = state
            states.append(state)
        touched = [t for p, s in zip(params, states, strict=True) for t in (p, s["exp_avg"], s["exp_avg_sq"])]
        before = [t.detach().clone() for t in touched] if found is not None else None
        opt.step()
        if found is not None:
            skip = found.bool()
            for old, new in zip(before, touched, strict=True):
                new.data.copy_(torch.where(skip, old, new.detach()))
            self.skipped = found if self.skipped is None else self.skipped + found
        self._write_back(start, stop, params, states, streams)

    def _write_back(
        self, start: int, stop: int, params: list[Tensor], states: list[dict], streams: ChunkStreams | None
    ) -> None:
        """Store the chunk's updated levels and moments where the set keeps them (nothing to copy for
        the views of a resident set): on ``streams``' download stream, or now on the compute stream."""
        pairs = []
        for i, (level, p, state) in enumerate(zip(self.synset.levels, params, states, strict=True)):
            if level[start:stop].data_ptr() != p.data_ptr():  # offloaded: back to host memory
                pairs.append((level[start:stop], p.detach()))
            for name, m in (("exp_avg", self.exp_avg[i]), ("exp_avg_sq", self.exp_avg_sq[i])):
                pairs += m.put(start, stop, m.encode(state[name]), non_blocking=True)
        if streams is not None:
            streams.download(pairs, ("write-back", start))
            return
        for dst, src in pairs:
            dst.copy_(src, non_blocking=self.synset.offload)

    def _step_count(self, device: torch.device) -> Tensor:
        """A copy of the step count on ``device`` (Adam increments the copy it is given)."""
        if self._device_steps is None or self._device_steps.device != device:
            self._device_steps = torch.full((), float(self.steps), device=device)  # a fill, not a copy
        return self._device_steps.clone()

    def finish_step(self) -> None:
        """Call once all chunks of a step were stepped and the step's loss was read back."""
        self.steps += 1
        if self._device_steps is not None:
            self._device_steps.add_(1)
        self.in_step = False

    def state(self) -> dict[str, Tensor]:
        """Moments for checkpoints (``adam.exp_avg.i``, ``adam.exp_avg_sq.i``; 8bit levels: their
        ``.codes`` and ``.scale``); the step count is :attr:`steps`."""
        out = {}
        for name, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            for i, m in enumerate(moments):
                out.update(m.tensors(f"adam.{name}.{i}"))
        return out

    def nbytes(self) -> int:
        """Bytes the moments hold now (codes and scales included)."""
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def load_state(self, tensors: dict[str, Tensor], steps: int) -> None:
        """Restore :meth:`state` (one moment per level of the restored set) and the step count."""
        self.exp_avg, self.exp_avg_sq = [], []
        self.reset()
        for name, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            for i, m in enumerate(moments):
                m.load_tensors(tensors, f"adam.{name}.{i}", self.synset.store)
        self.steps, self._device_steps = steps, None
