"""Linear gradient matching (LGM, arXiv 2511.16674): the baseline objective, peer of SFM's.

Per step (``shared/references/lgm.md``): a fresh random linear classifier ``W ~ N(0, 0.01^2)``,
``b = 0``; a real batch of ``ipc * augs * C`` images drawn uniformly (not class-balanced),
each augmented once; ``augs`` independently augmented copies of the synthetic set; the
cross-entropy gradients of ``(W, b)`` on both sides, flattened into one vector each; loss
``1 - cos(g_real, g_syn)``, back-propagated through the synthetic gradient (bi-level).
The same precision policy as SFM (the backbone under autocast; fp16 with the fixed x1024
loss scale, as LGM's code), so SFM/LGM ratios compare like with like.

The gradient of mean cross-entropy for a linear head is closed-form,
``dW = (softmax(z) - onehot)^T f / B`` and ``db = mean(softmax(z) - onehot)``, so the
synthetic side needs no double backward through autograd; :func:`linear_ce_grad` is tested
against ``torch.autograd.grad(create_graph=True)``.

Deviation: the real batch is the dataset's view at the synthetic resolution (Resize(256) +
CenterCrop(256) for image folders), where LGM's loader crops at random (RandomCrop(256)).
Its indices and the random head are functions of (seed, step), and the batches come from a
``DataLoader`` with workers, so a resumed run continues exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import rng
from ..augment import BatchAugment
from ..backbones import Backbone
from ..config import DistillConfig
from ..objective import HEAD_STREAM, REAL_STREAM, augment_keys
from ..optim import ChunkAdam
from ..precision import loss_scale
from ..synset import SyntheticSet

__all__ = ["linear_ce_grad", "lgm_loss", "LGMObjective"]


def linear_ce_grad(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Flattened ``[dW, db]`` of mean cross-entropy of ``features @ W^T + b``: (C*D + C,)."""
    probs = torch.softmax(features @ weight.T + bias, dim=1)
    delta = (probs - F.one_hot(labels, weight.shape[0]).to(probs.dtype)) / features.shape[0]
    return torch.cat([(delta.T @ features).flatten(), delta.sum(0)])


def lgm_loss(
    real_features: Tensor, real_labels: Tensor, syn_features: Tensor, syn_labels: Tensor, weight: Tensor, bias: Tensor
) -> Tensor:
    """``1 - cos(g_real, g_syn)`` over the concatenated head gradients (real side detached)."""
    g_real = linear_ce_grad(real_features.detach(), real_labels, weight, bias).detach()
    g_syn = linear_ce_grad(syn_features, syn_labels, weight, bias)
    return 1.0 - F.cosine_similarity(g_real, g_syn, dim=0)


def _step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.derive(seed, stream, step)))


class _StepBatches(Sampler):
    """Index batches for steps ``start, start+1, ...``: uniform with replacement, a function of (seed, step)."""

    def __init__(self, size: int, batch: int, seed: int):
        self.size, self.batch, self.seed, self.start = size, batch, seed, 0

    def __iter__(self):
        step = self.start
        while True:
            yield torch.randint(self.size, (self.batch,), generator=_step_generator(self.seed, step, REAL_STREAM))
            step += 1


class LGMObjective:
    """LGM for :func:`fastsfm.distill.distill` (``DistillConfig.method = "lgm"``)."""

    def __init__(
        self,
        backbone: Backbone,
        real: Dataset,
        num_classes: int,
        config: DistillConfig,
        device: torch.device,
        workers: int = 2,
    ):
        self.backbone, self.num_classes, self.device = backbone, num_classes, torch.device(device)
        self.augment = BatchAugment(backbone.input_size, noise_std=config.noise_std, noise_mean=config.noise_mean)
        self.augs, self.seed = config.lgm_augs, config.seed
        self.scale = loss_scale(backbone.autocast_dtype())
        self.sampler = _StepBatches(len(real), config.ipc * config.lgm_augs * num_classes, config.seed)
        self.loader = DataLoader(
            real, batch_sampler=self.sampler, num_workers=workers, pin_memory=self.device.type == "cuda"
        )
        self.batches, self.next_step = None, None

    def _real_batch(self, step: int) -> tuple[Tensor, Tensor]:
        if self.next_step != step:  # first call, or a jump (resume): restart the loader at this step
            self.sampler.start = step
            self.batches = iter(self.loader)
        self.next_step = step + 1
        images, labels = next(self.batches)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def step(self, synset: SyntheticSet, optim: ChunkAdam, step: int) -> float:
        gen = _step_generator(self.seed, step, HEAD_STREAM)
        weight = (torch.randn(self.num_classes, self.backbone.feature_dim, generator=gen) * 0.01).to(self.device)
        bias = torch.zeros(self.num_classes, device=self.device)
        real_x, real_y = self._real_batch(step)
        real_keys = rng.derive(self.seed, REAL_STREAM, step, torch.arange(len(real_x), device=self.device))
        with torch.no_grad():
            real_f = self.backbone(self.augment(real_x, real_keys))
        params = synset.chunk(0, synset.num_images, self.device, requires_grad=True)
        images = synset.render_levels(params).repeat(self.augs, 1, 1, 1)
        keys = augment_keys(self.seed, step, self.augs, synset.image_ids.to(self.device))
        syn_f = self.backbone(self.augment(images, keys))
        labels = synset.labels.to(self.device).repeat(self.augs)
        loss = lgm_loss(real_f, real_y, syn_f, labels, weight, bias)
        (loss * self.scale).backward()
        optim.step_chunk(0, synset.num_images, params, grad_scale=1.0 / self.scale)
        optim.finish_step()
        return loss.item()
