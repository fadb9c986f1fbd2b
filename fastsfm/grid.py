"""``fastsfm reproduce CONFIG.toml``: the papers' benchmark grid in one resumable command.

A grid is datasets x distillation backbones x IPC x methods x evaluation backbones x modes x
seeds (:class:`GridConfig`, read from TOML; ``fastsfm/resources/configs`` ships the authors'
settings).  It runs as a list of **cells**, each writing one output and skipped when that
output exists, so an interrupted grid resumes where it stopped:

========== ============================================= ==========================================
cell       per                                           output (under ``out/<dataset>/<backbone>/``)
========== ============================================= ==========================================
stats      (dataset, backbone)                           ``stats.safetensors`` (centres + real classifier)
full       (dataset, backbone)                           ``full.json``: the real classifier's test accuracy
distill    (dataset, backbone, IPC, sfm|lgm)             ``ipc<k>/<method>/``: a run folder (resumed
                                                         from its checkpoint), done with ``synset.safetensors``
baseline   (dataset, backbone, IPC, random|centroid|     ``ipc<k>/<method>/indices.json``: the selected
           neighbors)                                    real images (random: one draw per seed)
eval       (dataset, backbone, IPC, set)                 ``ipc<k>/<set>/eval.json``: every evaluation
                                                         backbone x mode x seed
========== ============================================= ==========================================

At the end ``out/<dataset>/results_ipc<k>.{md,csv,json}`` hold the tables in the papers'
layout (rows: training sets, columns: backbones, mean ± std, the LGM paper's published
numbers beside ours where a cell matches) and the cross-backbone matrix (distillation
backbone x evaluation backbone).  ``--dry-run`` prints the plan with projected device hours
from step times and encoding throughput measured on this device.

Under ``torchrun`` statistics and SFM distillations shard over the ranks; rank 0 runs LGM,
baselines, evaluations and tables while the others wait.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from .backbones import Backbone, load_backbone, resolve_name
from .config import METHOD_VIEWS, ClassifierConfig, DistillConfig, EvalConfig, Precision, Preprocess
from .data import ImageData, labels_of, load_data, stack_images
from .distributed import rank_world

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["GridConfig", "load_grid", "validate_grid", "plan_grid", "run_grid", "Cell", "SHIPPED_CONFIGS"]

GridMethod = Literal["sfm", "lgm", "random", "centroid", "neighbors"]
DISTILLED = ("sfm", "lgm")
SHIPPED_CONFIGS = Path(__file__).parent / "resources" / "configs"
ROWS = {
    "sfm": "Distilled (SFM)",
    "lgm": "Distilled (LGM)",
    "neighbors": "Neighbors (of SFM)",
    "centroid": "Centroids",
    "random": "Random",
    "full": "Full dataset",
}


@dataclass
class GridConfig:
    """One grid; every field has a TOML key of the same name (sections: distill, eval, classifier).

    ``datasets``: ImageNet subset names (``imagenet-100``, ...; on ``root``), ``torchvision:<Class>``
    (on ``root``), ``folder:<dir>`` (``dir/train`` and ``dir/val`` ImageFolders) or ``digits``.
    ``methods``: ``sfm``, ``lgm`` (distilled) and the real baselines ``random``, ``centroid``,
    ``neighbors`` (the nearest reals of the SFM set).  ``eval_backbones``: ``"same"`` (each set
    with its distillation backbone), ``"all"`` (every backbone: the cross-backbone matrix) or a list.
    """

    out: str
    datasets: list[str]
    backbones: list[str]
    root: str | None = None
    ipc: list[int] = field(default_factory=lambda: [1])
    methods: list[GridMethod] = field(default_factory=lambda: ["sfm", "random", "centroid", "neighbors"])
    eval_backbones: str | list[str] = "all"
    full_data: bool = True
    resolution: int = 256
    views: dict[str, int] = field(default_factory=lambda: dict(METHOD_VIEWS))
    image_size: int | None = None
    random_init: bool = False
    weights: dict[str, str] = field(default_factory=dict)
    preprocess: Preprocess = "authors"
    precision: Precision = "auto"
    device: str = "auto"
    workers: int | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(mode=("probe", "inherit")))
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def eval_list(self, backbone: str) -> list[str]:
        if self.eval_backbones == "same":
            return [backbone]
        return list(self.backbones) if self.eval_backbones == "all" else list(self.eval_backbones)

    def resolved_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_SECTIONS = {"distill": DistillConfig, "eval": EvalConfig, "classifier": ClassifierConfig}


def _section(name: str, values: dict):
    cls = _SECTIONS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"[{name}]: unknown keys {unknown}; known: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


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
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from err
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(GridConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    missing = [k for k in ("out", "datasets", "backbones") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    for name in _SECTIONS:
        if name in raw:
            raw[name] = _section(name, raw[name])
    return GridConfig(**raw)


def _backbone_known(name: str) -> bool:
    import timm

    canonical, spec = resolve_name(name)
    return spec is not None or timm.is_model(canonical)


def _input_size(grid: GridConfig) -> int:
    """The backbones' input size (the centre crop of statistics and test images): the grid's
    ``image_size``, else the first backbone's (224 for the paper aliases)."""
    spec = resolve_name(grid.backbones[0])[1]
    return grid.image_size or (spec.size if spec else 224)


def _dataset_spec(grid: GridConfig, dataset: str) -> tuple[str, str | None]:
    """``(load_data spec, test spec)`` of a grid dataset entry."""
    from .imagenet import SUBSETS

    if dataset == "digits":
        return "digits", None
    if dataset.startswith("folder:"):
        root = Path(dataset.split(":", 1)[1])
        return str(root / "train"), str(root / "val")
    if dataset in SUBSETS or dataset.startswith("torchvision:"):
        if not grid.root:
            raise ValueError(f"dataset {dataset!r} needs `root` (the local copy; fastsfm never downloads)")
        return f"{dataset}:{grid.root}", None
    raise ValueError(
        f"unknown dataset {dataset!r}: an ImageNet subset ({', '.join(SUBSETS)}), "
        "torchvision:<Class>, folder:<dir> or digits"
    )


def validate_grid(grid: GridConfig) -> None:
    """Every check that needs no heavy work, so a bad config fails before anything runs."""
    from .imagenet import SUBSETS, check_imagenet_root

    allowed = typing.get_args(GridMethod)
    bad = [m for m in grid.methods if m not in allowed]
    if bad or not grid.methods:
        raise ValueError(f"unknown methods {bad}; known: {list(allowed)}")
    if "neighbors" in grid.methods and "sfm" not in grid.methods:
        raise ValueError("the 'neighbors' baseline selects the nearest reals of the SFM set: add 'sfm' to methods")
    if not grid.backbones or not grid.datasets or not grid.ipc or min(grid.ipc) < 1:
        raise ValueError("backbones, datasets and ipc (values >= 1) must be non-empty")
    named = list(grid.backbones) + ([] if isinstance(grid.eval_backbones, str) else list(grid.eval_backbones))
    if isinstance(grid.eval_backbones, str) and grid.eval_backbones not in ("same", "all"):
        raise ValueError(f"eval_backbones must be 'same', 'all' or a list, got {grid.eval_backbones!r}")
    unknown = [b for b in named if not _backbone_known(b)]
    if unknown:
        raise ValueError(
            f"unknown backbones {unknown}: use a fastsfm alias (fastsfm.backbones.ALIASES), an author "
            "name or a timm model name"
        )
    for name, path in grid.weights.items():
        if name not in named:
            raise ValueError(f"weights for {name!r}, which is not a backbone of the grid")
        if not Path(path).is_file():
            raise FileNotFoundError(f"weight file {path} for {name} does not exist")
    for dataset in grid.datasets:
        spec, test = _dataset_spec(grid, dataset)
        if dataset in SUBSETS:
            check_imagenet_root(grid.root, dataset)
        elif dataset.startswith("torchvision:"):
            if not Path(grid.root).exists():
                raise FileNotFoundError(f"root {grid.root} of {dataset} does not exist")
        elif test is not None:
            for folder in (spec, test):
                if not Path(folder).is_dir():
                    raise FileNotFoundError(f"{folder} does not exist ({dataset} needs train/ and val/ folders)")


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


def _dataset_folder(grid: GridConfig, dataset: str) -> Path:
    return Path(grid.out) / dataset.replace(":", "_").replace("/", "_")


def _folder(grid: GridConfig, dataset: str, backbone: str) -> Path:
    return _dataset_folder(grid, dataset) / resolve_name(backbone)[0]


def plan_grid(grid: GridConfig) -> list[Cell]:
    """Every cell of the grid, in execution order."""
    cells = []
    for dataset in grid.datasets:
        for backbone in grid.backbones:
            base = _folder(grid, dataset, backbone)
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
    return cells


def _write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


class _Run:
    """State of one grid execution: loaded datasets and backbones, cached features."""

    def __init__(self, grid: GridConfig, progress: bool):
        self.grid, self.progress = grid, progress
        self.device = grid.resolved_device()
        self.rank, self.world = rank_world()
        self.backbones: dict[str, Backbone] = {}
        self.data: dict[str, ImageData] = {}
        self.train_features: dict[tuple[str, str], torch.Tensor] = {}
        self.caches: dict = {}

    def backbone(self, name: str) -> Backbone:
        if name not in self.backbones:
            g = self.grid
            pretrained = False if g.random_init else g.weights.get(name, True)
            self.backbones[name] = load_backbone(
                name, pretrained, g.image_size, device=self.device, preprocess=g.preprocess, precision=g.precision
            )
        return self.backbones[name]

    def dataset(self, dataset: str) -> ImageData:
        if dataset not in self.data:
            spec, test = _dataset_spec(self.grid, dataset)
            self.data[dataset] = load_data(spec, self.grid.resolution, _input_size(self.grid), test)
        return self.data[dataset]

    def cache(self, dataset: str):
        from .evaluate import FeatureCache

        if dataset not in self.caches:
            self.caches[dataset] = FeatureCache(self.dataset(dataset).test, self.device, self.grid.workers)
        return self.caches[dataset]

    def stats(self, cell: Cell):
        from .stats import ClassStats

        return ClassStats.load(_folder(self.grid, cell.dataset, cell.backbone) / "stats.safetensors")

    def features(self, dataset: str, backbone: str) -> torch.Tensor:
        """The backbone's features of the train split's centre crops (baseline selection)."""
        from .probe import encode

        key = (dataset, backbone)
        if key not in self.train_features:
            self.train_features[key] = encode(
                self.backbone(backbone),
                self.dataset(dataset).train_eval,
                device=self.device,
                workers=self.grid.workers,
                progress=self.progress,
            )
        return self.train_features[key]


def _run_stats(run: _Run, cell: Cell) -> None:
    from .stats import dataset_stats

    stats = dataset_stats(
        run.backbone(cell.backbone),
        run.dataset(cell.dataset),
        run.grid.classifier,
        run.device,
        workers=run.grid.workers,
        progress=run.progress,
    )
    if run.rank == 0:
        stats.save(cell.path)


def _run_distill(run: _Run, cell: Cell) -> None:
    from .distill import distill

    g = run.grid
    config = dataclasses.replace(
        g.distill,
        method=cell.name,
        ipc=cell.ipc,
        resolution=g.resolution,
        precision=g.precision,
        views=g.views[cell.name],
    )
    local = cell.name == "lgm"  # LGM cannot be sharded: rank 0 runs it alone
    if local and run.rank != 0:
        return
    folder = cell.path.parent
    resume = any(folder.glob("checkpoint*.safetensors"))
    distill(
        run.backbone(cell.backbone),
        run.stats(cell),
        config,
        folder,
        real=run.dataset(cell.dataset).train,
        resume=resume,
        device=run.device,
        progress=run.progress,
        local=local,
    )


def _run_baseline(run: _Run, cell: Cell) -> None:
    from .baselines.reals import centroid_reals, nearest_reals, random_reals
    from .synset import load_images

    data = run.dataset(cell.dataset)
    labels, c = labels_of(data.train), len(data.class_names)
    if cell.name == "random":
        picks = {str(s): random_reals(labels, c, cell.ipc, s).tolist() for s in range(run.grid.eval.seeds)}
    elif cell.name == "centroid":
        stats = run.stats(cell)
        picks = {
            "all": centroid_reals(run.features(cell.dataset, cell.backbone), labels, stats.means, cell.ipc).tolist()
        }
    else:
        images, syn_labels, _ = load_images(cell.path.parent.parent / "sfm" / "synset.safetensors")
        idx = nearest_reals(
            run.backbone(cell.backbone),
            images,
            syn_labels,
            run.features(cell.dataset, cell.backbone),
            labels,
            run.device,
        )
        picks = {"all": idx.tolist()}
    _write_json(cell.path, {"method": cell.name, "ipc": cell.ipc, "indices": picks})


def _image_source(run: _Run, cell: Cell):
    """The set a cell evaluates: a distilled ``ImageSet``, or a function of the seed for baselines."""
    from .evaluate import ImageSet
    from .synset import load_images

    folder = cell.path.parent
    if cell.name in DISTILLED:
        images, labels, _ = load_images(folder / "synset.safetensors")
        return ImageSet(cell.name, images, labels)
    picks = json.loads((folder / "indices.json").read_text())["indices"]
    data = run.dataset(cell.dataset)
    labels = labels_of(data.train)

    def chosen(seed: int) -> ImageSet:
        idx = torch.tensor(picks.get(str(seed), picks.get("all")))
        return ImageSet(cell.name, stack_images(data.train, idx), labels[idx])

    return chosen


def _run_eval(run: _Run, cell: Cell) -> None:
    from .evaluate import Evaluator, compare

    grid = run.grid
    evaluator = Evaluator(
        run.backbone(cell.backbone),
        run.stats(cell),
        run.cache(cell.dataset),
        grid.eval,
        [run.backbone(b) for b in grid.eval_list(cell.backbone)],
        run.device,
        run.progress,
    )
    scores = compare(evaluator, {cell.name: _image_source(run, cell)}, grid.eval.seeds, full_data=False)
    _write_json(
        cell.path,
        {
            "distill_backbone": resolve_name(cell.backbone)[0],
            "set": cell.name,
            "ipc": cell.ipc,
            "scores": [dataclasses.asdict(s) for s in scores],
        },
    )


def _run_full(run: _Run, cell: Cell) -> None:
    from .evaluate import Evaluator

    score = Evaluator(
        run.backbone(cell.backbone), run.stats(cell), run.cache(cell.dataset), run.grid.eval, device=run.device
    ).full_data()
    _write_json(cell.path, dataclasses.asdict(score))


_RUNNERS = {
    "stats": _run_stats,
    "distill": _run_distill,
    "baseline": _run_baseline,
    "eval": _run_eval,
    "full": _run_full,
}
_ALL_RANKS = ("stats",)  # sharded over ranks; SFM distillations too (see _run_distill)


def _barrier(run: _Run) -> None:
    if run.world > 1:
        dist.barrier()


def run_grid(grid: GridConfig, dry_run: bool = False, progress: bool = True) -> list[Cell]:
    """Validate, print the plan, then run every cell not yet done (or, ``dry_run``, project its
    device hours instead); finally write the tables.  Returns the plan."""
    validate_grid(grid)
    cells = plan_grid(grid)
    run = _Run(grid, progress)
    if dry_run:
        if run.rank == 0:
            print_projection(run, cells)
        return cells
    if run.rank == 0:
        todo = [c for c in cells if not c.done()]
        print(f"grid {grid.out}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run", flush=True)
        _write_json(Path(grid.out) / "grid.json", dataclasses.asdict(grid))
    for cell in cells:
        if cell.done():
            continue
        everyone = cell.kind in _ALL_RANKS or (cell.kind == "distill" and cell.name == "sfm")
        if everyone or cell.kind == "distill" or run.rank == 0:
            if run.rank == 0:
                print(f"[{time.strftime('%H:%M:%S')}] {cell.label()}", flush=True)
            _RUNNERS[cell.kind](run, cell)
        _barrier(run)
    if run.rank == 0:
        for dataset in grid.datasets:
            for ipc in grid.ipc:
                write_tables(grid, dataset, ipc)
    return cells


# --- tables -----------------------------------------------------------------------------------


def _published() -> dict:
    return json.loads((Path(__file__).parent / "resources" / "published.json").read_text())


def _collect(grid: GridConfig, dataset: str, ipc: int) -> tuple[list[dict], dict[str, dict]]:
    """Long rows (one per set x distillation backbone x evaluation backbone x mode) and the full-data scores."""
    rows, full = [], {}
    for backbone in grid.backbones:
        base = _folder(grid, dataset, backbone)
        if (base / "full.json").exists():
            full[resolve_name(backbone)[0]] = json.loads((base / "full.json").read_text())
        for method in grid.methods:
            path = base / f"ipc{ipc}" / method / "eval.json"
            if not path.exists():
                continue
            groups: dict[tuple, list] = {}
            for s in json.loads(path.read_text())["scores"]:
                groups.setdefault((s["backbone"], s["mode"]), []).append(s["top1"])
            for (eval_bb, mode), values in groups.items():
                rows.append(
                    {
                        "dataset": dataset,
                        "ipc": ipc,
                        "set": method,
                        "distill_backbone": resolve_name(backbone)[0],
                        "eval_backbone": eval_bb,
                        "mode": mode,
                        "top1 mean": statistics.fmean(values),
                        "top1 std": statistics.pstdev(values),
                        "seeds": len(values),
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


def _cell(mean: float, std: float | None, anchor: float | None) -> str:
    text = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
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
            value = None if r is None else (r["top1"], None) if key == "full" else (r["top1 mean"], r["top1 std"])
            cells.append("" if value is None else _cell(*value, _anchor(dataset, ipc, mode, key, b)))
            means += [] if value is None else [value[0]]
        if any(cells):
            body.append((title, cells, means))
    return _table("train set", backbones, body)


def _cross_table(
    index: dict, backbones: list[str], evals: list[str], dataset: str, ipc: int, method: str, mode: str
) -> str | None:
    pub = _published()
    anchors = pub["cross_backbone_lgm"].get(dataset) if method == "lgm" and mode == "probe" and ipc == 1 else None
    body = []
    for d in backbones:
        cells, means = [], []
        for e in evals:
            r = index.get((method, d, e, mode))
            anchor = None
            if anchors and d in pub["backbones"] and e in pub["backbones"]:
                anchor = anchors[pub["backbones"].index(d)][pub["backbones"].index(e)]
            cells.append("" if r is None else _cell(r["top1 mean"], r["top1 std"], anchor))
            means += [] if r is None else [r["top1 mean"]]
        body.append((d, cells, means))
    return _table("distill \\ eval", evals, body) if any(means for _, _, means in body) else None


def write_tables(grid: GridConfig, dataset: str, ipc: int) -> Path:
    """``results_ipc<k>.md``/``.csv``/``.json`` of one dataset and IPC from the finished eval cells."""
    import csv

    rows, full = _collect(grid, dataset, ipc)
    index = {(r["set"], r["distill_backbone"], r["eval_backbone"], r["mode"]): r for r in rows}
    backbones = [resolve_name(b)[0] for b in grid.backbones]
    evals = list(dict.fromkeys(r["eval_backbone"] for r in rows)) or backbones
    parts = [
        f"# {dataset}, IPC = {ipc}\n",
        "Top-1 accuracy (%), mean ± std over seeds; in parentheses the LGM "
        "paper's published number where the cell matches (its Table 1/2: ImageNet-100/1k, IPC = 1, probe; its "
        "Neighbors are of LGM's images).\n",
    ]
    for mode in grid.eval.mode:
        parts += [f"\n## Same backbone, {mode}\n", _same_table(index, full, backbones, dataset, ipc, mode)]
        for method in DISTILLED:
            table = _cross_table(index, backbones, evals, dataset, ipc, method, mode)
            if table:
                parts += [f"\n## Cross-backbone, {method.upper()}, {mode} (rows: distillation backbone)\n", table]
    base = _dataset_folder(grid, dataset)
    base.mkdir(parents=True, exist_ok=True)
    md = base / f"results_ipc{ipc}.md"
    md.write_text("\n".join(parts) + "\n")
    with open(base / f"results_ipc{ipc}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["dataset"])
        writer.writeheader()
        writer.writerows(rows)
    _write_json(base / f"results_ipc{ipc}.json", {"rows": rows, "full_data": full})
    return md


# --- dry run ----------------------------------------------------------------------------------


def _throughput(backbone: Backbone, device: torch.device, batch: int = 64) -> float:
    """Images per second of a no-grad forward at the backbone's input size."""
    x = torch.rand(batch, 3, backbone.input_size, backbone.input_size, device=device)
    with torch.no_grad():
        backbone(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        backbone(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch / (time.perf_counter() - began)


def _step_seconds(
    grid: GridConfig, backbone: Backbone, method: str, classes: int, ipc: int, device: torch.device
) -> float:
    """Measured seconds of one distillation step (random statistics and set, all pyramid levels)."""
    from .benchmark import distill_setup, time_steps

    config = dataclasses.replace(
        grid.distill,
        method=method,
        ipc=ipc,
        resolution=grid.resolution,
        precision=grid.precision,
        views=grid.views[method],
    )
    synset, optim, objective = distill_setup(backbone, config, classes, device)
    return time_steps(objective, synset, optim, 1, device)


def print_projection(run: _Run, cells: list[Cell]) -> float:
    """Print the plan with projected device hours per cell; return the total of the cells to run."""
    grid, device = run.grid, run.device
    speed, steps, total = {}, {}, 0.0
    random_init: dict[str, Backbone] = {}

    def backbone(name: str) -> Backbone:  # time and memory do not depend on the weights
        if name not in random_init:
            random_init[name] = load_backbone(
                name, False, grid.image_size, device=device, preprocess=grid.preprocess, precision=grid.precision
            )
        return random_init[name]

    print(
        f"plan of {grid.out} on {device}: projections from step times and forward throughput measured now "
        f"(random weights; precision {grid.precision})"
    )
    print("| cell | status | projected h |\n|---|---|---|")
    for cell in cells:
        bb = backbone(cell.backbone)
        data = run.dataset(cell.dataset)
        if bb.identity not in speed:
            speed[bb.identity] = _throughput(bb, device)
        classes, n_train = len(data.class_names), len(data.train)
        evals = [backbone(b) for b in grid.eval_list(cell.backbone)]
        if cell.kind == "stats" or (cell.kind == "baseline" and cell.name != "random"):
            hours = n_train / speed[bb.identity] / 3600
        elif cell.kind == "distill":
            key = (bb.identity, cell.name, classes, cell.ipc)
            if key not in steps:
                steps[key] = _step_seconds(grid, bb, cell.name, classes, cell.ipc, device)
            hours = steps[key] * grid.distill.steps / 3600
        elif cell.kind == "eval":
            views = grid.eval.seeds * grid.eval.epochs * classes * cell.ipc
            encoders = {b.identity: b for b in evals + ([bb] if set(grid.eval.mode) - {"probe"} else [])}
            for b in encoders.values():
                speed.setdefault(b.identity, _throughput(b, device))
            hours = views * sum(1 / speed[i] for i in encoders) / 3600
        else:
            hours = 0.0
        status = "done" if cell.done() else "to run"
        total += 0.0 if cell.done() else hours
        print(f"| {cell.label()} | {status} | {hours:.3g} |")
    print(f"\nprojected device hours of the cells to run: {total:.3g} on this device")
    return total
