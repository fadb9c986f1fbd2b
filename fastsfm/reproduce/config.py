"""The grid's configuration: :class:`GridConfig`, read from TOML and validated before any work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import (
    METHOD_VIEWS,
    BackboneConfig,
    ClassifierConfig,
    DistillConfig,
    EvalConfig,
    GridMethod,
    choices,
    option,
    require,
)
from ..data.datasets import DatasetSpec
from ..distributed import WAIT_HOURS
from ..models.backbones import resolve_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = [
    "GridConfig",
    "ProjectionConfig",
    "load_grid",
    "validate_grid",
    "input_size",
    "members",
    "ENSEMBLE_SEP",
    "SHIPPED_CONFIGS",
    "PER_CELL",
]

ENSEMBLE_SEP = "+"
"""Joins the members of an ensemble into the name of its cells (timm names hold no ``+``)."""


def members(name: str) -> list[str]:
    """The backbones a distillation cell's backbone ``name`` stands for: an ensemble's members, or itself."""
    return name.split(ENSEMBLE_SEP)


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "resources" / "configs"
PER_CELL = {
    "method": "each distillation cell is one method of `methods`",
    "ipc": "each cell is one value of the top-level `ipc` list",
    "resolution": "the top-level `resolution` sets it for every cell (real and synthetic images)",
    "views": "the top-level `views` table sets it per method (sfm, lgm)",
}
"""``[distill]`` keys the grid sets per cell, and why a value there would be ignored."""


@dataclass
class ProjectionConfig:
    """What ``fastsfm reproduce --dry-run`` projects for (:mod:`fastsfm.reproduce.projection`)."""

    ranks: int | None = option(None, "--dry-run: ranks to project the wall time on (default: this torchrun's world)")
    job_hours: float = option(24.0, "--dry-run: the job limit; longer cells are flagged with how they resume")

    def __post_init__(self) -> None:
        require(self, at_least={"ranks": 1}, above={"job_hours": 0.0})


@dataclass
class GridConfig:
    """One grid; every field has a TOML key of the same name (sections: distill, eval, classifier,
    backbone -- the configs themselves, :mod:`fastsfm.config`, validated as they are everywhere).

    ``datasets``: entries in the command line's ``--data`` grammar (:class:`fastsfm.data.datasets.DatasetSpec`):
    ImageNet subset names (``imagenet-100``, ...), ``torchvision:<Class>`` -- on ``root``, unless
    the entry names its own (``imagenet-100:/data/imagenet``) --, ``folder:<dir>`` (``dir/train``
    and ``dir/val`` ImageFolders) or ``digits``.
    ``methods``: ``sfm``, ``lgm`` (distilled) and the real baselines ``random``, ``centroid``,
    ``kmeans``, ``neighbors`` (the nearest reals of the SFM set).  ``eval_backbones``: ``"same"``
    (each set with its distillation backbone), ``"all"`` (every backbone: the cross-backbone
    matrix) or a list.  ``views``: augmented copies per step of each distillation method.
    ``backbone``: how every backbone runs (input size, normalisation, ``precision`` of the
    synthetic side, ``real_precision`` of statistics and test features, ``random_init``); the
    ``weights`` table gives local weights per backbone.  ``ensembles``: lists of backbones (each
    list at least two of ``backbones``) for which SFM distils one set against all of them at once
    (:mod:`fastsfm.models.ensemble`); such a cell is named by its members joined with ``+``, reuses the
    members' statistics, and is evaluated (with the first member's real classifier for inheritance)
    on ``eval_backbones`` (``"same"``: its members).  ``wait_hours``: how long ranks wait for
    rank 0's work under torchrun (:mod:`fastsfm.distributed`).
    """

    out: str
    datasets: list[str]
    backbones: list[str]
    ensembles: list[list[str]] = field(default_factory=list)
    root: str | None = None
    ipc: list[int] = field(default_factory=lambda: [1])
    methods: list[GridMethod] = field(default_factory=lambda: ["sfm", "random", "centroid", "neighbors"])
    eval_backbones: str | list[str] = "all"
    full_data: bool = True
    resolution: int = 256
    views: dict[str, int] = field(default_factory=lambda: dict(METHOD_VIEWS))
    weights: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    workers: int | None = None
    wait_hours: float = WAIT_HOURS
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(mode=("probe", "inherit")))
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    def ensemble_names(self) -> list[str]:
        """The distillation "backbones" of the ``ensembles``: their members joined with ``+``."""
        return [ENSEMBLE_SEP.join(ensemble) for ensemble in self.ensembles]

    def distillers(self) -> list[str]:
        """Every distillation "backbone" of the grid: the ``backbones``, then the ensembles' names."""
        return list(self.backbones) + self.ensemble_names()

    def eval_list(self, backbone: str) -> list[str]:
        if self.eval_backbones == "same":
            return members(backbone)
        return list(self.backbones) if self.eval_backbones == "all" else list(self.eval_backbones)

    def dataset(self, entry: str) -> DatasetSpec:
        """A ``datasets`` entry in the command line's grammar (:class:`fastsfm.data.datasets.DatasetSpec`),
        ``root`` where the entry names none."""
        return DatasetSpec.parse(entry, root=self.root)

    def resolved_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def distill_config(self, method: str, ipc: int, backbones: int = 1) -> DistillConfig:
        """The ``[distill]`` settings of one distillation cell (against ``backbones`` backbones), with
        the keys the grid sets per cell; ``backbone_weights`` apply to the ensembles' cells only."""
        return dataclasses.replace(
            self.distill,
            method=method,
            ipc=ipc,
            resolution=self.resolution,
            views=self.views[method],
            backbone_weights=self.distill.backbone_weights if backbones > 1 else None,
        )


_SECTIONS = {"distill": DistillConfig, "eval": EvalConfig, "classifier": ClassifierConfig, "backbone": BackboneConfig}
PER_BACKBONE = {
    "backbone": "the grid's `backbones` list names them",
    "weights": "the top-level `weights` table gives them per backbone",
}
"""``[backbone]`` keys the grid sets per backbone."""


def _unknown(where: str, values: dict, known: set[str]) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


def _section(name: str, values: dict):
    cls = _SECTIONS[name]
    _unknown(f"[{name}]", values, {f.name for f in dataclasses.fields(cls)})
    fixed = {k: why for k, why in {"distill": PER_CELL, "backbone": PER_BACKBONE}.get(name, {}).items() if k in values}
    if fixed:
        raise ValueError(f"[{name}]: the grid sets these keys itself, remove them: {fixed}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_grid(path: str | Path, **overrides) -> GridConfig:
    """Read a grid TOML (a path, or the name of a shipped config such as ``imagenet100-ipc1``);
    ``overrides`` replace top-level keys (the CLI's ``--root``, ``--out``)."""
    path = Path(path)
    if not path.is_file() and (SHIPPED_CONFIGS / f"{path.name}.toml").is_file():
        path = SHIPPED_CONFIGS / f"{path.name}.toml"
    if not path.is_file():
        shipped = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.toml"))
        raise FileNotFoundError(f"grid config {path} does not exist (shipped configs: {shipped})")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from err
    raw.update({k: v for k, v in overrides.items() if v is not None})
    _unknown(str(path), raw, {f.name for f in dataclasses.fields(GridConfig)})
    missing = [k for k in ("out", "datasets", "backbones") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    for name in _SECTIONS:
        if name in raw:
            raw[name] = _section(name, raw[name])
    if "views" in raw:
        raw["views"] = {**METHOD_VIEWS, **raw["views"]}
    return GridConfig(**raw)


def _backbone_known(name: str) -> bool:
    import timm

    canonical, spec = resolve_name(name)
    return spec is not None or timm.is_model(canonical)


def input_size(grid: GridConfig) -> int:
    """The backbones' input size (the centre crop of statistics and test images): the grid's
    ``image_size``, else the first backbone's (224 for the paper aliases)."""
    spec = resolve_name(grid.backbones[0])[1]
    return grid.backbone.image_size or (spec.size if spec else 224)


def validate_grid(grid: GridConfig) -> None:
    """Every check that needs no heavy work, so a bad config fails before anything runs."""
    from ..data.imagenet import SUBSETS, check_imagenet_root

    allowed = choices(GridMethod)
    bad = [m for m in grid.methods if m not in allowed]
    if bad or not grid.methods:
        raise ValueError(f"unknown methods {bad}; known: {allowed}")
    if "neighbors" in grid.methods and "sfm" not in grid.methods:
        raise ValueError("the 'neighbors' baseline selects the nearest reals of the SFM set: add 'sfm' to methods")
    if set(grid.views) - {"sfm", "lgm"} or any(not isinstance(v, int) or v < 1 for v in grid.views.values()):
        raise ValueError(f"views: a table of positive integers for sfm and lgm, got {grid.views!r}")
    if not grid.backbones or not grid.datasets or not grid.ipc or min(grid.ipc) < 1:
        raise ValueError("backbones, datasets and ipc (values >= 1) must be non-empty")
    named = list(grid.backbones) + ([] if isinstance(grid.eval_backbones, str) else list(grid.eval_backbones))
    if isinstance(grid.eval_backbones, str) and grid.eval_backbones not in ("same", "all"):
        raise ValueError(f"eval_backbones must be 'same', 'all' or a list, got {grid.eval_backbones!r}")
    unknown = [b for b in named if not _backbone_known(b)]
    if unknown:
        raise ValueError(
            f"unknown backbones {unknown}: use a fastsfm alias (fastsfm.models.backbones.ALIASES), an author "
            "name or a timm model name"
        )
    for ensemble in grid.ensembles:
        if not isinstance(ensemble, list) or len(ensemble) < 2 or len(set(ensemble)) != len(ensemble):
            raise ValueError(f"ensembles: each a list of at least two distinct backbones, got {ensemble!r}")
        outside = [b for b in ensemble if b not in grid.backbones]
        if outside:
            raise ValueError(f"ensemble {ensemble}: {outside} not in `backbones` (their statistics are computed there)")
    weights = grid.distill.backbone_weights
    if weights is not None and any(len(e) != len(weights) for e in grid.ensembles):
        raise ValueError(f"[distill] backbone_weights has {len(weights)} weights: every ensemble needs as many members")
    if grid.ensembles and "sfm" not in grid.methods:
        raise ValueError("ensembles are distilled with SFM (LGM matches one backbone): add 'sfm' to methods")
    for name, path in grid.weights.items():
        if name not in named:
            raise ValueError(f"weights for {name!r}, which is not a backbone of the grid")
        if not Path(path).exists():
            raise FileNotFoundError(f"weights {path} for {name} do not exist")
    for dataset in grid.datasets:
        spec = grid.dataset(dataset)
        if spec.kind == "folder" and spec.test_root is None:  # a bare path: no test split to score on
            raise ValueError(
                f"unknown dataset {dataset!r}: an ImageNet subset ({', '.join(SUBSETS)}), torchvision:<Class>, "
                "folder:<dir> or digits (a subset or torchvision dataset may name its root: name:/path)"
            )
        if spec.kind == "imagenet":
            check_imagenet_root(spec.root, spec.name)
        elif spec.kind == "torchvision":
            if not Path(spec.root).exists():
                raise FileNotFoundError(f"root {spec.root} of {dataset} does not exist")
        elif spec.kind == "folder":
            for folder in (spec.root, spec.test_root):
                if folder is None or not Path(folder).is_dir():
                    raise FileNotFoundError(f"{folder} does not exist ({dataset} needs train/ and val/ folders)")
