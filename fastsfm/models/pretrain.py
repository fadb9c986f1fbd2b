"""Self-supervised pretraining of the demo backbones (SimCLR on the digits, no labels).

SFM exists for frozen *self-supervised* backbones; no such weights ship in any package the
demo may use offline, so fastsfm trains two tiny ones itself and ships them
(``fastsfm/weights/*.safetensors``, a few hundred kB each):

* ``digits_vit``: timm's ``test_vit`` (6 blocks, width 64, 2 heads) with 4x4 patches at 32 px;
* ``digits_resnet``: timm's ``test_resnet`` (a 4-stage ResNet of widths 32-96) at 32 px.

Objective: SimCLR (Chen et al. 2020) -- two augmented views of every image, an MLP
projection head, the NT-Xent loss at temperature ``temperature`` (or, with ``loss``, a
generalized contrastive alignment loss, :func:`fastsfm.gca_loss` with the views as row blocks)
-- on the digits *train* split only, labels unused.  Views: random-resized crops (area 0.35-1), no flips (digits are
not mirror-symmetric), Gaussian noise (std 0.1, p 0.5), random contrast and brightness, and
(``colour``, the default) random colour: per-channel gains in [0.3, 1.7] and offsets in
[-0.25, 0.25], then grey again with probability 0.2, as SimCLR's colour distortion does for
natural images -- so the backbones see colour and learn to look past it, as backbones
pre-trained on natural images do (grey-only pretraining left them blind to colour, which the
demo's distilled images then exploited; README, "A representative demo").  The views are grey
for the first ``colour_start`` epochs, then the colour's strength ramps up linearly over
``colour_ramp`` epochs: with colour from the start the 4x4-patch ViT never left the loss
plateau of a collapsed embedding (150 epochs at full strength; with a linear ramp from epoch 0
or a learning-rate warm-up it still sat there at epoch 25), while on grey views it leaves it
after about ten epochs.
AdamW with a cosine schedule.  Every setting, the seed and the final linear-probe accuracy
(labels used only for this report) are written into each file's metadata.

    fastsfm pretrain                                     # rewrites fastsfm/weights/ (about 20 min on 2 CPU cores)
    fastsfm pretrain --loss gca-uot --out DIR            # the same backbones pre-trained with a GCA loss
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rng
from ..config import ClassifierConfig, SimCLRConfig
from ..data.augment import BatchAugment
from ..data.datasets import digits
from ..io import atomic_save_safetensors
from ..loss.gca import gca_loss
from ..progress import Progress
from .backbones import ALIASES, encode, load_backbone
from .classifier import fit_linear_classifier

__all__ = ["SimCLRConfig", "WEIGHTS", "pretrain", "pretrain_and_save", "contrastive_loss", "nt_xent"]

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def contrastive_loss(z1: Tensor, z2: Tensor, config: SimCLRConfig) -> Tensor:
    """``config.loss`` of two (B, P) batches of projections (row i of each: the same image)."""
    if config.loss == "nt-xent":
        return nt_xent(z1, z2, config.temperature)
    kind = config.loss.removeprefix("gca-")
    return gca_loss(torch.cat([z1, z2]), kind=kind, epsilon=config.epsilon, pairing="blocks")


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent loss of two (B, P) batches of projections (row i of each: the same image)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def _views(images: Tensor, augment: BatchAugment, keys: Tensor, colour: float) -> Tensor:
    """One augmented view per image: crop + noise (``augment``), contrast and brightness, and colour of
    strength ``colour`` in [0, 1] (0: grey views)."""
    out = augment(images, keys)
    u = rng.uniform(rng.derive(keys, 11), 9)
    contrast, brightness = 0.6 + 0.8 * u[:, 0], 0.3 * (u[:, 1] - 0.5)
    mean = out.mean((1, 2, 3), keepdim=True)
    out = (out - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]
    if not colour:
        return out
    gains, offsets = 1.0 + colour * 1.4 * (u[:, 2:5] - 0.5), colour * 0.5 * (u[:, 5:8] - 0.5)
    tinted = out * gains[:, :, None, None] + offsets[:, :, None, None]
    grey = (u[:, 8] < 0.2)[:, None, None, None]
    return torch.where(grey, tinted.mean(1, keepdim=True).expand_as(tinted), tinted)


def pretrain(name: str, config: SimCLRConfig, images: Tensor, progress: bool = True) -> tuple[nn.Module, list]:
    """SimCLR-train the demo backbone ``name`` from a seeded random init on ``images`` (N, 3, 32, 32).

    Returns the timm model (``num_classes=0``) and the per-epoch mean losses.
    """
    backbone = load_backbone(name, pretrained=False, seed=config.seed)
    dim = backbone.feature_dim
    torch.manual_seed(config.seed)
    head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, config.projection))
    model = backbone.model.train().requires_grad_(True)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = (len(images) + config.batch - 1) // config.batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs * batches)
    augment = BatchAugment(images.shape[-1], scale=(0.35, 1.0), flip=False, noise_std=0.1, noise_mean=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    bar = Progress(config.epochs, f"SimCLR {name}", enabled=progress, unit="epoch", interval=30)
    for epoch in range(config.epochs):
        order, total = torch.randperm(len(images), generator=gen), 0.0
        for b in range(batches):
            idx = order[b * config.batch : (b + 1) * config.batch]
            keys = rng.derive(config.seed, epoch, b, torch.arange(2 * len(idx)))
            x = torch.cat([images[idx], images[idx]])
            ramp = (epoch - config.colour_start) / max(1, config.colour_ramp)
            strength = min(1.0, max(0.0, ramp)) if config.colour else 0.0
            z = head(model(backbone.normalize(_views(x, augment, keys, strength))))
            loss = contrastive_loss(z[: len(idx)], z[len(idx) :], config)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() / batches
        losses.append(total)
        bar.update(loss=total)
    bar.close()
    return model.eval().requires_grad_(False), losses


def pretrain_and_save(names: list[str], config: SimCLRConfig, out: Path = WEIGHTS) -> list[dict]:
    """Pretrain each demo backbone of ``names`` with ``config`` and write ``out/<name>.safetensors``
    (atomically; the settings, the final loss and the linear-probe accuracy in its metadata).

    Returns one record per backbone: name, path, first and final loss, probe accuracy (%, test split,
    a linear classifier on all train features), seconds."""
    data = digits(32)
    images, labels = data.train.tensors
    test_x, test_y = data.test.tensors
    records = []
    for name in names:
        began = time.perf_counter()
        model, losses = pretrain(name, config, images)
        backbone = load_backbone(name, pretrained=False)
        backbone.model.load_state_dict(model.state_dict())
        head = fit_linear_classifier(encode(backbone, images), labels, 10, ClassifierConfig(100, 1e-2, 256))
        probe = 100.0 * float((head(encode(backbone, test_x)).argmax(1) == test_y).float().mean())
        method = "SimCLR (NT-Xent)" if config.loss == "nt-xent" else f"SimCLR views, {config.loss} (fastsfm.gca_loss)"
        meta = {
            "method": f"{method}, labels unused",
            "data": "sklearn digits train split, 32 px",
            "architecture": ALIASES[name].timm_name,
            "config": json.dumps(asdict(config)),
            "final_loss": f"{losses[-1]:.4f}",
            "linear_probe_test_accuracy": f"{probe:.1f}",
            "seconds": f"{time.perf_counter() - began:.0f}",
            "torch": torch.__version__,
        }
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.safetensors"
        atomic_save_safetensors(model.state_dict(), path, meta)
        records.append(
            {"name": name, "path": str(path), "first_loss": losses[0], "final_loss": losses[-1], "probe": probe}
            | {"seconds": float(meta["seconds"])}
        )
    return records
