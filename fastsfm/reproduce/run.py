"""Running a grid: validate, plan, run every cell not yet done (or project it), write the tables.

Under ``torchrun``, statistics and SFM distillations shard over the ranks; rank 0 runs LGM cells,
baselines, evaluations and the tables while the other ranks wait on the gloo control group
(never in an NCCL collective, whose watchdog would abort a long wait), and a failure on any rank
ends every rank with its error (:mod:`fastsfm.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from ..distributed import run_on_all, run_on_rank0
from ..io import atomic_write_json
from .cells import ALL_RANKS, RUNNERS, Run
from .config import GridConfig, validate_grid
from .plan import Cell, plan_grid
from .projection import projection
from .tables import write_tables

__all__ = ["run_grid", "GridOutcome"]

log = logging.getLogger(__name__)


def _everyone(cell: Cell) -> bool:
    return cell.kind in ALL_RANKS or (cell.kind == "distill" and cell.name == "sfm")


@dataclasses.dataclass
class GridOutcome:
    """What :func:`run_grid` did: the plan, and on rank 0 its report -- the projection of a dry
    run, else the paths of the tables written (the command line prints it on stdout)."""

    cells: list[Cell]
    report: str | None


def run_grid(grid: GridConfig, dry_run: bool = False, progress: bool = True) -> GridOutcome:
    """Validate, log the plan, then run every cell not yet done (or, ``dry_run``, project its
    device hours instead); finally write the tables."""
    validate_grid(grid)
    cells = plan_grid(grid)
    run = Run(grid, progress)
    if dry_run:
        return GridOutcome(cells, run_on_rank0(lambda: projection(run, cells)[0]))
    todo = [c for c in cells if not c.done()]
    if run.rank == 0:
        log.info("grid %s: %d cells, %d done, %d to run", grid.out, len(cells), len(cells) - len(todo), len(todo))
        atomic_write_json(Path(grid.out) / "grid.json", dataclasses.asdict(grid))
    for cell in todo:
        if cell.done():  # a statistics cell computes every pending backbone's statistics in its pass
            continue
        if run.rank == 0:
            log.info("[%s] %s", time.strftime("%H:%M:%S"), cell.label())
        work = lambda cell=cell: RUNNERS[cell.kind](run, cell)  # noqa: E731
        run_on_all(work) if _everyone(cell) else run_on_rank0(work)

    def tables() -> str:
        written = [write_tables(grid, dataset, ipc) for dataset in grid.datasets for ipc in grid.ipc]
        return "wrote " + ", ".join(str(p) for p in written) + " (and their .csv/.json)"

    return GridOutcome(cells, run_on_rank0(tables))
