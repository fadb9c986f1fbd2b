"""Linear gradient matching (LGM, arXiv 2511.16674): the baseline objective, peer of SFM's.

Per step (the authors' ``GeorgeCazenavette/linear-gradient-matching``, ``distillation/linear_gm.py``):
a fresh random linear classifier ``W ~ N(0, 0.01^2)``, ``b = 0``; a real batch of
``ipc * views * C`` images, each augmented once; ``views`` independently augmented copies of
the synthetic set; the cross-entropy gradients of ``(W, b)`` on both sides, flattened into one
vector each; loss ``1 - cos(g_real, g_syn)``, back-propagated through the synthetic gradient
(bi-level).  The same precision policy as SFM (the backbone under autocast; fp16 with the fixed
x1024 loss scale, as LGM's code), so SFM/LGM ratios compare like with like.

The gradient of mean cross-entropy for a linear head is a sum over rows,
``[dW | db] = sum_i (softmax(W f_i + b) - onehot(y_i)) [f_i | 1] / B`` (:func:`linear_ce_sums`),
so the synthetic side needs no double backward through autograd, and LGM runs in the same
**exact two-pass chunks** as SFM (:class:`fastsfm.distill.objectives.step.TwoPassStep`): pass 1 accumulates
the synthetic gradient chunk by chunk without a graph, the loss and ``G = dL/dg_syn`` follow,
pass 2 back-propagates ``<G, [dW | db] of the chunk>``.  So a step whose one graph would not fit
the device (about 3,000 crops at ImageNet-1k, IPC 1, 3 views) runs in chunks instead.

**Real batches**, as LGM's shuffled ``DataLoader`` with ``drop_last``: each epoch is a fresh
permutation of the train set (without replacement) cut into ``floor(N / B)`` batches, the last
partial batch dropped, so no batch holds an image twice; step ``s`` takes batch ``s mod floor(N/B)``
of epoch ``s div floor(N/B)`` -- a function of (seed, step), so a resumed run continues exactly.  They
are loaded in pieces (at most a chunk, and sized so that the pieces the workers keep in flight
fit in shared memory, :func:`fastsfm.data.images.shm_items`), augmented and encoded without a graph.

Deviation: the real images are the dataset's view at the synthetic resolution (Resize(256) +
CenterCrop(256) for image folders), where LGM's loader crops at random (RandomCrop(256)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ... import rng
from ...config import DistillConfig
from ...data.images import default_workers, loader_kwargs, shm_items
from ...models.backbones import Backbone
from ..synset import SyntheticSet
from .step import TwoPassStep

__all__ = ["linear_ce_sums", "linear_ce_grad", "lgm_loss", "LGMObjective", "RealBatches"]

_EPOCH = 1 << 40  # a part of the key space apart from steps, for the epoch permutations


def linear_ce_sums(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``sum_i delta_i [f_i | 1]``, (C, D + 1), with ``delta_i = softmax(W f_i + b) - onehot(y_i)``:
    B times the mean cross-entropy gradient of ``(W, b)`` (bias in the last column)."""
    probs = torch.softmax(features @ weight.T + bias, dim=1)
    delta = probs - F.one_hot(labels, weight.shape[0]).to(probs.dtype)
    return torch.cat([delta.T @ features, delta.sum(0)[:, None]], 1)


def linear_ce_grad(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Flattened ``[dW, db]`` of mean cross-entropy of ``features @ W^T + b``: (C*D + C,)."""
    sums = linear_ce_sums(features, labels, weight, bias) / features.shape[0]
    return torch.cat([sums[:, :-1].flatten(), sums[:, -1]])


def lgm_loss(
    real_features: Tensor, real_labels: Tensor, syn_features: Tensor, syn_labels: Tensor, weight: Tensor, bias: Tensor
) -> Tensor:
    """``1 - cos(g_real, g_syn)`` over the concatenated head gradients (real side detached)."""
    g_real = linear_ce_grad(real_features.detach(), real_labels, weight, bias).detach()
    g_syn = linear_ce_grad(syn_features, syn_labels, weight, bias)
    return 1.0 - F.cosine_similarity(g_real, g_syn, dim=0)


def _generator(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(rng.derive(seed, *parts))


class RealBatches(Sampler):
    """Index pieces of the real batches of steps ``start, start + 1, ...`` (module docstring).

    Each step's batch of ``batch`` positions comes as ``ceil(batch / piece)`` pieces; rank ``rank``
    of ``world`` gets pieces ``rank, rank + world, ...`` of every step (each real image once).
    """

    def __init__(self, size: int, batch: int, piece: int, seed: int, rank: int = 0, world: int = 1):
        if batch > size:
            raise ValueError(
                f"LGM's real batch (ipc x views x classes = {batch} images) is larger than the {size} real "
                "images: a batch would hold images twice (use fewer views or more real images)"
            )
        self.size, self.batch, self.piece, self.seed, self.start = size, batch, piece, seed, 0
        self.rank, self.world = rank, world
        self.per_epoch = size // batch
        self._epoch: tuple[int, Tensor] | None = None

    def pieces_per_step(self) -> int:
        """This rank's pieces of one step."""
        return len(range(self.rank, -(-self.batch // self.piece), self.world))

    def _permutation(self, epoch: int) -> Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            perm = torch.randperm(self.size, generator=_generator(self.seed, rng.REAL_STREAM, _EPOCH + epoch))
            self._epoch = (epoch, perm)
        return self._epoch[1]

    def batch_indices(self, step: int) -> Tensor:
        """The dataset indices of step ``step``'s batch: batch ``step mod floor(N/B)`` of its epoch."""
        epoch, k = divmod(step, self.per_epoch)
        return self._permutation(epoch)[k * self.batch : (k + 1) * self.batch]

    def __iter__(self):
        step = self.start
        while True:
            indices = self.batch_indices(step)
            yield from indices.split(self.piece)[self.rank :: self.world]
            step += 1


class LGMObjective(TwoPassStep):
    """LGM for :func:`fastsfm.distill.loop.distill` (``DistillConfig.method = "lgm"``): views, exact chunks.

    Under ``torch.distributed`` (``group``): each rank holds its classes' synthetic images (their
    head-gradient sums all-reduced, as SFM's class sums) and encodes every ``world``-th piece of the
    step's real batch (its sums all-reduced too; each piece keyed by its place in the batch), so the
    loss and gradients are the single process's up to the order of float sums.  At ImageNet-1k, IPC 1,
    3 views: each of 8 ranks encodes ~375 real and ~375 synthetic crops per step instead of 3,000 each."""

    def __init__(
        self,
        backbone: Backbone,
        real: Dataset,
        num_classes: int,
        config: DistillConfig,
        device: torch.device,
        group=None,
    ):
        super().__init__(backbone, config, device, group)
        self.num_classes = num_classes
        self.batch = config.ipc * self.views * num_classes
        image = real[0][0]
        workers = default_workers() if config.workers is None else config.workers
        fits = shm_items(image.numel() * image.element_size(), workers)
        piece = min(self.batch, config.chunk_size or self.batch, 256)
        if fits < piece:  # pieces in flight would overflow shared memory: smaller pieces, else no workers
            piece, workers = (fits, workers) if fits >= 16 else (piece, 0)
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
        self.sampler = RealBatches(len(real), self.batch, piece, config.seed, rank, world)
        self.loader = DataLoader(real, batch_sampler=self.sampler, **loader_kwargs(self.device, workers))
        self.pieces, self.next_step = None, None
        self.weight = self.bias = self.g_real = None
        self.rows_per_step = 0

    def _real_pieces(self, step: int):
        if self.next_step != step:  # first call, or a jump (resume): restart the loader at this step
            self.sampler.start = step
            self.pieces = iter(self.loader)
        self.next_step = step + 1
        sampler = self.sampler
        for k in range(sampler.pieces_per_step()):
            images, labels = next(self.pieces)
            offset = (sampler.rank + k * sampler.world) * sampler.piece  # the piece's place in the batch
            yield offset, images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    @torch.no_grad()
    def begin(self, synset: SyntheticSet, step: int) -> None:
        """The step's random head and the real gradient (its batch encoded piece by piece, no graph)."""
        gen = _generator(self.seed, rng.HEAD_STREAM, step)
        self.weight = (torch.randn(self.num_classes, self.backbone.feature_dim, generator=gen) * 0.01).to(self.device)
        self.bias = torch.zeros(self.num_classes, device=self.device)
        base = rng.derive(self.seed, rng.REAL_STREAM, step)
        total = torch.zeros(self.num_classes, self.backbone.feature_dim + 1, device=self.device)
        for offset, images, labels in self._real_pieces(step):
            keys = rng.derive(base, torch.arange(offset, offset + len(images), device=self.device))
            total += linear_ce_sums(self.backbone(self.augment(images, keys)), labels, self.weight, self.bias)
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        self.g_real = total / self.batch
        self.rows_per_step = self.views * self.config.ipc * self.num_classes  # every rank's synthetic rows

    def accumulate(self, feats: Tensor, labels: Tensor, total: Tensor | None) -> Tensor:
        sums = linear_ce_sums(feats, labels, self.weight, self.bias)
        return sums if total is None else total + sums

    def finish(self, total: Tensor) -> tuple[Tensor, Tensor]:
        g_syn = (total / self.rows_per_step).requires_grad_()
        with torch.enable_grad():
            loss = 1.0 - F.cosine_similarity(self.g_real.flatten(), g_syn.flatten(), dim=0)
            (grad,) = torch.autograd.grad(loss, g_syn)
        return loss.detach(), grad / self.rows_per_step

    def backward(self, feats: Tensor, labels: Tensor, grad: Tensor) -> None:
        (linear_ce_sums(feats, labels, self.weight, self.bias) * (grad * self.scale)).sum().backward()
