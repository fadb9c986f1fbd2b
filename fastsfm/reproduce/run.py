"""Running a grid: validate, plan, check the done cells' settings, run every cell not yet done (or
project it), write the tables.

A done cell whose recorded settings differ from the grid's (:mod:`fastsfm.reproduce.settings`) stops
the grid before any work, naming the cell and the settings, unless ``rerun_stale`` discards it
(and every cell that read it: their settings differ too) to run again.

Under ``torchrun``, every cell runs on every rank and shares its work among them
(:data:`fastsfm.reproduce.cells.RUNNERS`); rank 0 writes the outputs and the tables while the
other ranks wait on the gloo control group
(never in an NCCL collective, whose watchdog would abort a long wait), and a failure on any rank
ends every rank with its error (:mod:`fastsfm.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from ..distributed import broadcast_from_rank0, run_on_all, run_on_rank0
from ..io import atomic_write_json
from .cells import RUNNERS, Run
from .config import GridConfig, ProjectionConfig, validate_grid
from .plan import Cell, plan_grid
from .projection import projection
from .settings import discard, record, settings_path, stale_cells
from .tables import write_tables

__all__ = ["run_grid", "GridOutcome"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GridOutcome:
    """What :func:`run_grid` did: the plan, and on rank 0 its report -- the projection of a dry
    run, else the paths of the tables written (the command line prints it on stdout)."""

    cells: list[Cell]
    report: str | None


def _check_stale(grid: GridConfig, cells: list[Cell], rerun_stale: bool) -> None:
    """Refuse (``ValueError``) done cells made with other settings, or (``rerun_stale``) discard them."""
    stale, unrecorded = stale_cells(grid, cells)
    if unrecorded:
        log.warning(
            "%d done cells have no recorded settings (made before fastsfm recorded them): kept", len(unrecorded)
        )
    if not stale:
        return
    if not rerun_stale:
        first, diff = stale[0]
        more = f" (and {len(stale) - 1} more cells)" if len(stale) > 1 else ""
        raise ValueError(
            f"grid cell '{first.label()}' was made with other settings: {'; '.join(diff[:4])}{more}; restore them, "
            "or pass --rerun-stale to discard and rerun the stale cells"
        )
    log.warning("rerunning %d stale cells: %s", len(stale), ", ".join(c.label() for c, _ in stale))
    run_on_rank0(lambda: [discard(grid, c) for c, _ in stale])


def run_grid(
    grid: GridConfig,
    dry_run: bool = False,
    progress: bool = True,
    rerun_stale: bool = False,
    projected: ProjectionConfig | None = None,
) -> GridOutcome:
    """Validate, log the plan, check the done cells' settings, then run every cell not yet done (or,
    ``dry_run``, project its GPU-hours and wall time instead, for ``projected``); finally write the tables."""
    validate_grid(grid)
    cells = plan_grid(grid)
    run = Run(grid, progress)
    _check_stale(grid, cells, rerun_stale and not dry_run)
    if dry_run:
        options = projected or ProjectionConfig()
        return GridOutcome(cells, run_on_rank0(lambda: projection(run, cells, options.ranks, options.job_hours)[0]))
    todo = [c for c in cells if not c.done()]
    if run.rank == 0:
        log.info("grid %s: %d cells, %d done, %d to run", grid.out, len(cells), len(cells) - len(todo), len(todo))
        atomic_write_json(Path(grid.out) / "grid.json", dataclasses.asdict(grid))
    for cell in todo:
        # a statistics cell computes every pending backbone's statistics in its pass; rank 0 decides for all,
        # since another rank could see the output of a rank-0 cell already written and skip the cell's wait
        if broadcast_from_rank0(cell.done() if run.rank == 0 else None):
            continue
        if run.rank == 0:
            log.info("[%s] %s", time.strftime("%H:%M:%S"), cell.label())
        work = lambda cell=cell: RUNNERS[cell.kind](run, cell)  # noqa: E731
        run_on_all(work)
        if run.rank == 0:  # this cell, and the statistics cells its pass completed
            for finished in todo:
                if finished.done() and not settings_path(finished).exists():
                    record(grid, finished)

    def tables() -> str:
        written = [write_tables(grid, dataset, ipc) for dataset in grid.datasets for ipc in grid.ipc]
        return "wrote " + ", ".join(str(p) for p in written) + " (and their .csv/.json)"

    return GridOutcome(cells, run_on_rank0(tables))
