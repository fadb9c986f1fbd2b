"""The grid's tables in the papers' layout, from the finished evaluation cells.

``out/<dataset>/results_ipc<k>.{md,csv,json}``: per evaluation mode, the same-backbone table (rows:
training sets, columns: backbones, mean ± std over seeds, the LGM paper's published number in
parentheses where a cell matches) and the cross-backbone matrix of each distilled method
(distillation backbone x evaluation backbone; SFM's also has a row per ensemble, ``a+b``).  Rows of scores are
summarised with :func:`fastsfm.evaluate.evaluator.summarise`, cells written with
:func:`fastsfm.evaluate.evaluator.mean_std`.
"""

from __future__ import annotations

import csv
import functools
import json
import statistics
from pathlib import Path

from ..evaluate.evaluator import Score, mean_std, summarise
from ..io import atomic_write_json, atomic_write_text
from ..models.backbones import resolve_name
from .config import ENSEMBLE_SEP, GridConfig
from .plan import DISTILLED, backbone_folder, canonical, dataset_folder

__all__ = ["write_tables", "ROWS", "FULL_DATA_NOTE", "CLIP_NOTE"]

ROWS = {
    "sfm": "Distilled (SFM)",
    "lgm": "Distilled (LGM)",
    "neighbors": "Neighbors (of SFM)",
    "centroid": "Centroids",
    "kmeans": "k-means",
    "random": "Random",
    "full": "Full dataset*",
}
FULL_DATA_NOTE = (
    "*Full dataset: fastsfm's number is the distillation backbone's real-data classifier as SFM's "
    "get_classifier.sh trains it (one run, 10 epochs on the statistics pass's centre-crop features); the "
    "LGM paper's number in parentheses is its full_dataset.py (5 runs x 100 epochs on augmented views), so "
    "the two differ by protocol, not only by noise."
)
CLIP_NOTE = (
    "CLIP columns: fastsfm's clip_vitb16 is OpenAI's ViT-B/16, as SFM's code loads it; LGM's code (latest "
    "commit) loads ViT-B/32 under the same name, so LGM's published CLIP numbers in parentheses are most "
    "likely ViT-B/32's."
)


@functools.cache
def _published() -> dict:
    """The LGM paper's numbers (``resources/published.json``), read once: every table cell looks them up."""
    return json.loads((Path(__file__).resolve().parents[1] / "resources" / "published.json").read_text())


def _collect(grid: GridConfig, dataset: str, ipc: int) -> tuple[list[dict], dict[str, dict]]:
    """Rows (set x distillation backbone x evaluation backbone x mode, mean and std) and the full-data scores."""
    rows, full = [], {}
    for backbone in grid.distillers():
        base = backbone_folder(grid, dataset, backbone)
        distill_name = canonical(backbone)
        if (base / "full.json").exists():
            full[distill_name] = json.loads((base / "full.json").read_text())
        for method in grid.methods:
            path = base / f"ipc{ipc}" / method / "eval.json"
            if not path.exists():
                continue
            scores = [Score(**{**s, "set": method}) for s in json.loads(path.read_text())["scores"]]
            for row in summarise(scores):
                rows.append(
                    {
                        "dataset": dataset,
                        "ipc": ipc,
                        "set": method,
                        "distill_backbone": distill_name,
                        "eval_backbone": row["backbone"],
                        "mode": row["mode"],
                        "top1 mean": row["top1 mean"],
                        "top1 std": row["top1 std"],
                        "seeds": row["seeds"],
                    }
                )
    return rows, full


def _anchor(dataset: str, ipc: int, mode: str, row: str, backbone: str) -> float | None:
    pub = _published()
    table = pub["same_backbone"].get(dataset)
    if ipc != 1 or mode not in ("probe", "classifier") or table is None or row not in table:
        return None
    names = pub["backbones"]
    return table[row][names.index(backbone)] if backbone in names else None


def _std(row: dict) -> float | None:
    """A row's std over seeds, None for a single seed (its cell shows the mean alone)."""
    return row["top1 std"] if row.get("seeds", 2) > 1 else None


def _cell(mean: float, std: float | None, anchor: float | None) -> str:
    text = mean_std(mean, std)
    return text + (f" ({anchor:.1f})" if anchor is not None else "")


def _table(corner: str, columns: list[str], body: list[tuple[str, list[str], list[float]]]) -> str:
    """Markdown rows ``title | cells | Avg`` (the average only where every column has a value)."""
    lines = [f"| {corner} | " + " | ".join(columns) + " | Avg |", "|---" * (len(columns) + 2) + "|"]
    for title, cells, means in body:
        avg = f"{statistics.fmean(means):.1f}" if means and len(means) == len(columns) else ""
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def _same_table(index: dict, full: dict, backbones: list[str], dataset: str, ipc: int, mode: str) -> str:
    body = []
    for key, title in ROWS.items():
        cells, means = [], []
        for b in backbones:
            r = full.get(b) if key == "full" else index.get((key, b, b, mode))
            value = None if r is None else (r["top1"], None) if key == "full" else (r["top1 mean"], _std(r))
            cells.append("" if value is None else _cell(*value, _anchor(dataset, ipc, mode, key, b)))
            means += [] if value is None else [value[0]]
        if any(cells):
            body.append((title, cells, means))
    return _table("train set", backbones, body)


def _cross_table(
    index: dict, distillers: list[str], evals: list[str], dataset: str, ipc: int, method: str, mode: str
) -> str | None:
    pub = _published()
    anchors = pub["cross_backbone_lgm"].get(dataset) if method == "lgm" and mode == "probe" and ipc == 1 else None
    body = []
    for d in distillers:
        cells, means = [], []
        for e in evals:
            r = index.get((method, d, e, mode))
            anchor = None
            if anchors and d in pub["backbones"] and e in pub["backbones"]:
                anchor = anchors[pub["backbones"].index(d)][pub["backbones"].index(e)]
            cells.append("" if r is None else _cell(r["top1 mean"], _std(r), anchor))
            means += [] if r is None else [r["top1 mean"]]
        if means or ENSEMBLE_SEP not in d:  # an ensemble's row only where it has results (SFM)
            body.append((d, cells, means))
    return _table("distill \\ eval", evals, body) if any(means for _, _, means in body) else None


def write_tables(grid: GridConfig, dataset: str, ipc: int) -> Path:
    """``results_ipc<k>.md``/``.csv``/``.json`` of one dataset and IPC from the finished eval cells."""
    rows, full = _collect(grid, dataset, ipc)
    index = {(r["set"], r["distill_backbone"], r["eval_backbone"], r["mode"]): r for r in rows}
    backbones = [resolve_name(b)[0] for b in grid.backbones]
    distillers = [canonical(d) for d in grid.distillers()]  # the ensembles' rows: SFM's cross table
    evals = list(dict.fromkeys(r["eval_backbone"] for r in rows)) or backbones
    parts = [
        f"# {dataset}, IPC = {ipc}\n",
        "Top-1 accuracy (%), mean ± std over seeds; in parentheses the LGM paper's published number where "
        "the cell matches (its Tables 1/2: ImageNet-100/1k, IPC = 1, probe; its Neighbors are of LGM's images).\n",
        f"\n{FULL_DATA_NOTE}\n\n{CLIP_NOTE}\n",
    ]
    for mode in grid.eval.mode:
        parts += [f"\n## Same backbone, {mode}\n", _same_table(index, full, backbones, dataset, ipc, mode)]
        for method in DISTILLED:
            table = _cross_table(index, distillers, evals, dataset, ipc, method, mode)
            if table:
                parts += [f"\n## Cross-backbone, {method.upper()}, {mode} (rows: distillation backbone)\n", table]
    base = dataset_folder(grid, dataset)
    md = base / f"results_ipc{ipc}.md"
    atomic_write_text(md, "\n".join(parts) + "\n")
    with open(base / f"results_ipc{ipc}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["dataset"])
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_json(base / f"results_ipc{ipc}.json", {"rows": rows, "full_data": full})
    return md
