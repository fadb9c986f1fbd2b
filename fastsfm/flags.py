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

from .config import DEFAULT_RESOLUTION, BackboneConfig, cli_fields, with_defaults

__all__ = [
    "Parser",
    "integer",
    "add_config_flags",
    "config_from_args",
    "dataset_defaults_of",
    "add_backbone_flags",
    "backbone_config_of",
    "add_data_flags",
    "resolution_of",
    "data_from_args",
    "WORKERS_HELP",
]

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


def add_backbone_flags(p: argparse.ArgumentParser) -> None:
    """The backbone's flags, from :class:`fastsfm.config.BackboneConfig`, and ``--device``."""
    add_config_flags(p, BackboneConfig, "backbone (BackboneConfig)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the backbone runs")


def backbone_config_of(args: argparse.Namespace) -> BackboneConfig:
    """The :class:`BackboneConfig` of the flags, with the dataset's default backbone (digits: digits_vit)."""
    return config_from_args(BackboneConfig, args, dataset_defaults_of(args))


def add_data_flags(p: argparse.ArgumentParser, required: bool, test: bool = False, resolution: bool = True) -> None:
    p.add_argument(
        "--data",
        required=required,
        help="digits, an ImageNet subset on a local copy (imagenet-100:/data/imagenet), torchvision:<Class>:<root>, "
        "folder:<dir> (dir/train, dir/val) or an ImageFolder root of the training images (the grid's grammar too)",
    )
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
    return args.resolution or int(dataset_defaults_of(args).get("resolution", DEFAULT_RESOLUTION))


def data_from_args(args: argparse.Namespace, crop: int):
    from .datasets import load_data

    return load_data(args.data, resolution_of(args), crop, getattr(args, "test_data", None))
