"""The command line's flags: derived from the typed configs, plus the backbone and data groups.

:func:`add_config_flags` makes one ``--flag`` per field of a config dataclass (name, type, choices,
help); :func:`config_from_args` builds the config back, taking the dataset's defaults
(:func:`fastsfm.datasets.dataset_defaults`) for the flags not given.  The backbone and data flag
groups, shared by several subcommands, and their readers live here too.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Literal

import torch

from .config import Precision, Preprocess, choices, cli_fields, with_defaults

__all__ = [
    "Parser",
    "integer",
    "add_config_flags",
    "config_from_args",
    "dataset_defaults_of",
    "add_backbone_flags",
    "backbone_from_args",
    "add_data_flags",
    "resolution_of",
    "data_from_args",
    "WORKERS_HELP",
    "DEFAULT_BACKBONE",
]

DEFAULT_BACKBONE = "dinov2_vitb14"
WORKERS_HELP = "image-decoding worker processes (default: this process's CPUs shared among the node's processes)"


def integer(low: int):
    """An argparse type: an integer >= ``low`` (else a one-line error naming the flag and the range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fastsfm distill: error: argument --steps: ...``), exit 2, as
    the commands' own errors: no usage block in front of the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One ``--flag`` per field of the config dataclass ``cls`` (Literal -> choices, bool -> --x/--no-x).

    A flag that is not given leaves no attribute (``argparse.SUPPRESS``): :func:`config_from_args`
    then takes the dataset's default, else the field's (the help shows the field's)."""
    group = parser.add_argument_group(title)
    for name, kind, default, text in cli_fields(cls):
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{text} (default: {default})",
            )
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) is tuple:  # tuple[Literal[...], ...]: a list of choices
            group.add_argument(
                flag,
                dest=name,
                nargs="+",
                choices=list(typing.get_args(args[0])),
                default=argparse.SUPPRESS,
                help=f"{text} (default: {' '.join(default)})",
            )
            continue
        if typing.get_origin(kind) is Literal:
            group.add_argument(
                flag, dest=name, choices=list(args), default=argparse.SUPPRESS, help=f"{text} (default: {default})"
            )
            continue
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in args if a is not type(None))
        group.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, help=f"{text} (default: {default})")


def config_from_args(cls: type, args: argparse.Namespace, defaults: dict[str, object] | None = None):
    """The config dataclass ``cls`` from parsed flags, with ``defaults`` (the dataset's,
    :func:`fastsfm.datasets.dataset_defaults`) for the flags not given (its validation applies)."""
    given = {
        name: tuple(v) if isinstance(v, list) else v
        for name, v in ((name, getattr(args, name)) for name, *_ in cli_fields(cls) if hasattr(args, name))
    }
    return with_defaults(cls, defaults or {}, **given)


def dataset_defaults_of(args: argparse.Namespace) -> dict[str, object]:
    """The defaults of the dataset of ``--data`` (empty without one)."""
    from .datasets import dataset_defaults

    return dataset_defaults(getattr(args, "data", None))


SYNTHETIC_PRECISION_HELP = (
    "backbone autocast of the synthetic side (eval: the augmented training views of every set): auto = bf16 "
    "on CUDA, fp32 on CPU; fp16 uses the authors' fixed x1024 loss scale"
)
REAL_PRECISION_HELP = (
    "backbone autocast of the real side -- class statistics, the real-data classifier's features, test "
    "features, baseline selection (default fp32: the authors run these without autocast)"
)


def add_backbone_flags(p: argparse.ArgumentParser, synthetic: bool = True, real: bool = True) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument(
        "--backbone",
        default=None,
        help="a paper alias (dinov2_vitb14, clip_vitb16, eva02_vitb14, mocov3_vitb16, ...; see "
        f"fastsfm.backbones.ALIASES), an author name (dinov2_vitb, ...) or any timm name (default: {DEFAULT_BACKBONE}; "
        "digits: digits_vit)",
    )
    w = g.add_mutually_exclusive_group()
    w.add_argument(
        "--weights",
        default=None,
        help="local weights in their publisher's format: a file (.safetensors, a .pth state dict, OpenAI's "
        "TorchScript .pt) or a checkpoint folder (MoCo-v3: config.json + model.safetensors); default: the local "
        "timm / Hugging Face caches",
    )
    w.add_argument("--random-init", action="store_true", help="no pretrained weights: seeded random init")
    g.add_argument(
        "--image-size",
        type=integer(1),
        default=None,
        help="backbone input size (default: 224 for the paper aliases, else the model's)",
    )
    g.add_argument(
        "--preprocess",
        choices=choices(Preprocess),
        default="authors",
        help="authors: ImageNet mean/std for every backbone (default); model: the model's own",
    )
    if synthetic:
        g.add_argument("--precision", choices=choices(Precision), default="auto", help=SYNTHETIC_PRECISION_HELP)
    if real:
        g.add_argument("--real-precision", choices=choices(Precision), default="fp32", help=REAL_PRECISION_HELP)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def backbone_from_args(args: argparse.Namespace, name: str | None = None, weights: str | None = None):
    """The backbone of the flags (``--backbone``/``--weights``), or ``name``/``weights`` with the same options."""
    from .backbones import load_backbone

    # an evaluation backbone's own --eval-weights count even with --random-init
    given = weights if name else args.weights
    pretrained = given or (False if args.random_init else True)
    return load_backbone(
        name or args.backbone or dataset_defaults_of(args).get("backbone", DEFAULT_BACKBONE),
        pretrained,
        args.image_size,
        device=args.device,
        preprocess=args.preprocess,
        precision=getattr(args, "precision", "auto"),
    )


def add_data_flags(p: argparse.ArgumentParser, required: bool, test: bool = False, resolution: bool = True) -> None:
    p.add_argument("--data", required=required, help="ImageFolder root of the training images, or 'digits'")
    if test:
        p.add_argument("--test-data", default=None, help="ImageFolder root of the test split (digits: built in)")
    if resolution:
        p.add_argument(
            "--resolution",
            type=integer(1),
            default=None,
            help="real images are resized to this (shorter side) and centre-cropped to the backbone's "
            "input (default 256; digits: 32)",
        )


def resolution_of(args: argparse.Namespace) -> int:
    """``--resolution``, else the dataset's default, else 256: one rule for every subcommand."""
    from .datasets import DEFAULT_RESOLUTION

    return args.resolution or int(dataset_defaults_of(args).get("resolution", DEFAULT_RESOLUTION))


def data_from_args(args: argparse.Namespace, crop: int):
    from .datasets import load_data

    return load_data(args.data, resolution_of(args), crop, getattr(args, "test_data", None))
