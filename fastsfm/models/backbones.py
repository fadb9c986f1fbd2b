"""Frozen feature extractors by timm name, computing the features the SFM authors' loaders compute.

A :class:`Backbone` maps images in [0, 1] to float32 features (B, D): it resizes to its
input size when needed, normalises, and runs the timm model under ``torch.autocast`` with
its precision (:mod:`fastsfm.models.precision`), its Linear/conv weights cast to that dtype once
(:mod:`fastsfm.models.cast_weights`).  Its ``identity`` (name, weights, input size,
normalisation) is written into statistics files, so statistics of another backbone are refused.

**The paper backbones** (:data:`ALIASES`).  The authors' ``models/__init__.py`` loads them from
torch.hub (DINO, DINOv2), OpenAI's ``clip`` (CLIP), timm (EVA-02) and a Hugging Face
``PyTorchModelHubMixin`` class (MoCo-v3); fastsfm builds every one with timm and adapts where
timm would compute something else (each adaptation is tested against the authors' model code
on random weights in the published checkpoint format, ``tests/models/test_backbone_fidelity.py``):

* **CLIP** uses timm's ``*_clip_quickgelu_*`` models: OpenAI's towers use QuickGELU
  (``x * sigmoid(1.702 x)``), and timm's plain ``vit_*_clip_224.openai`` builds the same
  weights with GELU (timm's own note: "use quickgelu model variant for original results").
  Output: the **projected** embedding (512-d for ViT-B, 768-d for ViT-L), ``visual.proj`` being
  timm's head.
* **DINOv2** keeps its 37x37 position table (the model is built at its native 518 px) and
  re-interpolates it **at every forward**, as torch.hub's ``interpolate_pos_encoding`` does
  (bicubic, ``scale_factor = (grid + 0.1) / 37``, no antialias): timm would instead resample
  the table once at load, with antialiasing, to 16x16 -- a different table.  Output: the CLS
  token after the final norm.
* **MoCo-v3** is a ``PyTorchModelHubMixin`` checkpoint (``config.json`` of init arguments +
  ``model.safetensors``), which ``timm.create_model("hf-hub:...")`` cannot parse (its config has
  no ``architecture``): fastsfm reads the config and the weights itself
  (:func:`fastsfm.models.weights.mixin_checkpoint`) into timm's ``VisionTransformer``, which the
  authors' class subclasses (its fixed 2-D sin-cos position table is part of the weights).
  Output: the CLS token after the final norm.
* **EVA-02** and **DINO** are timm's own models (EVA-02: timm's average-pooled features).

Every alias runs at **224 px** (the authors' crops) with **ImageNet mean/std for every
backbone** (``preprocess="authors"``, the default), CLIP and EVA-02 included, as the authors'
dataloaders normalise; ``preprocess="model"`` uses the model's own timm mean/std instead.
The authors' short names (``dinov2_vitb``, ``clip_vitb``, ...) are accepted too.  A ViT whose
features are its class token runs its last block for that token only (:mod:`fastsfm.models.cls_only`).

Weights: ``pretrained=True`` reads the local caches only (timm's / Hugging Face's; never downloads:
a missing file is an immediate error that says how to get it); a path loads a local file or folder
in the publisher's format (:mod:`fastsfm.models.weights`); ``False`` is a seeded random initialisation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..config import Attention, BackboneConfig, Precision, Preprocess, choices
from ..data.images import loader_kwargs
from ..distributed import all_gather, interleave_shards, rank_world, shard_dataset
from ..progress import track
from .cast_weights import CastWeights
from .cls_only import use_cls_only_last_block
from .hub_positions import use_hub_positions
from .precision import attention_kernels, autocast, autocast_dtype
from .weights import file_digest, hub_offline, load_into, mixin_checkpoint, read_state_dict

__all__ = [
    "Backbone",
    "BackboneSpec",
    "load_backbone",
    "encode_sharded",
    "from_config",
    "encode",
    "DEFAULT_BACKBONE",
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
    size; ``kwargs``: extra ``timm.create_model`` arguments, as (name, value) pairs;
    ``hub_positions``: torch.hub DINOv2's per-forward position interpolation (module docstring);
    ``mixin_repo``: the Hugging Face repository of a ``PyTorchModelHubMixin`` checkpoint.
    """

    timm_name: str
    architecture: str
    projection: bool = False
    source: str = "timm"
    weights: str | None = None
    size: int = 224
    kwargs: tuple = ()
    hub_positions: bool = False
    mixin_repo: str | None = None


def _spec(timm_name: str, source: str, projection: bool = False, **more) -> BackboneSpec:
    return BackboneSpec(timm_name, more.pop("architecture", timm_name), projection, source, **more)


def _digits(name: str, timm_name: str, **kwargs) -> BackboneSpec:
    """A demo backbone: timm's tiny test architecture at 32 px with weights fastsfm trained and ships."""
    source = "fastsfm.models.pretrain (SimCLR on digits)"
    return BackboneSpec(
        timm_name,
        timm_name,
        source=source,
        weights=f"weights/{name}.safetensors",
        size=32,
        kwargs=tuple(kwargs.items()),
    )


ALIASES: dict[str, BackboneSpec] = {
    # DINO v1 (torch.hub facebookresearch/dino)
    "dino_vits8": _spec("vit_small_patch8_224.dino", "torch.hub dino_vits8"),
    "dino_vits16": _spec("vit_small_patch16_224.dino", "torch.hub dino_vits16"),
    "dino_vitb8": _spec("vit_base_patch8_224.dino", "torch.hub dino_vitb8"),
    "dino_vitb16": _spec("vit_base_patch16_224.dino", "torch.hub dino_vitb16"),
    # DINOv2 (torch.hub facebookresearch/dinov2): positions interpolated per forward, as the hub does
    "dinov2_vits14": _spec("vit_small_patch14_dinov2.lvd142m", "torch.hub dinov2_vits14", hub_positions=True),
    "dinov2_vitb14": _spec("vit_base_patch14_dinov2.lvd142m", "torch.hub dinov2_vitb14", hub_positions=True),
    "dinov2_vitl14": _spec("vit_large_patch14_dinov2.lvd142m", "torch.hub dinov2_vitl14", hub_positions=True),
    # CLIP (OpenAI clip.load(...).visual): QuickGELU, projected embedding
    "clip_vitb32": _spec("vit_base_patch32_clip_quickgelu_224.openai", "clip ViT-B/32", projection=True),
    "clip_vitb16": _spec("vit_base_patch16_clip_quickgelu_224.openai", "clip ViT-B/16", projection=True),
    "clip_vitl14": _spec("vit_large_patch14_clip_quickgelu_224.openai", "clip ViT-L/14", projection=True),
    # EVA-02 (timm, MIM on ImageNet-22k)
    "eva02_vitt14": _spec("eva02_tiny_patch14_224.mim_in22k", "timm"),
    "eva02_vits14": _spec("eva02_small_patch14_224.mim_in22k", "timm"),
    "eva02_vitb14": _spec("eva02_base_patch14_224.mim_in22k", "timm"),
    "eva02_vitl14": _spec("eva02_large_patch14_224.mim_in22k", "timm"),
    # MoCo v3 (Hugging Face PyTorchModelHubMixin checkpoints of a timm VisionTransformer subclass)
    "mocov3_vitb16": _spec(
        "vit_base_patch16_224", "hf nyu-visionx/moco-v3-vit-b", mixin_repo="nyu-visionx/moco-v3-vit-b"
    ),
    "mocov3_vitl16": _spec(
        "vit_large_patch16_224", "hf nyu-visionx/moco-v3-vit-l", mixin_repo="nyu-visionx/moco-v3-vit-l"
    ),
    # The demo's tiny self-supervised backbones, trained by fastsfm.models.pretrain and shipped with fastsfm.
    "digits_vit": _digits("digits_vit", "test_vit", patch_size=4),
    "digits_vit8": _digits("digits_vit8", "test_vit", patch_size=8),
    "digits_resnet": _digits("digits_resnet", "test_resnet"),
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
        self.cls_only = use_cls_only_last_block(self.model)  # exact: features are the class token
        self._cast = CastWeights(self.model)  # under autocast: Linear/conv weights cast once, not per forward
        self.attention: Attention = "auto"  # the SDPA kernel (BackboneConfig.attention)
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

    @contextlib.contextmanager
    def using_precision(self, precision: Precision):
        """Run the forwards inside the block under ``precision`` instead of :attr:`precision` (the real
        side -- statistics, real features, test features -- runs in fp32 by default, as the authors')."""
        saved, self.precision = self.precision, precision
        try:
            yield self
        finally:
            self.precision = saved

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
        dtype = self.autocast_dtype()
        with autocast(images.device, dtype), attention_kernels(self.attention):
            x = self.normalize(images)
            return (self.model(x) if dtype is None else self._cast(x, dtype)).float()

    @property
    def compiled(self) -> bool:
        """Whether :meth:`compile` (``torch.compile`` of the forward and its backward) is in effect."""
        return getattr(self, "_compiled_call_impl", None) is not None

    def train(self, mode: bool = True) -> Backbone:
        """Always stays in eval mode: the backbone is frozen (no dropout, fixed norm statistics)."""
        return nn.Module.train(self, False)


def _build(timm, spec: BackboneSpec, name: str, kwargs: dict, pretrained: bool | str | Path, seed: int):
    """``(model, weights identity)``: ``spec``'s timm model with the requested weights."""
    if spec.mixin_repo is not None and pretrained:
        location = None if pretrained is True else pretrained
        path, config = mixin_checkpoint(spec.mixin_repo, location)
        known = {"patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token"}
        model = _create(timm, spec.architecture, {**kwargs, **{k: v for k, v in config.items() if k in known}})
        load_into(model, read_state_dict(path), f"{spec.mixin_repo} weights {path}")
        return model, f"{'hf-cache' if location is None else 'file'}:{file_digest(path)}"
    if isinstance(pretrained, (str, Path)) and not isinstance(pretrained, bool):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"weight file {path} for backbone {name!r} does not exist")
        model = _create(timm, spec.timm_name, kwargs)
        load_into(model, read_state_dict(path), f"weight file {path}")
        return model, f"file:{file_digest(path)}"
    if pretrained and spec.weights is not None:
        path = Path(__file__).resolve().parents[1] / spec.weights
        model = _create(timm, spec.architecture, kwargs)
        load_into(model, read_state_dict(path), f"shipped weights {path.name}")
        return model, f"fastsfm:{file_digest(path)}"
    if pretrained:
        try:
            with hub_offline():
                return _create(timm, spec.timm_name, kwargs, pretrained=True), "timm-pretrained"
        except Exception as err:  # noqa: BLE001 - re-raised with instructions
            raise FileNotFoundError(
                f"pretrained weights for {name!r} (timm: {spec.timm_name}) are not in the local cache and fastsfm "
                f'never downloads at run time. Download them once where there is internet (python -c "import '
                f"timm; timm.create_model('{spec.timm_name}', pretrained=True)\") or pass a local file with "
                f"--weights PATH (Python: pretrained='PATH'). Cause: {type(err).__name__}: {err}"
            ) from err
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _create(timm, spec.architecture, kwargs), f"random-init(seed={seed})"


def load_backbone(
    name: str,
    pretrained: bool | str | Path = True,
    image_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    preprocess: Preprocess = "authors",
    precision: Precision = "auto",
) -> Backbone:
    """Create a frozen backbone.

    Args:
        name: a paper alias (:data:`ALIASES`), an author name (:data:`AUTHOR_NAMES`) or any timm name.
        pretrained: ``True`` (the local timm / Hugging Face caches or the weights fastsfm ships,
            never downloads), a local weights file or checkpoint folder in its publisher's format
            (:mod:`fastsfm.models.weights`), or ``False`` (random init seeded by ``seed``).
        image_size: input resolution; default 224 for aliases (the papers'), else the model's.
        preprocess: ``"authors"`` (ImageNet mean/std) or ``"model"`` (the model's own).
        precision: the autocast policy of the forward (:data:`fastsfm.config.Precision`).
    """
    import timm

    if preprocess not in choices(Preprocess):
        raise ValueError(f"preprocess must be one of {choices(Preprocess)}, got {preprocess!r}")
    name, spec = resolve_name(name)
    spec = spec or BackboneSpec(name, name)
    kwargs: dict = dict(spec.kwargs) if spec.projection else {"num_classes": 0, **dict(spec.kwargs)}
    size = image_size or (spec.size if name in ALIASES else None)
    if spec.hub_positions:  # built at its native size; positions follow the input at every forward
        kwargs["dynamic_img_size"] = True
    elif size is not None:
        kwargs["img_size"] = size
    model, weights = _build(timm, spec, name, kwargs, pretrained, seed)
    if spec.hub_positions:
        use_hub_positions(model)
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(size or cfg["input_size"][-1])
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if preprocess == "authors" else (cfg["mean"], cfg["std"])
    dim = model.num_classes if spec.projection else model.num_features
    return Backbone(model, name, weights, size, tuple(mean), tuple(std), dim, preprocess, precision).to(device)


def _create(timm, timm_name: str, kwargs: dict, **more) -> nn.Module:
    try:
        return timm.create_model(timm_name, **kwargs, **more)
    except TypeError:
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}  # CNNs take any size
        return timm.create_model(timm_name, **kwargs, **more)


DEFAULT_BACKBONE = "dinov2_vitb14"  # for a BackboneConfig that names none (and whose dataset names none)


def from_config(
    config: BackboneConfig,
    device: str | torch.device = "cpu",
    name: str | None = None,
    weights: str | None = None,
) -> Backbone:
    """The backbone ``config`` describes (the one builder the command line, the grid and the demo use),
    or backbone ``name`` (with its own ``weights``, if any) under the same options -- an evaluation
    backbone, or one of a grid's backbones."""
    if name:  # another backbone: its own weights, or the caches (random init if the config says so)
        pretrained = weights or (False if config.random_init else True)
    else:
        pretrained = config.pretrained()
    backbone = load_backbone(
        name or config.backbone or DEFAULT_BACKBONE,
        pretrained,
        config.image_size,
        device=device,
        preprocess=config.preprocess,
        precision=config.precision,
    )
    backbone.attention = config.attention
    if config.compile:
        backbone.compile(fullgraph=True)  # traced on first use: no graph break in any shipped backbone (tested)
    return backbone


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
    (a dataset is decoded by ``workers`` loader processes, None: :func:`fastsfm.data.images.default_workers`).
    Every module that needs features of images (statistics, baselines, evaluation, the demo) calls this.."""
    if isinstance(images, Tensor):
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        total = (len(images) + batch_size - 1) // batch_size
    else:
        loader = DataLoader(images, batch_size=batch_size, **loader_kwargs(device, workers))
        batches = (x for x, _ in loader)
        total = len(loader)
    return torch.cat(
        [
            backbone(x.to(device, non_blocking=True)).float().cpu()
            for x in track(batches, "encoding", total=total, enabled=progress, unit="batch")
        ]
    )


def encode_sharded(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int | None = 0,
    progress: bool = False,
) -> Tensor:
    """:func:`encode` of ``dataset`` with every rank of a ``torch.distributed`` run encoding every
    ``world``-th image (each image once), the parts gathered to every rank in the dataset's order
    over the control group: the features of one process, 1/world of its time.  Every rank must call
    it.  ImageNet-1k's 50,000 test images at D = 768: 154 MB gathered once per backbone."""
    rank, world = rank_world()
    if world == 1:
        return encode(backbone, dataset, batch_size, device, workers, progress)
    part = encode(backbone, shard_dataset(dataset, rank, world), batch_size, device, workers, progress and rank == 0)
    return interleave_shards(all_gather(part))
