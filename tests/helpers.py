"""Fixtures shared by the tests: loss problems, a random-init ViT at 16 px, toy images, an ImageNet-layout folder,
the benchmark scripts as modules."""

import contextlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from fastsfm.bench.benchmark import loss_problem as make_problem  # noqa: F401 - re-exported for the tests
from fastsfm.config import ClassifierConfig
from fastsfm.models.backbones import load_backbone
from fastsfm.stats import compute_stats

TOY_CLASSIFIER = ClassifierConfig(classifier_epochs=5, classifier_lr=1e-2)
BENCHES = Path(__file__).resolve().parents[1] / "benches"


def bench(name: str):
    """The script ``benches/<name>.py`` imported as a module (the benches are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


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


IMAGENETTE = [
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
]


def imagenet_folder(root, wnids=IMAGENETTE, train=3, val=2, extra=("n09999999",)):
    """An ImageNet-layout folder: train/<wnid>/ and val/<wnid>/ of tiny images, one colour per class."""
    rng = np.random.default_rng(0)
    for i, wnid in enumerate(list(wnids) + list(extra)):
        for split, count in (("train", train), ("val", val)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                colour = np.array([25 * i % 255, 80 + 15 * i % 170, 200 - 17 * i % 200])
                arr = np.clip(colour + rng.normal(0, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{j}.png")
    return root


def class_folders(root, classes=("a", "b", "c"), per_class=4, size=12):
    """An ImageFolder (``root/<class>/<i>.png``) of noisy images, one brightness per class."""
    rng = np.random.default_rng(0)
    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            arr = np.clip(rng.normal(60 * i + 40, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{j}.png")
    return root


class Recorder:
    """Stands in for ChunkAdam: keeps each chunk's level gradients (times the grad scale) instead of stepping."""

    def __init__(self, synset):
        self.grads = [torch.zeros_like(level) for level in synset.levels]
        self.chunks = []

    def step_chunk(self, start, stop, params, grad_scale=1.0, moments=None, streams=None):
        self.chunks.append((start, stop))
        for full, p in zip(self.grads, params, strict=True):
            full[start:stop] = p.grad * grad_scale

    def finish_step(self):
        pass


def grown_set(seed=1, classes=3, ipc=4, size=16):
    """A synthetic set with three pyramid levels (grown at steps 2 and 3 with extent 1)."""
    from fastsfm.distill.synset import SyntheticSet

    synset = SyntheticSet(classes, ipc, size, extent=1, seed=seed)
    for step in range(1, 4):
        synset.grow(step)
    return synset


class FakeCuda:
    """torch.cuda's stream and graph calls as GraphedStep makes them, recorded (a capture runs the step
    eagerly, a replay runs nothing; ``optim.in_step`` is kept at each replay); installed with
    ``monkeypatch`` for the test."""

    def __init__(self, optim, monkeypatch):
        self.optim, self.made, self.warmups, self.captures, self.replays = optim, [], [], [], []
        self.current = None
        stream_cls = self.stream_class()
        monkeypatch.setattr(torch.cuda, "Stream", stream_cls)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream_cls())
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "graph", self.graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.graph_class())

    def stream_class(self, device=None):
        fake = self

        class Stream:
            def __init__(self, *_):
                fake.made.append(self)

            def wait_stream(self, other):
                pass

        return Stream

    @contextlib.contextmanager
    def stream(self, s):
        self.current = s
        yield
        self.current = None

    @contextlib.contextmanager
    def graph(self, graph, stream=None):
        self.captures.append(stream)
        yield

    def graph_class(self):
        fake = self

        class CUDAGraph:
            def replay(self):
                fake.replays.append(fake.optim.in_step)

        return CUDAGraph
