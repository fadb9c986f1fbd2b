"""Linear probes: fitting on features, training on (augmented) images, accuracy.

The image-level protocol follows LGM's evaluation (arXiv 2511.16674, ``shared/references``):
a fresh linear head with N(0, 0.01^2) weights and zero bias, Adam with
``lr = 1e-3 * batch / 256``, cosine annealing to 0, batch ``min(100, #images)``, every batch
re-augmented (flip + random-resized crop) and re-encoded by the frozen backbone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .progress import track

__all__ = ["fit_linear_classifier", "train_head_on_images", "encode", "accuracy", "new_head"]


def new_head(dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """LGM's probe head: weights N(0, 0.01^2) drawn from a generator seeded by ``seed``, zero bias."""
    head = nn.Linear(dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, dim, generator=gen) * 0.01)
        head.bias.zero_()
    return head


def _minibatch_train(
    head: nn.Module,
    n: int,
    batch: int,
    epochs: int,
    lr: float,
    seed: int,
    features_of,
    labels: Tensor,
    device,
    desc: str | None = None,
) -> nn.Module:
    """Adam + cosine annealing to 0 over ``epochs`` shuffled passes of ``n`` samples, cross-entropy.

    ``features_of(idx)`` returns the (B, D) inputs of the head for sample indices ``idx``.
    Seeded (shuffling and any global-RNG use inside ``features_of``), gradients enabled even
    under ``no_grad``.
    """
    gen = torch.Generator().manual_seed(seed)
    head = head.to(device).train()
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / batch))
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        for _ in track(range(epochs), desc or "", enabled=desc is not None, unit="epoch"):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                loss = F.cross_entropy(head(features_of(idx)), labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return head.eval()


def fit_linear_classifier(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 4096,
    lr: float = 1e-2,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> nn.Linear:
    """Softmax regression on cached features (N, D) -> ``nn.Linear(D, C)``, on the raw
    backbone features (as the head sees them at inference)."""
    head = new_head(features.shape[1], num_classes, seed)
    return _minibatch_train(
        head,
        len(labels),
        batch_size,
        epochs,
        lr,
        seed,
        lambda idx: features[idx].to(device).float(),
        labels,
        device,
        "real-data classifier" if progress else None,
    )


@torch.no_grad()
def encode(backbone: nn.Module, images: Tensor, batch_size: int = 256, device: str | torch.device = "cpu") -> Tensor:
    """Features (N, D) float32 of images (N, 3, H, W), batched, no grad."""
    return torch.cat(
        [backbone(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    )


def train_head_on_images(
    backbone: nn.Module,
    images: Tensor,
    labels: Tensor,
    head: nn.Module,
    augment: nn.Module,
    epochs: int,
    device: str | torch.device = "cpu",
    seed: int = 0,
    lr: float | None = None,
) -> nn.Module:
    """Train ``head`` (any module on features) on ``images`` (N, 3, H, W) in [0, 1].

    Every batch is augmented by ``augment`` and encoded by the frozen ``backbone``; LGM's
    batch ``min(100, N)``, learning rate ``1e-3 * batch / 256`` unless ``lr`` is given, and
    cosine schedule.  Used by linear probes and by classifier inheritance's projector.
    """
    batch = min(100, len(images))

    def features_of(idx: Tensor) -> Tensor:
        with torch.no_grad():
            keys = torch.randint(2**31, (len(idx),), device=device)  # seeded: runs inside the probe's fork_rng
            return backbone(augment(images[idx].to(device), keys)).float()

    return _minibatch_train(
        head, len(images), batch, epochs, lr or 1e-3 * batch / 256, seed, features_of, labels, device
    )


@torch.no_grad()
def accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (in %) of ``head`` on cached test features."""
    pred = head(features.to(next(head.parameters()).device)).argmax(1).cpu()
    return 100.0 * float((pred == labels.cpu()).float().mean())
