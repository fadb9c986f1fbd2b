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

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io import atomic_save_safetensors, read_safetensors
from ..progress import Progress

__all__ = ["topk_accuracy", "Head", "HeadCheckpoint", "train_heads"]

_VIEWS_PER_BLOCK = 50_000  # augmented views encoded at once (bounds the cached features' memory)


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


@dataclass
class HeadCheckpoint:
    """Where and how often :func:`train_heads` saves its state, so a long evaluation resumes exactly.

    The file (safetensors, written atomically) holds every head's parameters and Adam moments;
    its metadata the epoch reached, the optimisers' step counts and learning rates, the schedules,
    and ``key`` (which evaluation it belongs to: a checkpoint of another is ignored).  ``every``:
    epochs between saves (the views are encoded in blocks of at most that many epochs, so a save
    falls at a block boundary).  ``stop``: a :class:`fastsfm.signals.StopSignals`; when it was
    signalled the state is saved at the next block boundary and the process exits with its code.
    """

    path: Path
    key: str
    every: int = 100
    stop: object | None = None

    @staticmethod
    def _tag(name) -> str:
        """A head's key in the file: ``backbone|mode`` for the evaluator's (backbone, mode) heads."""
        return "|".join(name) if isinstance(name, tuple) else str(name)

    def save(self, heads: dict, opts: dict, epoch: int) -> None:
        tensors, meta = {}, {"key": self.key, "epoch": str(epoch)}
        for name, head in heads.items():
            tag = self._tag(name)
            tensors.update({f"{tag}/module/{k}": v for k, v in head.module.state_dict().items()})
            opt, sched = opts[name]
            state = opt.state_dict()
            for i, slots in state["state"].items():
                tensors.update({f"{tag}/adam/{i}/{k}": torch.as_tensor(v) for k, v in slots.items()})
            meta[f"{tag}/groups"] = json.dumps(state["param_groups"])
            meta[f"{tag}/schedule"] = json.dumps(sched.state_dict())
        atomic_save_safetensors(tensors, self.path, meta)

    def load(self, heads: dict, opts: dict) -> int:
        """Restore the saved state into ``heads``/``opts``; the epoch to continue from (0: none saved)."""
        if not self.path.exists():
            return 0
        tensors, meta = read_safetensors(self.path)
        if meta.get("key") != self.key:
            return 0
        for name, head in heads.items():
            tag = self._tag(name)
            module, adam = f"{tag}/module/", f"{tag}/adam/"
            head.module.load_state_dict({k[len(module) :]: v for k, v in tensors.items() if k.startswith(module)})
            slots: dict[int, dict] = {}
            for k, v in tensors.items():
                if k.startswith(adam):
                    i, slot = k[len(adam) :].split("/")
                    slots.setdefault(int(i), {})[slot] = v
            opt, sched = opts[name]
            opt.load_state_dict({"state": slots, "param_groups": json.loads(meta[f"{tag}/groups"])})
            sched.load_state_dict(json.loads(meta[f"{tag}/schedule"]))
        return int(meta["epoch"])


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
    checkpoint: HeadCheckpoint | None = None,
) -> None:
    """Train every head on the same augmented views of ``images`` (N, 3, H, W), the authors' protocol;
    each backbone of ``backbones`` (keyed as the heads' losses expect) encodes each view once.

    Each head has its own Adam (``head.lr``) and cosine schedule over ``epochs`` (stepped per
    epoch); the batch is ``min(batch, N)``.  With ``checkpoint`` the state is saved every
    ``checkpoint.every`` epochs and a run continues from a saved state: the result is the one an
    uninterrupted run gives, bit for bit (every draw is a function of ``seed``, and the views are
    encoded in the same blocks).
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
    if checkpoint is not None:
        per_block = min(per_block, checkpoint.every)
    start = checkpoint.load(heads, opts) if checkpoint is not None else 0
    bar = Progress(epochs, "training heads", initial=start, enabled=progress, unit="epoch", interval=30)
    with torch.enable_grad():
        for first in range(start, epochs, per_block):
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
            done = first + len(block)
            if checkpoint is not None and done < epochs:
                checkpoint.save(heads, opts, done)
                if checkpoint.stop is not None and checkpoint.stop.requested():
                    bar.close()
                    raise SystemExit(checkpoint.stop.code)
    bar.close()
    for head in heads.values():
        head.module.eval()
