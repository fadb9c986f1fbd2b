"""The grid's plan: its cells, in execution order, and the folder layout they write.

=========== ============================================ ==========================================
cell        per                                          output (under ``out/<dataset>/<backbone>/``)
=========== ============================================ ==========================================
stats       (dataset, backbone)                          ``stats.safetensors`` (centres + real
                                                         classifier) and ``train_features.safetensors``
                                                         (the features of that pass, for baselines)
full        (dataset, backbone)                          ``full.json``: the real classifier's test accuracy
distill     (dataset, backbone or ensemble, IPC,         ``ipc<k>/<method>/``: a run folder (resumed
            sfm|lgm; an ensemble: sfm)                   from its checkpoint), done with ``synset.safetensors``
baseline    (dataset, backbone, IPC, random|centroid|    ``ipc<k>/<method>/indices.json``: the selected
            kmeans|neighbors)                            real images (random: one draw per seed)
eval        (dataset, backbone or ensemble, IPC, set)    ``ipc<k>/<set>/eval.json``: every evaluation
                                                         backbone x mode x seed (``eval/`` holds the
                                                         partial results of an unfinished cell)
=========== ============================================ ==========================================

Each cell is done when its output exists, so an interrupted grid resumes where it stopped; a done
cell is reused only while the settings it recorded beside its output still hold
(:mod:`fastsfm.reproduce.settings`).  The
first statistics cell of a dataset computes the statistics of every backbone still without them in
one pass over the images (:func:`fastsfm.stats.dataset_stats_many`), so the others are then done.
An ensemble (``a+b``, :attr:`GridConfig.ensembles`) has only SFM's distill and eval cells, in
``out/<dataset>/<a>+<b>/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models.backbones import resolve_name
from .config import ENSEMBLE_SEP, GridConfig, members

__all__ = ["Cell", "plan_grid", "dataset_folder", "backbone_folder", "canonical", "DISTILLED"]

DISTILLED = ("sfm", "lgm")


@dataclass
class Cell:
    """One unit of work of the grid, done when ``path`` exists."""

    kind: str
    dataset: str
    backbone: str
    ipc: int | None
    name: str
    path: Path

    def done(self) -> bool:
        return self.path.exists()

    def label(self) -> str:
        parts = [self.kind, self.dataset, self.backbone] + ([f"IPC={self.ipc}"] if self.ipc else []) + [self.name]
        return " ".join(p for p in parts if p)


def dataset_folder(grid: GridConfig, dataset: str) -> Path:
    return Path(grid.out) / dataset.replace(":", "_").replace("/", "_")


def canonical(backbone: str) -> str:
    """A backbone's (or an ensemble's, member by member) canonical name: its folder and table name."""
    return ENSEMBLE_SEP.join(resolve_name(member)[0] for member in members(backbone))


def backbone_folder(grid: GridConfig, dataset: str, backbone: str) -> Path:
    return dataset_folder(grid, dataset) / canonical(backbone)


def plan_grid(grid: GridConfig) -> list[Cell]:
    """Every cell of the grid, in execution order."""
    cells = []
    for dataset in grid.datasets:
        for backbone in grid.backbones:
            base = backbone_folder(grid, dataset, backbone)
            cells.append(Cell("stats", dataset, backbone, None, "", base / "stats.safetensors"))
            if grid.full_data:
                cells.append(Cell("full", dataset, backbone, None, "", base / "full.json"))
            for ipc in grid.ipc:
                run = base / f"ipc{ipc}"
                for method in grid.methods:
                    done = "synset.safetensors" if method in DISTILLED else "indices.json"
                    kind = "distill" if method in DISTILLED else "baseline"
                    cells.append(Cell(kind, dataset, backbone, ipc, method, run / method / done))
                cells += [Cell("eval", dataset, backbone, ipc, m, run / m / "eval.json") for m in grid.methods]
        for ensemble in grid.ensemble_names():
            for ipc in grid.ipc:
                run = backbone_folder(grid, dataset, ensemble) / f"ipc{ipc}" / "sfm"
                cells.append(Cell("distill", dataset, ensemble, ipc, "sfm", run / "synset.safetensors"))
                cells.append(Cell("eval", dataset, ensemble, ipc, "sfm", run / "eval.json"))
    return cells
