"""``fastsfm reproduce CONFIG``: the papers' benchmark grid in one resumable command.

A grid is datasets x distillation backbones x IPC x methods x evaluation backbones x modes x seeds
(:class:`GridConfig`, read from TOML; ``fastsfm/resources/configs`` ships the authors' settings).
It runs as a list of **cells** (:mod:`.plan`), each writing one output and skipped when that
output exists, so an interrupted grid resumes where it stopped (and refused, or with
``--rerun-stale`` rerun, when the settings it recorded differ: :mod:`.settings`); at the end the tables in the
papers' layout are written (:mod:`.tables`).  ``--dry-run`` prints the plan with projected device
hours measured on this device (:mod:`.projection`).

The package is split by job: :mod:`.config` (the configuration and its validation), :mod:`.plan`
(cells and the folder layout), :mod:`.cells` (the runners), :mod:`.settings` (what a cell's result
depends on, stale cells), :mod:`.tables`, :mod:`.projection`,
and :mod:`.run` (the top-level loop).
"""

from .config import SHIPPED_CONFIGS, GridConfig, load_grid, validate_grid
from .plan import Cell, plan_grid
from .run import run_grid
from .tables import write_tables

__all__ = [
    "GridConfig",
    "load_grid",
    "validate_grid",
    "plan_grid",
    "run_grid",
    "write_tables",
    "Cell",
    "SHIPPED_CONFIGS",
]
