"""Adam over the synthetic set, stepped a chunk of images at a time, wherever the set is stored.

Adam is elementwise, and an image's parameters are its own pyramid levels, so stepping the
images chunk by chunk -- right after each chunk's gradient is known -- is exactly one Adam
step of the whole set.  That is what lets a set in pinned host memory (``offload``) be
optimised on the GPU one chunk at a time: the chunk's levels and moments are copied in,
stepped by ``torch.optim.Adam`` there, and copied back.  Without offload the chunk's
tensors are views of the stored ones and the step happens in place.  Either way the same
code runs, so offloaded and resident runs give the same images.

The moments live beside the levels (same storage); a new pyramid level resets them all, as
LGM re-creates its optimiser at each level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .synset import SyntheticSet

__all__ = ["ChunkAdam"]


class ChunkAdam:
    """Adam (``torch.optim.Adam`` semantics, no weight decay) for a :class:`SyntheticSet`."""

    def __init__(self, synset: SyntheticSet, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.synset, self.lr, self.betas, self.eps = synset, lr, betas, eps
        self.in_step = False  # True from the first chunk of a step until finish_step
        self.reset()

    def reset(self) -> None:
        """Fresh moments and step count for every level (at start and whenever a level is added)."""
        store = self.synset.store
        self.exp_avg = [store(torch.zeros_like(level)) for level in self.synset.levels]
        self.exp_avg_sq = [store(torch.zeros_like(level)) for level in self.synset.levels]
        self.steps = 0

    def step_chunk(self, start: int, stop: int, params: list[Tensor], grad_scale: float = 1.0) -> None:
        """One Adam step of images ``start:stop``, whose levels ``params`` (from
        ``synset.chunk(start, stop, device, requires_grad=True)``) hold their gradients,
        multiplied by ``grad_scale`` first (the inverse of a loss scale)."""
        self.in_step = True
        device = params[0].device
        opt = torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps)
        moments = []
        for i, p in enumerate(params):
            avg, sq = (m[start:stop] for m in (self.exp_avg[i], self.exp_avg_sq[i]))
            state = {
                "step": torch.tensor(float(self.steps)),
                "exp_avg": avg.to(device, non_blocking=True),
                "exp_avg_sq": sq.to(device, non_blocking=True),
            }
            opt.state[p] = state
            moments.append((avg, sq, state))
            if grad_scale != 1.0:
                p.grad.mul_(grad_scale)
        opt.step()
        for level, p, (avg, sq, state) in zip(self.synset.levels, params, moments, strict=True):
            for stored, new in ((level[start:stop], p), (avg, state["exp_avg"]), (sq, state["exp_avg_sq"])):
                if stored.data_ptr() != new.data_ptr():  # offloaded: copy the chunk back to host memory
                    stored.copy_(new.detach(), non_blocking=True)

    def finish_step(self) -> None:
        """Call once all chunks of a step were stepped."""
        self.steps += 1
        self.in_step = False
        if self.synset.storage.type == "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()  # host copies of the last chunk must land before anyone reads them

    def state(self) -> dict[str, Tensor]:
        """Moments for checkpoints (``adam.exp_avg.i``, ``adam.exp_avg_sq.i``); the step count is
        :attr:`steps`."""
        out = {f"adam.exp_avg.{i}": t for i, t in enumerate(self.exp_avg)}
        out.update({f"adam.exp_avg_sq.{i}": t for i, t in enumerate(self.exp_avg_sq)})
        return out

    def load_state(self, tensors: dict[str, Tensor], steps: int) -> None:
        store = self.synset.store
        count = len(self.synset.levels)
        self.exp_avg = [store(tensors[f"adam.exp_avg.{i}"].clone()) for i in range(count)]
        self.exp_avg_sq = [store(tensors[f"adam.exp_avg_sq.{i}"].clone()) for i in range(count)]
        self.steps = steps
