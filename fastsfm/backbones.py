"""Frozen feature extractors created by timm name, with the preprocessing they expect.

A :class:`Backbone` maps images in [0, 1] (any size) to features (B, D): it resizes to
the model's input size and normalises with the model's own mean/std.  Its ``identity``
string (name, weights, input size) is written into statistics files so that statistics
from another backbone are refused later.

Weights: ``pretrained=True`` reads timm's local cache only (``HF_HUB_OFFLINE``), so an
offline machine gets an immediate, explicit error instead of a hanging download;
``pretrained="path/to/weights.safetensors|.pth"`` loads a local file; ``pretrained=False``
builds a seeded random initialisation (said so in ``identity``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Backbone", "load_backbone", "PAPER_BACKBONES"]

# The four ViT-B backbones of the SFM and LGM papers, by their timm names.
PAPER_BACKBONES = {
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "clip_vitb16": "vit_base_patch16_clip_224.openai",
    "eva02_vitb14": "eva02_base_patch14_224.mim_in22k",
    "mocov3_vitb16": "hf-hub:nyu-visionx/moco-v3-vit-b",
}


class Backbone(nn.Module):
    """A frozen timm model plus its preprocessing.  ``backbone(images) -> (B, D)``.

    ``name``/``weights``/``input_size`` form :attr:`identity`; ``mean``/``std`` are the
    model's normalisation; ``feature_dim`` is D.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        weights: str,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        feature_dim: int,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name, self.weights, self.input_size, self.feature_dim = name, weights, input_size, feature_dim
        self.mean, self.std = tuple(mean), tuple(std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def identity(self) -> str:
        return f"{self.name}|{self.weights}|{self.input_size}px"

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> resized to ``input_size`` and normalised."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=False
            )
        return (images - self._mean) / self._std

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"backbone expects images (B, 3, H, W), got {tuple(images.shape)}")
        return self.model(self.preprocess(images))

    def train(self, mode: bool = True) -> Backbone:
        """Always stays in eval mode: the backbone is frozen (no dropout, fixed norm statistics)."""
        return nn.Module.train(self, False)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_backbone(
    name: str,
    pretrained: bool | str = True,
    image_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Create a frozen timm backbone with ``num_classes=0`` (pooled features).

    Args:
        name: a timm model name, or an alias of :data:`PAPER_BACKBONES`.
        pretrained: ``True`` (timm's local cache, never downloads), a local weight file path,
            or ``False`` (random initialisation seeded by ``seed``).
        image_size: input resolution (ViTs resize their position embeddings); default: the model's.
    """
    import timm

    timm_name = PAPER_BACKBONES.get(name, name)
    kwargs: dict = {"num_classes": 0}
    if image_size is not None:
        kwargs["img_size"] = image_size
    if isinstance(pretrained, (str, Path)) and not isinstance(pretrained, bool):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"weight file {path} for backbone {name!r} does not exist")
        model = _create(timm, timm_name, kwargs, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        weights = f"file:{_file_digest(path)}"
    elif pretrained:
        try:
            with _hub_offline():
                model = _create(timm, timm_name, kwargs, pretrained=True)
        except Exception as err:  # noqa: BLE001 - re-raised with instructions
            raise FileNotFoundError(
                f"pretrained weights for {name!r} (timm: {timm_name}) are not in the local cache and fastsfm never "
                f'downloads at run time. Download them once where there is internet (python -c "import timm; '
                f"timm.create_model('{timm_name}', pretrained=True)\") or pass a local file with --weights PATH "
                f"(Python: pretrained='PATH'). Cause: {type(err).__name__}: {err}"
            ) from err
        weights = "timm-pretrained"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(timm, timm_name, kwargs, pretrained=False)
        weights = f"random-init(seed={seed})"
    cfg = timm.data.resolve_data_config({}, model=model)
    size = image_size or int(cfg["input_size"][-1])
    return Backbone(model, name, weights, size, tuple(cfg["mean"]), tuple(cfg["std"]), model.num_features).to(device)


@contextlib.contextmanager
def _hub_offline():
    """Make huggingface_hub (which timm downloads through) use its local cache only."""
    import huggingface_hub.constants as hub

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), getattr(hub, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _create(timm, timm_name: str, kwargs: dict, **more) -> nn.Module:
    try:
        return timm.create_model(timm_name, **kwargs, **more)
    except TypeError:
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}  # CNNs take any size
        return timm.create_model(timm_name, **kwargs, **more)
