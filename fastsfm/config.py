"""Every configuration option of fastsfm, typed once.

The ``Literal`` types are the single source of the choices that the Python API accepts and
the command line offers: :mod:`fastsfm.cli` derives each ``--flag``, its type, its choices and
its help from the dataclass fields below (:func:`cli_fields`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

__all__ = [
    "Objective",
    "Backend",
    "Validate",
    "Method",
    "Param",
    "Init",
    "Channels",
    "Precision",
    "Preprocess",
    "Attention",
    "EvalMode",
    "Baseline",
    "GridMethod",
    "OptimizerState",
    "GCAKind",
    "Pairing",
    "PretrainLoss",
    "GCAOptions",
    "SimCLRConfig",
    "DistillConfig",
    "MachineConfig",
    "BackboneConfig",
    "ClassifierConfig",
    "EvalConfig",
    "METHOD_VIEWS",
    "DRAWS_VERSION",
    "choices",
    "cli_fields",
    "option",
    "check_loss_options",
    "with_defaults",
    "require",
    "DEFAULT_RESOLUTION",
]

Objective = Literal["flow", "decouple"]
"""``flow``: the paper's flow cosine (default); ``decouple``: the authors' ``sfm_decouple`` MSE variant."""

Backend = Literal["auto", "triton", "torch", "reference"]
"""Loss implementation: ``auto`` (Triton on CUDA, PyTorch otherwise), ``triton`` (fused kernels),
``torch`` (vectorised PyTorch with autograd), ``reference`` (the literal oracle)."""

Validate = Literal["once", "always", "never"]
"""When :class:`fastsfm.SFMLoss` runs the checks that need a host synchronisation (label range,
empty classes, non-finite features): on the first call for each labels tensor, every call, or never."""

Method = Literal["sfm", "lgm"]
"""Distillation objective: statistical flow matching, or the linear gradient matching baseline."""

Param = Literal["pyramid", "pixels"]
"""Synthetic image parameterisation: LGM's multi-scale pyramid (the papers') or plain pixels."""

Channels = Literal["rgb", "grey"]
"""Synthetic image channels: colour (the papers'), or one grey channel replicated to RGB (grey data)."""

Init = Literal["noise", "real"]
"""Synthetic image initialisation: random colours growing with the pyramid (the papers'), or real images."""

Precision = Literal["auto", "bf16", "fp16", "fp32"]
"""Backbone precision under ``torch.autocast``: ``auto`` is bf16 on CUDA and fp32 on CPU; fp16 uses
the authors' fixed x1024 loss scale.  Statistics and losses are always float32; a bf16 step's other
float32 matrix products (render, crop) run in TF32 (:func:`fastsfm.models.precision.tf32_matmuls`)."""

Attention = Literal["auto", "flash", "efficient", "cudnn", "math"]
"""The backbone's scaled-dot-product attention kernel: ``auto`` (PyTorch's own choice per call) or one
backend, picked from ``benches/profile_step.py``'s timings of each (all equal within float rounding)."""

Preprocess = Literal["authors", "model"]
"""Backbone input normalisation: ``authors`` (ImageNet mean/std for every backbone, as both papers'
code does) or ``model`` (the mean/std of the model's own timm configuration)."""

Baseline = Literal["random", "centroid", "kmeans", "neighbors"]
"""Real-image baselines (:mod:`fastsfm.evaluate.baselines`): random reals, the reals nearest the class
centroid (the authors'), the reals nearest k-means centres (its extension beyond IPC 1), and the
reals nearest each synthetic image (a memorisation check)."""

GridMethod = Literal["sfm", "lgm", "random", "centroid", "kmeans", "neighbors"]
"""Rows of the reproduction grid: the two distillation methods and the real baselines."""

OptimizerState = Literal["fp32", "bf16", "8bit"]
"""How the synthetic set's two Adam moments are stored between steps (the update itself is float32):
``fp32`` (exact Adam, default), ``bf16`` (rounded to nearest), ``8bit`` (blockwise dynamic 8-bit codes with a
float32 scale per block of an image's level, Dettmers et al. 2021, torchao's quantiser)."""

GCAKind = Literal["ince", "rince", "uot"]
"""The generalized contrastive alignment losses (arXiv 2502.20141, ``nerdslab/gca``): ``ince`` (balanced
Sinkhorn plan, cross-entropy on the positives), ``rince`` (its robust form ``INCE^q / q``), ``uot``
(KL-relaxed unbalanced plan with the authors' extra positive terms)."""

Pairing = Literal["interleaved", "blocks"]
"""Where the two views of a sample sit among the 2n rows: ``interleaved`` (rows 2i and 2i + 1, the
authors' CIFAR code) or ``blocks`` (rows i and i + n, their ImageNet code)."""

PretrainLoss = Literal["nt-xent", "gca-ince", "gca-rince", "gca-uot"]
"""The contrastive loss of the demo backbones' self-supervised pre-training."""

EvalMode = Literal["probe", "inherit", "kd", "inherit_ce"]
"""Evaluation of a small training set (the authors' ``eval_mode`` normal / CI / KD): a fresh linear
probe; classifier inheritance (a projector into the distillation backbone's space, regressed on
its features, then its frozen real-data classifier); knowledge distillation from that classifier.
``inherit_ce`` (not the authors'): fastsfm's earlier inheritance, an identity-initialised projector
trained with cross-entropy through the frozen classifier; distillation backbone only."""


METHOD_VIEWS = {"sfm": 1, "lgm": 10}
"""Augmented copies of the synthetic set per step when ``views`` is not given."""
DRAWS_VERSION = "2"
"""Version of the keyed random draws (:mod:`fastsfm.rng`); checkpoints of another cannot resume."""


DEFAULT_RESOLUTION = 256
"""Real and synthetic images are resized to this (shorter side) unless the dataset or the user
says otherwise: the default of :attr:`DistillConfig.resolution` and of ``--resolution``."""


def require(
    config: object,
    *,
    at_least: dict[str, float] | None = None,
    above: dict[str, float] | None = None,
    finite: tuple[str, ...] = (),
) -> None:
    """Raise ``ValueError`` (one line: the option, its range, the value) for a field of ``config``
    below ``at_least[name]``, not above ``above[name]``, or (any field named) not a finite number.
    None values are left alone: they mean "the default"."""
    rules = [(name, low, ">=") for name, low in (at_least or {}).items()]
    rules += [(name, low, ">") for name, low in (above or {}).items()]
    rules += [(name, -math.inf, ">") for name in finite]
    for name, low, op in rules:
        value = getattr(config, name)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value < low if op == ">=" else value <= low):
            kind = "an integer" if isinstance(low, int) and op == ">=" else "a number"
            rule = "a finite number" if low == -math.inf else f"{kind} {op} {low}"
            raise ValueError(f"{name} must be {rule}, got {value!r}")


def _check_literals(config: object) -> None:
    """Raise ``ValueError`` for a ``Literal``-typed field of ``config`` holding another value."""
    for name, kind in typing.get_type_hints(type(config)).items():
        if typing.get_origin(kind) is Literal and getattr(config, name) not in get_args(kind):
            raise ValueError(f"{name} must be one of {list(get_args(kind))}, got {getattr(config, name)!r}")


def check_loss_options(objective: str, alpha: object, nontarget_divisor: object) -> None:
    """Raise ``ValueError`` (one line: the option, its range, the value) for an SFM loss option out
    of range: ``objective`` one of :data:`Objective`, ``alpha`` in [0, 1], ``nontarget_divisor``
    None (C - 1) or a finite number >= 1.  Shared by :func:`fastsfm.sfm_loss`, :class:`fastsfm.SFMLoss`
    and :class:`DistillConfig`, so every entry point refuses the same values."""
    if objective not in get_args(Objective):
        raise ValueError(f"objective must be one of {list(get_args(Objective))}, got {objective!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if nontarget_divisor is None:
        return
    number = isinstance(nontarget_divisor, (int, float)) and not isinstance(nontarget_divisor, bool)
    if not number or not math.isfinite(nontarget_divisor) or nontarget_divisor < 1:
        raise ValueError(
            f"nontarget_divisor must be a number >= 1, or None for C - 1 (the released script uses C*IPC - 1), "
            f"got {nontarget_divisor!r}"
        )


@dataclass(frozen=True)
class GCAOptions:
    """The options of a generalized contrastive alignment loss (:func:`fastsfm.gca_loss`), validated on
    construction.  Defaults: the authors' CIFAR-10 configuration (``config/simclr_cifar10.yaml``)."""

    kind: GCAKind = "ince"
    epsilon: float = 0.5
    iterations: int = 10
    lam: float = 0.01
    q: float = 0.98
    relax: tuple[float, float] = (0.2, 0.2)
    r1: float = 1.0
    r2: float = 0.02
    pairing: Pairing = "interleaved"
    tf32: bool = False
    """Float32 inputs on the Triton path: TF32 tensor-core products for the similarities (about 2^-11
    relative per product, a 7-15x higher FLOP rate) instead of IEEE float32 (the default)."""

    def __post_init__(self) -> None:
        _check_literals(self)
        if not isinstance(self.tf32, bool):
            raise ValueError(f"tf32 must be True or False, got {self.tf32!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        require(self, above={"epsilon": 0.0, "lam": 0.0, "q": 0.0}, at_least={"r1": 0.0, "r2": 0.0})
        relax = self.relax
        if not isinstance(relax, (tuple, list)) or len(relax) != 2:
            raise ValueError(f"relax must be two numbers (rho1, rho2), got {relax!r}")
        for value in relax:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"relax must be two finite numbers > 0, got {relax!r}")
        object.__setattr__(self, "relax", (float(relax[0]), float(relax[1])))


def option(default, help: str, **extra):
    """A configuration field with its help text (the command line's flags are generated from them)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class SimCLRConfig:
    """Settings of one self-supervised pretraining run of the demo backbones (:mod:`fastsfm.models.pretrain`;
    recorded in each weight file; ``fastsfm pretrain``'s flags)."""

    epochs: int = option(150, "passes over the digits train split")
    batch: int = option(256, "images per batch (2x rows of projections: two views each)")
    lr: float = option(2e-3, "AdamW learning rate (cosine schedule)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    loss: PretrainLoss = option(
        "nt-xent", "contrastive loss: SimCLR's NT-Xent, or a GCA loss (fastsfm.gca_loss, the authors' CIFAR-10 options)"
    )
    temperature: float = option(0.2, "NT-Xent temperature")
    epsilon: float = option(0.5, "GCA entropic regularisation (the authors' 0.5)")
    projection: int = option(64, "width of the MLP projection head's output")
    colour: bool = option(True, "colour augmentation (ramped in after --colour-start epochs of grey views)")
    colour_start: int = option(20, "epochs of grey views before colour ramps in")
    colour_ramp: int = option(40, "epochs over which colour ramps to full strength")
    seed: int = option(0, "seed of the initialisation, the batches and the views")

    def __post_init__(self) -> None:
        _check_literals(self)
        require(self, at_least={"epochs": 1, "batch": 2, "projection": 1, "colour_start": 0, "colour_ramp": 0})
        require(self, at_least={"seed": 0})
        require(self, above={"lr": 0.0, "temperature": 0.0, "epsilon": 0.0}, at_least={"weight_decay": 0.0})


@dataclass
class DistillConfig:
    """Settings of one distillation run; all are recorded in checkpoints and outputs.

    Defaults are the authors' (``einsteinxia/SFM`` ``config/distill_config.py``, inherited from LGM).
    """

    method: Method = option("sfm", "objective: SFM, or the LGM baseline")
    ipc: int = option(1, "synthetic images per class")
    steps: int = option(5000, "optimisation steps (the authors' loop runs 5000 + 1)")
    lr: float = option(2e-3, "Adam learning rate")
    resolution: int = option(
        DEFAULT_RESOLUTION, "stored synthetic resolution; the backbone sees random crops at its input size"
    )
    param: Param = option("pyramid", "image parameterisation")
    init: Init = option("noise", "initialisation (real: random real images of each class, needs --data)")
    pyramid_start: int = option(1, "resolution of the first pyramid level")
    pyramid_extent: int = option(200, "steps between pyramid levels")
    decorrelate: bool = option(True, "colour decorrelation of the pyramid")
    channels: Channels = option("rgb", "synthetic image channels (grey: one channel replicated to RGB, for grey data)")
    views: int | None = option(
        None,
        "augmented copies of the synthetic set per step (default: 1 for sfm, the paper's single pass; "
        "10 for lgm, LGM's augs_per_batch; its real batch is ipc x views x C images)",
    )
    objective: Objective = option("flow", "SFM objective")
    backbone_weights: tuple[float, ...] | None = option(
        None,
        "SFM against several backbones: the weight of each backbone's flow loss, in --backbone order "
        "(default: equal weights, the mean of the losses)",
    )
    alpha: float = option(1.0, "decouple: weight of MSE(mu, t)")
    nontarget_divisor: float | None = option(
        None, "divisor of the synthetic non-target mean (default C-1; the released script uses C*IPC-1)"
    )
    noise_std: float = option(0.2, "augmentation noise std (0 disables the noise)")
    noise_mean: float = option(0.5, "augmentation noise mean (0.5: LGM's code when SFM forked it; 0.0: LGM's current)")
    chunk_size: int | None = option(None, "images per chunk of the exact two-pass step (default: from free memory)")
    offload: bool | None = option(
        None,
        "keep the synthetic set and its Adam state in page-locked host memory (--no-offload: on the GPU; "
        "default: the plan's choice, on the GPU when it fits there)",
    )
    optimizer_state: OptimizerState = option(
        "fp32",
        "storage of the two Adam moments between steps: fp32 (12 bytes/parameter with the image), bf16 (8), "
        "8bit (~6.1; blockwise, torchao's quantiser); the update is float32 in every mode",
    )
    cuda_graph: bool = option(
        False,
        "SFM on CUDA: replay each step as a CUDA graph (captured per pyramid level count after 2 eager steps), "
        "the host's launch overhead out of the step; resident sets, bf16/fp32",
    )
    workers: int | None = option(None, "LGM: real-image loading workers (default: the CPUs of this rank)")
    seed: int = option(0, "seed of every random draw of the run")
    checkpoint_every: int = option(100, "steps between checkpoints")
    checkpoint_minutes: float = option(
        30.0, "minutes between checkpoints as well (whichever comes first; IPC 10 at ImageNet-1k: ~32 GB each)"
    )

    def __post_init__(self) -> None:
        positive = ("ipc", "steps", "resolution", "pyramid_start", "pyramid_extent", "checkpoint_every", "views")
        require(
            self,
            at_least={
                **dict.fromkeys(positive + ("chunk_size",), 1),
                "workers": 0,
                "seed": 0,
                "noise_std": 0.0,
                "checkpoint_minutes": 0.0,
            },
            above={"lr": 0.0},
            finite=("noise_mean",),
        )
        check_loss_options(self.objective, self.alpha, self.nontarget_divisor)
        _check_literals(self)
        if self.cuda_graph and (self.method != "sfm" or self.offload):
            raise ValueError("cuda_graph replays SFM steps of a resident set: not with method='lgm' or offload")
        if self.backbone_weights is not None:
            self.backbone_weights = tuple(self.backbone_weights)
            bad = [w for w in self.backbone_weights if isinstance(w, bool) or not isinstance(w, (int, float))]
            if bad or not all(math.isfinite(w) and w >= 0 for w in self.backbone_weights):
                raise ValueError(f"backbone_weights must be finite numbers >= 0, got {self.backbone_weights!r}")
            if not sum(self.backbone_weights) > 0:
                raise ValueError(f"backbone_weights must not all be 0, got {self.backbone_weights!r}")

    def loss_weights(self, backbones: int) -> tuple[float, ...]:
        """The weight of each of ``backbones`` flow losses, summing to 1: ``backbone_weights``
        normalised, else equal (the mean).  ``ValueError`` when their number is not ``backbones``."""
        weights = self.backbone_weights or (1.0,) * backbones
        if len(weights) != backbones:
            raise ValueError(f"backbone_weights has {len(weights)} weights for {backbones} backbones")
        total = float(sum(weights))
        return tuple(float(w) / total for w in weights)

    @property
    def effective_views(self) -> int:
        """``views``, or the method's default: 1 for SFM (the paper), 10 for LGM (its ``augs_per_batch``)."""
        return self.views if self.views is not None else METHOD_VIEWS[self.method]

    def identity(self) -> dict[str, str]:
        """What must match for a checkpoint to be resumed: everything but the length and the
        execution choices (steps may grow; chunking, offload, workers and checkpoint cadence do not
        change results), plus the version of the random draws (:data:`DRAWS_VERSION`)."""
        free = ("steps", "checkpoint_every", "checkpoint_minutes", "chunk_size", "offload", "workers", "views")
        kept = {k: json.dumps(v) for k, v in asdict(self).items() if k not in (*free, "cuda_graph")}
        for name, default in (("backbone_weights", None), ("optimizer_state", "fp32")):
            if getattr(self, name) == default:  # the default of a later option: runs of earlier versions resume
                del kept[name]
        return {**kept, "views": str(self.effective_views), "draws": DRAWS_VERSION}


@dataclass
class MachineConfig:
    """The machine a distillation is planned for (:mod:`fastsfm.distill.plan`, ``fastsfm distill --plan``):
    figures left unset are this machine's (free GPU memory, available host memory, the torchrun world)."""

    plan: bool = option(False, "print the run's plan (chunk, placement, GPU/host peaks) or its refusal, and exit")
    classes: int | None = option(None, "--plan: classes of the run (default: the --stats file's)")
    device_gib: float | None = option(None, "--plan: a rank's GPU memory in GiB (given: a CUDA run; default: free)")
    host_gib: float | None = option(None, "--plan: a node's host memory in GiB (default: available here)")
    ranks: int | None = option(None, "--plan: ranks of the run (default: this torchrun's world size)")
    ranks_per_host: int | None = option(None, "--plan: ranks sharing a node's host memory (default: min(ranks, 8))")

    def __post_init__(self) -> None:
        require(
            self,
            at_least={"classes": 1, "ranks": 1, "ranks_per_host": 1},
            above={"device_gib": 0.0, "host_gib": 0.0},
        )
        if self.ranks is not None and self.ranks_per_host is not None and self.ranks_per_host > self.ranks:
            raise ValueError(f"ranks_per_host ({self.ranks_per_host}) cannot exceed ranks ({self.ranks})")


@dataclass
class BackboneConfig:
    """A backbone and how it runs: its one owner, from which the command line's backbone flags and
    the grid's ``[backbone]`` section derive.  ``precision`` is the synthetic side's autocast (the
    distillation forward and backward; in evaluation, the augmented training views); ``real_precision``
    the real side's (statistics, the real classifier's features, test features, baseline selection)."""

    backbone: str | None = option(
        None,
        "a paper alias (dinov2_vitb14, clip_vitb16, eva02_vitb14, mocov3_vitb16, ...; "
        "see fastsfm.models.backbones.ALIASES), "
        "an author name (dinov2_vitb, ...) or any timm name (default: dinov2_vitb14; digits: digits_vit)",
    )
    weights: str | None = option(
        None,
        "local weights in their publisher's format: a file (.safetensors, a .pth state dict, OpenAI's TorchScript "
        ".pt) or a checkpoint folder (MoCo-v3: config.json + model.safetensors); default: the local timm / Hugging "
        "Face caches",
    )
    random_init: bool = option(False, "no pretrained weights: seeded random init")
    image_size: int | None = option(None, "backbone input size (default: 224 for the paper aliases, else the model's)")
    preprocess: Preprocess = option("authors", "authors: ImageNet mean/std for every backbone; model: the model's own")
    precision: Precision = option(
        "auto",
        "autocast of the synthetic side (distill; eval: the augmented training views): auto = bf16 on CUDA, fp32 "
        "on CPU; fp16 uses the authors' fixed x1024 loss scale; bf16 also runs the render and crop in TF32",
    )
    real_precision: Precision = option(
        "fp32",
        "autocast of the real side -- class statistics, the real classifier's features, test features, baseline "
        "selection (fp32: the authors run these without autocast)",
    )
    attention: Attention = option(
        "auto",
        "attention kernel: auto (PyTorch's choice) or one SDPA backend (flash, efficient, cudnn, math); "
        "benches/profile_step.py times each",
    )
    compile: bool = option(
        False,
        "torch.compile the backbone's forward and its backward (fullgraph; equal to eager within float rounding; the "
        "first step includes the compilation, logged). Off by default until a GPU profile shows it wins",
    )

    def __post_init__(self) -> None:
        require(self, at_least={"image_size": 1})
        _check_literals(self)
        if self.weights and self.random_init:
            raise ValueError("weights and random_init exclude each other: give one")

    def pretrained(self) -> bool | str:
        """What :func:`fastsfm.models.backbones.load_backbone` takes: the weights, False (random init) or
        True (caches)."""
        return False if self.random_init else (self.weights or True)


@dataclass
class ClassifierConfig:
    """The distillation backbone's real-data linear classifier, fitted during ``fastsfm stats``.

    The authors' ``baselines/full_dataset.py`` as SFM's ``get_classifier.sh`` runs it: a linear head
    (N(0, 0.01^2) weights, zero bias), Adam lr 0.001 * 128 / 256, batch 128, cosine annealing per
    epoch, 10 epochs.  fastsfm fits it on the features cached by the statistics pass (centre
    crops, read once) where the authors re-encode augmented views every epoch.
    """

    classifier_epochs: int = option(10, "epochs of the real-data classifier (the authors' script: 10)")
    classifier_lr: float = option(5e-4, "its Adam learning rate (0.001 * 128 / 256)")
    classifier_batch: int = option(128, "its batch size")

    def __post_init__(self) -> None:
        require(self, at_least={"classifier_epochs": 1, "classifier_batch": 1}, above={"classifier_lr": 0.0})


@dataclass
class EvalConfig:
    """How a small training set is evaluated (the authors' ``distillation/eval_syn.py``).

    Batch ``min(batch, #images)``; Adam at ``lr * batch / 256`` (probe and KD: 1e-3, inheritance
    projector: 1e-2), cosine annealing per epoch, every batch freshly augmented (flip and
    random-resized crop); top-1 and top-5 on the real test split after the last epoch.
    """

    mode: tuple[EvalMode, ...] = option(("probe",), "evaluation modes (any of probe, inherit, kd)")
    epochs: int = option(1000, "training epochs per evaluation")
    seeds: int = option(3, "evaluations per set (seeds 0, 1, ...): mean and std are reported")
    batch: int = option(100, "largest batch (the batch is min(batch, #images))")
    probe_lr: float = option(1e-3, "probe and KD head learning rate, times batch / 256")
    inherit_lr: float = option(1e-2, "inheritance projector learning rate, times batch / 256")
    temperature: float = option(4.0, "KD temperature")
    kd_weight: float = option(0.5, "KD: weight of the KL term (1 - it: cross-entropy)")
    checkpoint_every: int = option(100, "epochs between saves of a running evaluation (with a journal: --out)")

    def __post_init__(self) -> None:
        if not self.mode or any(m not in get_args(EvalMode) for m in self.mode):
            raise ValueError(f"mode must be a non-empty subset of {list(get_args(EvalMode))}, got {self.mode!r}")
        require(
            self,
            at_least={"epochs": 1, "seeds": 1, "batch": 1, "checkpoint_every": 1, "kd_weight": 0.0},
            above={"probe_lr": 0.0, "inherit_lr": 0.0, "temperature": 0.0},
        )
        if self.kd_weight > 1:
            raise ValueError(f"kd_weight must be a number in [0, 1], got {self.kd_weight!r}")
        self.mode = tuple(dict.fromkeys(self.mode))


def with_defaults(cls: type, defaults: dict[str, object], **given: object):
    """``cls(...)`` from ``given`` values, then ``defaults`` (e.g. a dataset's) for the fields ``given``
    leaves out, then the class's own defaults; keys of ``defaults`` that are not fields are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in defaults.items() if k in names}, **given})


def choices(kind: object) -> list[str]:
    """The values of a ``Literal`` type, for argparse ``choices``."""
    return list(get_args(kind))


def cli_fields(cls: type) -> list[tuple[str, object, object, str]]:
    """``(name, type, default, help)`` of a config dataclass, types resolved (for argparse)."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]
