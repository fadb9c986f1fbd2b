"""What determines a grid cell's result, recorded beside it, and the cells whose record differs (stale).

A cell that is done (:meth:`fastsfm.reproduce.plan.Cell.done`) is reused only if the settings that
determine its result -- :func:`cell_settings`: its dataset, backbone(s) and their weights, the
resolution, the classifier, and by kind the distillation, baseline and evaluation settings, with
those of the cells it reads -- equal the ones recorded when it finished (``<output>.settings.json``,
:func:`record`).  Settings that change how a cell runs but not its result are left out
(:data:`NEUTRAL`: chunking and offload are exact, checkpoint cadence, workers, device, the data's
location).  :func:`stale_cells` lists the cells whose record differs; the grid refuses to run with
them (naming each cell and setting) unless asked to rerun them (:func:`discard`).  Cells made before
records existed have none and are kept, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from ..io import atomic_write_json
from .cells import FEATURES
from .config import GridConfig, members
from .plan import DISTILLED, Cell, backbone_folder, canonical

__all__ = ["NEUTRAL", "cell_settings", "settings_path", "record", "stale_cells", "differences", "discard"]

NEUTRAL = {
    "distill": ("chunk_size", "offload", "cuda_graph", "workers", "checkpoint_every", "checkpoint_minutes"),
    "eval": ("checkpoint_every",),
    "backbone": ("attention", "compile"),
}
"""Fields of each config section that change how a cell runs, not what it computes."""


def _section(config: object, name: str) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in NEUTRAL.get(name, ())}


def _real_side(grid: GridConfig, dataset: str, backbone: str) -> dict:
    """What the statistics of ``backbone`` (one, or an ensemble's members) on ``dataset`` depend on."""
    names = [canonical(m) for m in members(backbone)]
    return {
        "dataset": dataset,
        "backbones": names,
        "weights": {n: grid.weights.get(m) for n, m in zip(names, members(backbone), strict=True)},
        "resolution": grid.resolution,
        "backbone": _section(grid.backbone, "backbone"),
        "classifier": _section(grid.classifier, "classifier"),
    }


def _distilled(grid: GridConfig, dataset: str, backbone: str, method: str, ipc: int) -> dict:
    config = grid.distill_config(method, ipc, len(members(backbone)))
    return {**_real_side(grid, dataset, backbone), "distill": _section(config, "distill")}


def _baseline(grid: GridConfig, cell: Cell) -> dict:
    out = {**_real_side(grid, cell.dataset, cell.backbone), "baseline": cell.name, "ipc": cell.ipc}
    if cell.name == "random":
        out["seeds"] = grid.eval.seeds
    if cell.name == "neighbors":
        out["sfm"] = _distilled(grid, cell.dataset, cell.backbone, "sfm", cell.ipc)["distill"]
    return out


def cell_settings(grid: GridConfig, cell: Cell) -> dict:
    """The settings that determine ``cell``'s result (JSON-able)."""
    if cell.kind in ("stats", "full"):
        return _real_side(grid, cell.dataset, cell.backbone)
    if cell.kind == "distill":
        return _distilled(grid, cell.dataset, cell.backbone, cell.name, cell.ipc)
    if cell.kind == "baseline":
        return _baseline(grid, cell)
    source = cell.name in DISTILLED
    made = _distilled(grid, cell.dataset, cell.backbone, cell.name, cell.ipc) if source else _baseline(grid, cell)
    evaluated = [canonical(b) for b in grid.eval_list(cell.backbone)]
    return {**made, "eval": _section(grid.eval, "eval"), "eval_backbones": evaluated}


def settings_path(cell: Cell) -> Path:
    """``<output stem>.settings.json`` beside the cell's output."""
    return cell.path.with_name(cell.path.stem + ".settings.json")


def record(grid: GridConfig, cell: Cell) -> None:
    """Write the settings of a finished ``cell`` beside its output (atomically)."""
    atomic_write_json(settings_path(cell), cell_settings(grid, cell))


def _flat(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def differences(recorded: dict, current: dict) -> list[str]:
    """``key: recorded -> current`` for every setting (dotted) that differs."""
    old, new = _flat(recorded), _flat(json.loads(json.dumps(current)))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
    ]


def stale_cells(grid: GridConfig, cells: list[Cell]) -> tuple[list[tuple[Cell, list[str]]], list[Cell]]:
    """``(stale, unrecorded)``: the done cells whose recorded settings differ from the grid's (with the
    differences), and the done cells without a record."""
    stale, unrecorded = [], []
    for cell in cells:
        if not cell.done():
            continue
        path = settings_path(cell)
        if not path.exists():
            unrecorded.append(cell)
            continue
        diff = differences(json.loads(path.read_text()), cell_settings(grid, cell))
        if diff:
            stale.append((cell, diff))
    return stale, unrecorded


def discard(grid: GridConfig, cell: Cell) -> None:
    """Remove a stale cell's output and record so that it runs again from the start (a distillation's
    checkpoints, an evaluation's partial results, a statistics cell's cached features too)."""
    folder = cell.path.parent
    for path in [cell.path, settings_path(cell)]:
        path.unlink(missing_ok=True)
    if cell.kind == "distill":
        for path in folder.glob("checkpoint*.safetensors"):
            path.unlink()
    if cell.kind == "eval":
        shutil.rmtree(folder / "eval", ignore_errors=True)
    if cell.kind == "stats":
        (backbone_folder(grid, cell.dataset, cell.backbone) / FEATURES).unlink(missing_ok=True)
