"""Frozen feature extractors by timm name, as the SFM authors use them.

A :class:`Backbone` maps images in [0, 1] to float32 features (B, D): it resizes to its
input size when needed, normalises, and runs the timm model under ``torch.autocast`` with
its precision (:mod:`fastsfm.precision`).  Its ``identity`` (name, weights, input size,
normalisation) is written into statistics files, so statistics of another backbone are refused.

**The paper backbones** (:data:`ALIASES`; the authors' ``models/__init__.py`` loads them from
torch.hub, OpenAI's ``clip``, timm and the Hugging Face hub; fastsfm loads the same weights
through timm):

* every alias runs at **224 px** (the authors' crops).  timm's DINOv2 defaults to 518 px; at
  224 its position embeddings are interpolated, as torch.hub's DINOv2 does at 224;
* **ImageNet mean/std for every backbone** (``preprocess="authors"``, the default), CLIP and
  EVA-02 included, as the authors' dataloaders normalise; ``preprocess="model"`` uses the
  model's own timm mean/std instead;
* outputs: the CLS token after the final norm (DINO, DINOv2, MoCo-v3), EVA-02's timm pooled
  features (average pooling), and **CLIP's projected image embedding** (512-d for ViT-B,
  768-d for ViT-L; timm keeps OpenAI's ``visual.proj`` as the model's head);
* the authors' short names (``dinov2_vitb``, ``clip_vitb``, ...) are accepted too.

Weights: ``pretrained=True`` reads timm's local cache only (never downloads at run time: a
missing file is an immediate error that says how to get it); a path loads a local file;
``False`` builds a seeded random initialisation (said so in ``identity``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Precision, Preprocess
from .precision import autocast, autocast_dtype

__all__ = [
    "Backbone",
    "BackboneSpec",
    "load_backbone",
    "ALIASES",
    "AUTHOR_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "resolve_name",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone.

    ``timm_name``: what timm creates with pretrained weights; ``architecture``: what it creates
    for a random initialisation (Hugging Face hub names need the hub for their configuration);
    ``projection``: keep timm's head (CLIP's projection) instead of ``num_classes=0``;
    ``source``: where the authors load it from; ``weights``: a weight file shipped inside
    fastsfm (used for ``pretrained=True``), relative to the package; ``size``: the input
    size; ``kwargs``: extra ``timm.create_model`` arguments, as (name, value) pairs.
    """

    timm_name: str
    architecture: str
    projection: bool = False
    source: str = "timm"
    weights: str | None = None
    size: int = 224
    kwargs: tuple = ()


def _spec(timm_name: str, source: str, projection: bool = False, architecture: str | None = None) -> BackboneSpec:
    return BackboneSpec(timm_name, architecture or timm_name, projection, source)


ALIASES: dict[str, BackboneSpec] = {
    # DINO v1 (torch.hub facebookresearch/dino)
    "dino_vits8": _spec("vit_small_patch8_224.dino", "torch.hub dino_vits8"),
    "dino_vits16": _spec("vit_small_patch16_224.dino", "torch.hub dino_vits16"),
    "dino_vitb8": _spec("vit_base_patch8_224.dino", "torch.hub dino_vitb8"),
    "dino_vitb16": _spec("vit_base_patch16_224.dino", "torch.hub dino_vitb16"),
    # DINOv2 (torch.hub facebookresearch/dinov2)
    "dinov2_vits14": _spec("vit_small_patch14_dinov2.lvd142m", "torch.hub dinov2_vits14"),
    "dinov2_vitb14": _spec("vit_base_patch14_dinov2.lvd142m", "torch.hub dinov2_vitb14"),
    "dinov2_vitl14": _spec("vit_large_patch14_dinov2.lvd142m", "torch.hub dinov2_vitl14"),
    # CLIP (OpenAI clip.load(...).visual): projected embedding
    "clip_vitb32": _spec("vit_base_patch32_clip_224.openai", "clip ViT-B/32", projection=True),
    "clip_vitb16": _spec("vit_base_patch16_clip_224.openai", "clip ViT-B/16", projection=True),
    "clip_vitl14": _spec("vit_large_patch14_clip_224.openai", "clip ViT-L/14", projection=True),
    # EVA-02 (timm, MIM on ImageNet-22k)
    "eva02_vitt14": _spec("eva02_tiny_patch14_224.mim_in22k", "timm"),
    "eva02_vits14": _spec("eva02_small_patch14_224.mim_in22k", "timm"),
    "eva02_vitb14": _spec("eva02_base_patch14_224.mim_in22k", "timm"),
    "eva02_vitl14": _spec("eva02_large_patch14_224.mim_in22k", "timm"),
    # MoCo v3 (Hugging Face hub, timm ViTs)
    "mocov3_vitb16": _spec(
        "hf-hub:nyu-visionx/moco-v3-vit-b", "hf nyu-visionx/moco-v3-vit-b", architecture="vit_base_patch16_224"
    ),
    "mocov3_vitl16": _spec(
        "hf-hub:nyu-visionx/moco-v3-vit-l", "hf nyu-visionx/moco-v3-vit-l", architecture="vit_large_patch16_224"
    ),  # The demo's tiny self-supervised backbones, trained by fastsfm.pretrain and shipped with fastsfm.
    "digits_vit": BackboneSpec(
        "test_vit",
        "test_vit",
        source="fastsfm.pretrain (SimCLR on digits)",
        weights="weights/digits_vit.safetensors",
        size=32,
        kwargs=(("patch_size", 4),),
    ),
    "digits_resnet": BackboneSpec(
        "test_resnet",
        "test_resnet",
        source="fastsfm.pretrain (SimCLR on digits)",
        weights="weights/digits_resnet.safetensors",
        size=32,
    ),
}

AUTHOR_NAMES = {
    "dinov2_vits": "dinov2_vits14",
    "dinov2_vitb": "dinov2_vitb14",
    "dinov2_vitl": "dinov2_vitl14",
    "clip_vits": "clip_vitb32",
    "clip_vitb": "clip_vitb16",
    "clip_vitl": "clip_vitl14",
    "eva02_vitt": "eva02_vitt14",
    "eva02_vits": "eva02_vits14",
    "eva02_vitb": "eva02_vitb14",
    "eva02_vitl": "eva02_vitl14",
    "mocov3_vitb": "mocov3_vitb16",
    "mocov3_vitl": "mocov3_vitl16",
}
"""The authors' model names (their ``--model``) -> fastsfm aliases."""


def resolve_name(name: str) -> tuple[str, BackboneSpec | None]:
    """``(canonical name, spec)``: an alias or author name, else a plain timm name with no spec."""
    name = AUTHOR_NAMES.get(name, name)
    return name, ALIASES.get(name)


class Backbone(nn.Module):
    """A frozen timm model with its preprocessing and precision.  ``backbone(images) -> (B, D)`` float32.

    ``name``/``weights``/``input_size``/``preprocess`` form :attr:`identity`; ``mean``/``std``
    the normalisation; ``feature_dim`` is D; ``precision`` the autocast policy.
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
        preprocess: Preprocess = "authors",
        precision: Precision = "auto",
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name, self.weights, self.input_size, self.feature_dim = name, weights, input_size, feature_dim
        self.mean, self.std, self.preprocess, self.precision = tuple(mean), tuple(std), preprocess, precision
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def identity(self) -> str:
        return f"{self.name}|{self.weights}|{self.input_size}px|{self.preprocess}"

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.precision, self.device)

    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> resized to ``input_size`` (bilinear) if needed, normalised."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=False
            )
        return (images - self._mean) / self._std

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"backbone expects images (B, 3, H, W), got {tuple(images.shape)}")
        with autocast(images.device, self.autocast_dtype()):
            return self.model(self.normalize(images)).float()

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
    preprocess: Preprocess = "authors",
    precision: Precision = "auto",
) -> Backbone:
    """Create a frozen backbone.

    Args:
        name: a paper alias (:data:`ALIASES`), an author name (:data:`AUTHOR_NAMES`) or any timm name.
        pretrained: ``True`` (timm's local cache or the weights fastsfm ships, never
            downloads), a local weight file path, or ``False`` (random init seeded by ``seed``).
        image_size: input resolution; default 224 for aliases (the papers'), else the model's.
        preprocess: ``"authors"`` (ImageNet mean/std) or ``"model"`` (the model's own).
        precision: the autocast policy of the forward (:data:`fastsfm.config.Precision`).
    """
    import timm

    if preprocess not in ("authors", "model"):
        raise ValueError(f"preprocess must be 'authors' or 'model', got {preprocess!r}")
    name, spec = resolve_name(name)
    spec = spec or BackboneSpec(name, name)
    kwargs: dict = dict(spec.kwargs) if spec.projection else {"num_classes": 0, **dict(spec.kwargs)}
    if image_size is not None or name in ALIASES:
        kwargs["img_size"] = image_size or spec.size
    if isinstance(pretrained, (str, Path)) and not isinstance(pretrained, bool):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"weight file {path} for backbone {name!r} does not exist")
        model = _create(timm, spec.timm_name, kwargs, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        weights = f"file:{_file_digest(path)}"
    elif pretrained and spec.weights is not None:
        from safetensors.torch import load_file

        path = Path(__file__).parent / spec.weights
        model = _create(timm, spec.architecture, kwargs, pretrained=False)
        model.load_state_dict(load_file(str(path)))
        weights = f"fastsfm:{_file_digest(path)}"
    elif pretrained:
        try:
            with _hub_offline():
                model = _create(timm, spec.timm_name, kwargs, pretrained=True)
        except Exception as err:  # noqa: BLE001 - re-raised with instructions
            raise FileNotFoundError(
                f"pretrained weights for {name!r} (timm: {spec.timm_name}) are not in the local cache and fastsfm "
                f'never downloads at run time. Download them once where there is internet (python -c "import '
                f"timm; timm.create_model('{spec.timm_name}', pretrained=True)\") or pass a local file with "
                f"--weights PATH (Python: pretrained='PATH'). Cause: {type(err).__name__}: {err}"
            ) from err
        weights = "timm-pretrained"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(timm, spec.architecture, kwargs, pretrained=False)
        weights = f"random-init(seed={seed})"
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(kwargs.get("img_size") or cfg["input_size"][-1])
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if preprocess == "authors" else (cfg["mean"], cfg["std"])
    dim = model.num_classes if spec.projection else model.num_features
    return Backbone(model, name, weights, size, tuple(mean), tuple(std), dim, preprocess, precision).to(device)


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
