"""The command line's flags: derived from the typed configs, plus the backbone and data groups.

:func:`add_config_flags` makes one ``--flag`` per field of a config dataclass (name, type, choices,
help); :func:`config_from_args` builds the config back, taking the dataset's defaults
(:func:`fastsfm.data.datasets.dataset_defaults`) for the flags not given.  The backbone and data flag
groups, shared by several subcommands, and their readers live here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Literal

import torch

from ..config import DEFAULT_RESOLUTION, BackboneConfig, cli_fields, with_defaults

__all__ = [
    "Parser",
    "integer",
    "add_config_flags",
    "config_from_args",
    "dataset_defaults_of",
    "add_backbone_flags",
    "backbone_config_of",
    "backbone_configs_of",
    "add_data_flags",
    "resolution_of",
    "data_from_args",
    "WORKERS_HELP",
    "number",
]

WORKERS_HELP = "image-decoding worker processes (default: this process's CPUs shared among the node's processes)"


def integer(low: int):
    """An argparse type: an integer >= ``low`` (else a one-line error naming the flag and the range)."""
    return _at_least(int, "an integer", low)


def number(low: float):
    """An argparse type: a finite number >= ``low`` (else a one-line error naming the flag and the range)."""
    return _at_least(float, "a number", low)


def _at_least(kind: type, what: str, low):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} >= {low}, got {text!r}") from None
        if not value >= low or value == float("inf"):  # NaN fails the first test
            raise argparse.ArgumentTypeError(f"must be {what} >= {low}, got {value}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fastsfm distill: error: argument --steps: ...``), exit 2, as
    the commands' own errors: no usage block in front of the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str, many: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of the config dataclass ``cls`` (Literal -> choices, bool -> --x/--no-x,
    tuple -> several values); the fields named in ``many`` take one value per item (``--backbone A B``).

    A flag that is not given leaves no attribute (``argparse.SUPPRESS``): :func:`config_from_args`
    then takes the dataset's default, else the field's (the help shows the field's)."""
    group = parser.add_argument_group(title)
    for name, kind, default, text in cli_fields(cls):
        flag = "--" + name.replace("_", "-")
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        several = "; several: one per backbone, in order" if name in many else ""
        common = {"dest": name, "default": argparse.SUPPRESS, "help": f"{text}{several} (default: {shown})"}
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            continue
        nargs = "+" if name in many else None
        if typing.get_origin(kind) is tuple:  # tuple[X, ...]: a list of values
            kind, nargs = typing.get_args(kind)[0], "+"
        if typing.get_origin(kind) is Literal:
            group.add_argument(flag, choices=list(typing.get_args(kind)), nargs=nargs, **common)
        else:
            group.add_argument(flag, type=kind, nargs=nargs, **common)


def config_from_args(cls: type, args: argparse.Namespace, defaults: dict[str, object] | None = None):
    """The config dataclass ``cls`` from parsed flags, with ``defaults`` (the dataset's,
    :func:`fastsfm.data.datasets.dataset_defaults`) for the flags not given (its validation applies)."""
    given = {
        name: tuple(v) if isinstance(v, list) else v
        for name, v in ((name, getattr(args, name)) for name, *_ in cli_fields(cls) if hasattr(args, name))
    }
    return with_defaults(cls, defaults or {}, **given)


def dataset_defaults_of(args: argparse.Namespace) -> dict[str, object]:
    """The defaults of the dataset of ``--data`` (empty without one)."""
    from ..data.datasets import dataset_defaults

    return dataset_defaults(getattr(args, "data", None))


SEVERAL = ("backbone", "weights")
"""The backbone flags that take one value per backbone where a subcommand accepts several."""


def add_backbone_flags(p: argparse.ArgumentParser, several: bool = False) -> None:
    """The backbone's flags, from :class:`fastsfm.config.BackboneConfig`, and ``--device``; with
    ``several``, ``--backbone`` and ``--weights`` take one value per backbone (:func:`backbone_configs_of`)."""
    add_config_flags(p, BackboneConfig, "backbone (BackboneConfig)", many=SEVERAL if several else ())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the backbone runs")


def backbone_config_of(args: argparse.Namespace) -> BackboneConfig:
    """The :class:`BackboneConfig` of the flags, with the dataset's default backbone (digits: digits_vit)."""
    return config_from_args(BackboneConfig, args, dataset_defaults_of(args))


def backbone_configs_of(args: argparse.Namespace) -> list[BackboneConfig]:
    """One :class:`BackboneConfig` per ``--backbone`` name (``--weights``: none, or one per name, in
    order), the other backbone flags shared; the dataset's default backbone when none is named."""
    names = list(getattr(args, "backbone", None) or [None])
    weights = list(getattr(args, "weights", None) or [None] * len(names))
    if len(weights) != len(names):
        raise ValueError(f"--weights gives {len(weights)} files for {len(names)} backbones: give one per --backbone")
    if len(set(names)) != len(names):
        raise ValueError(f"--backbone names a backbone twice: {names}")
    shared = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in SEVERAL})
    base = backbone_config_of(shared)
    return [
        dataclasses.replace(base, weights=file, **({"backbone": name} if name else {}))
        for name, file in zip(names, weights, strict=True)
    ]


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


def data_from_args(args: argparse.Namespace, crop: int | tuple[int, ...]):
    from ..data.datasets import load_data

    return load_data(args.data, resolution_of(args), crop, getattr(args, "test_data", None))
