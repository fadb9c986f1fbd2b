"""Linear heads: the real-data classifier, heads trained on augmented images, encoding, accuracy.

The image-level protocol is the authors' (``distillation/eval_syn.py``): batches of
``min(100, N)`` images, shuffled every epoch, every batch freshly augmented (flip and
random-resized crop) and encoded by the frozen backbone(s), Adam with cosine annealing
stepped once per epoch, accuracy measured once after the last epoch.

Because the backbones are frozen and the augmentation does not depend on the heads, the
views of a whole block of epochs are drawn first and encoded in large batches
(:func:`train_heads`); the heads then train on exactly the features they would have seen
batch by batch -- the same protocol, one large forward instead of thousands of small ones.
Several heads (probe, inheritance, KD) can share one set of views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .config import ClassifierConfig
from .data import loader_kwargs
from .progress import Progress, track

__all__ = ["new_head", "fit_linear_classifier", "encode", "topk_accuracy", "Head", "train_heads"]

_VIEWS_PER_BLOCK = 50_000  # augmented views encoded at once (bounds the cached features' memory)


def new_head(dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """The authors' linear head: weights N(0, 0.01^2) from a generator seeded by ``seed``, zero bias."""
    head = nn.Linear(dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, dim, generator=gen) * 0.01)
        head.bias.zero_()
    return head


def fit_linear_classifier(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    config: ClassifierConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> nn.Linear:
    """Softmax regression on cached features (N, D) -> ``nn.Linear(D, C)`` (see :class:`ClassifierConfig`)."""
    config = config or ClassifierConfig()
    head = new_head(features.shape[1], num_classes, seed).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=config.classifier_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.classifier_epochs)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in track(range(config.classifier_epochs), "real-data classifier", enabled=progress, unit="epoch"):
            order = torch.randperm(len(labels), generator=gen)
            for start in range(0, len(labels), config.classifier_batch):
                idx = order[start : start + config.classifier_batch]
                loss = F.cross_entropy(head(features[idx].to(device).float()), labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def encode(
    backbone: nn.Module,
    images: Tensor | Dataset,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int | None = 0,
    progress: bool = False,
) -> Tensor:
    """Features (N, D) float32 (on CPU) of images (N, 3, H, W) or of an image dataset, batched, no grad
    (a dataset is decoded by ``workers`` loader processes, None: :func:`fastsfm.data.default_workers`)."""
    if isinstance(images, Tensor):
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        total = (len(images) + batch_size - 1) // batch_size
    else:
        loader = DataLoader(images, batch_size=batch_size, **loader_kwargs(device, workers))
        batches = (x for x, _ in loader)
        total = None
    return torch.cat(
        [
            backbone(x.to(device, non_blocking=True)).float().cpu()
            for x in track(batches, "encoding", total=total, enabled=progress, unit="batch")
        ]
    )


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float | None]:
    """Top-k accuracy in % for each k (None where k >= the number of classes, as 'top-5 of 4 classes')."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices.cpu()
    hit = top == labels.cpu()[:, None]
    return {k: (100.0 * float(hit[:, :k].any(1).float().mean()) if k < logits.shape[1] or k == 1 else None) for k in ks}


@dataclass
class Head:
    """One trainable head: its module, the loss of a batch, and its learning rate.

    ``loss(features, labels)`` gets the features of the batch's views from every encoding
    backbone (a dict keyed as :func:`train_heads`' ``backbones``) and the labels.
    """

    module: nn.Module
    loss: Callable[[dict[str, Tensor], Tensor], Tensor]
    lr: float


def _plan(n: int, epochs: int, batch: int, seed: int) -> list[list[tuple[Tensor, Tensor]]]:
    """For each epoch, its batches: (image indices, augmentation keys), seeded."""
    gen = torch.Generator().manual_seed(seed)
    plan = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        plan.append(
            [
                (order[s : s + batch], torch.randint(2**31, (len(order[s : s + batch]),), generator=gen))
                for s in range(0, n, batch)
            ]
        )
    return plan


@torch.no_grad()
def _encode_views(
    images: Tensor,
    batches: list[tuple[Tensor, Tensor]],
    backbones: dict[str, nn.Module],
    augment: nn.Module,
    device: torch.device,
    chunk: int = 512,
) -> dict[str, Tensor]:
    idx = torch.cat([i for i, _ in batches])
    keys = torch.cat([k for _, k in batches])
    outs: dict[str, list[Tensor]] = {name: [] for name in backbones}
    for s in range(0, len(idx), chunk):
        views = augment(images[idx[s : s + chunk]].to(device), keys[s : s + chunk].to(device))
        for name, backbone in backbones.items():
            outs[name].append(backbone(views).float())
    return {name: torch.cat(o) for name, o in outs.items()}


def train_heads(
    heads: dict,
    images: Tensor,
    labels: Tensor,
    backbones: dict[str, nn.Module],
    augment: nn.Module,
    epochs: int,
    batch: int,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> None:
    """Train every head on the same augmented views of ``images`` (N, 3, H, W), the authors' protocol;
    each backbone of ``backbones`` (keyed as the heads' losses expect) encodes each view once.

    Each head has its own Adam (``head.lr``) and cosine schedule over ``epochs`` (stepped per
    epoch); the batch is ``min(batch, N)``.
    """
    device = torch.device(device)
    n = len(images)
    batch = min(batch, n)
    labels = labels.to(device)
    opts = {}
    for name, head in heads.items():
        head.module.to(device).train()
        opt = torch.optim.Adam([p for p in head.module.parameters() if p.requires_grad], lr=head.lr)
        opts[name] = (opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs))
    plan = _plan(n, epochs, batch, seed)
    per_block = max(1, _VIEWS_PER_BLOCK // n)
    bar = Progress(epochs, "training heads", enabled=progress, unit="epoch", interval=30)
    with torch.enable_grad():
        for first in range(0, epochs, per_block):
            block = plan[first : first + per_block]
            feats = _encode_views(images, [b for epoch in block for b in epoch], backbones, augment, device)
            offset = 0
            for epoch in block:
                for idx, _ in epoch:
                    rows = slice(offset, offset + len(idx))
                    offset += len(idx)
                    for name, head in heads.items():
                        loss = head.loss({k: f[rows] for k, f in feats.items()}, labels[idx.to(device)])
                        opt = opts[name][0]
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                for _, sched in opts.values():
                    sched.step()
                bar.update()
    bar.close()
    for head in heads.values():
        head.module.eval()
