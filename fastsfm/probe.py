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
from tqdm.auto import tqdm

__all__ = ["fit_linear_classifier", "train_head_on_images", "encode", "accuracy", "new_head"]


def new_head(dim: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def fit_linear_classifier(features: Tensor, labels: Tensor, num_classes: int, epochs: int = 100,
                          batch_size: int = 4096, lr: float = 1e-2, device: str | torch.device = "cpu",
                          seed: int = 0, progress: bool = False) -> nn.Linear:
    """Softmax regression on cached features (N, D) -> ``nn.Linear(D, C)``.

    Adam + cosine schedule over ``epochs`` passes on the raw backbone features (as the
    head sees them at inference).  Runs with gradients enabled even inside ``no_grad``.
    """
    gen = torch.Generator().manual_seed(seed)
    head = new_head(features.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in tqdm(range(epochs), desc="real-data classifier", disable=not progress, unit="epoch"):
            order = torch.randperm(len(labels), generator=gen)
            for start in range(0, len(labels), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(head(features[idx].to(device).float()), labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return head.eval()


@torch.no_grad()
def encode(backbone: nn.Module, images: Tensor, batch_size: int = 256, device: str | torch.device = "cpu") -> Tensor:
    """Features (N, D) float32 of images (N, 3, H, W), batched, no grad."""
    return torch.cat([backbone(images[i:i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)])


def train_head_on_images(backbone: nn.Module, images: Tensor, labels: Tensor, head: nn.Module, augment: nn.Module,
                         epochs: int, device: str | torch.device = "cpu", seed: int = 0,
                         lr: float | None = None, loss_fn=None) -> nn.Module:
    """Train ``head`` (any module on features) on ``images`` (N, 3, H, W) in [0, 1].

    Every batch is augmented by ``augment`` and encoded by the frozen ``backbone``; LGM's
    learning-rate rule and cosine schedule.  ``loss_fn(head_output, labels)`` defaults to
    cross-entropy.  Used by linear probes and by classifier inheritance's projector.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = min(100, len(images))
    head = head.to(device).train()
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=lr or 1e-3 * batch / 256)
    steps = epochs * math.ceil(len(images) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = loss_fn or F.cross_entropy
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            for start in range(0, len(images), batch):
                idx = order[start:start + batch]
                with torch.no_grad():
                    feats = backbone(augment(images[idx].to(device))).float()
                loss = loss_fn(head(feats), labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return head.eval()


@torch.no_grad()
def accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (in %) of ``head`` on cached test features."""
    pred = head(features.to(next(head.parameters()).device)).argmax(1).cpu()
    return 100.0 * float((pred == labels.cpu()).float().mean())
