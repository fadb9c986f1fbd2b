"""Tiny fixtures shared by the pipeline tests: a random-init ViT at 16 px and toy images."""

import torch
from torch.utils.data import TensorDataset

from fastsfm.backbones import load_backbone
from fastsfm.config import ClassifierConfig
from fastsfm.stats import compute_stats

TOY_CLASSIFIER = ClassifierConfig(classifier_epochs=5, classifier_lr=1e-2)


def tiny_backbone(seed: int = 0):
    return load_backbone("vit_tiny_patch16_224", pretrained=False, image_size=16, seed=seed)


def toy_data(n_per_class: int = 6, classes: int = 3, size: int = 16, seed: int = 0):
    """Images whose classes differ by colour, so features separate them."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    base = torch.rand(classes, 3, 1, 1, generator=gen)
    images = (base[labels] + 0.2 * torch.rand(len(labels), 3, size, size, generator=gen)).clamp(0, 1)
    return TensorDataset(images, labels)


def toy_stats(backbone, data, classes: int = 3):
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    return compute_stats(
        backbone,
        loader,
        [f"c{i}" for i in range(classes)],
        "toy",
        classifier=TOY_CLASSIFIER,
        progress=False,
    )
