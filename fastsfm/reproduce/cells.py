"""The grid's cell runners and the state they share (loaded datasets, backbones, cached features)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..data.images import ImageData, labels_of
from ..data.setfile import load_images
from ..distributed import rank_world
from ..evaluate.baselines import Selection, select
from ..evaluate.evaluator import Evaluator, FeatureCache, ImageSet, compare
from ..io import atomic_write_json, read_safetensors
from ..models.backbones import Backbone, from_config
from ..stats import ClassStats, dataset_stats_many
from .config import GridConfig, input_size, members
from .plan import DISTILLED, Cell, backbone_folder, canonical

__all__ = ["Run", "RUNNERS", "FEATURES", "stats_path", "pending_stats"]

FEATURES = "train_features.safetensors"


class Run:
    """State of one grid execution: loaded datasets and backbones, cached features."""

    def __init__(self, grid: GridConfig, progress: bool):
        self.grid, self.progress = grid, progress
        self.device = grid.resolved_device()
        self.rank, self.world = rank_world()
        self.backbones: dict[str, Backbone] = {}
        self.data: dict[str, ImageData] = {}
        self.train_features: dict[tuple[str, str], torch.Tensor] = {}
        self.caches: dict[str, FeatureCache] = {}

    def backbone(self, name: str) -> Backbone:
        if name not in self.backbones:
            self.backbones[name] = from_config(self.grid.backbone, self.device, name, self.grid.weights.get(name))
        return self.backbones[name]

    def dataset(self, dataset: str) -> ImageData:
        if dataset not in self.data:
            spec = self.grid.dataset(dataset)
            self.data[dataset] = spec.load(self.grid.resolution, input_size(self.grid))
        return self.data[dataset]

    def cache(self, dataset: str) -> FeatureCache:
        if dataset not in self.caches:
            test = self.dataset(dataset).test
            self.caches[dataset] = FeatureCache(test, self.device, self.grid.workers, self.grid.backbone.real_precision)
        return self.caches[dataset]

    def stats(self, cell: Cell) -> ClassStats:
        """The statistics of the cell's backbone (an ensemble's: its first member's, for inheritance)."""
        return self.member_stats(cell.dataset, members(cell.backbone)[0])

    def member_stats(self, dataset: str, backbone: str) -> ClassStats:
        return ClassStats.load(stats_path(self.grid, dataset, backbone))

    def features(self, dataset: str, backbone: str) -> torch.Tensor:
        """The backbone's features of the train split's statistics view: those the statistics cell
        wrote (no image is decoded again), else encoded now (grids started before that file existed)."""
        from ..models.backbones import encode

        key = (dataset, backbone)
        if key not in self.train_features:
            saved = backbone_folder(self.grid, dataset, backbone) / FEATURES
            if saved.exists():
                self.train_features[key] = read_safetensors(saved)[0]["features"].float()
            else:
                with self.backbone(backbone).using_precision(self.grid.backbone.real_precision):
                    self.train_features[key] = encode(
                        self.backbone(backbone),
                        self.dataset(dataset).train_eval,
                        device=self.device,
                        workers=self.grid.workers,
                        progress=self.progress,
                    )
        return self.train_features[key]


def stats_path(grid: GridConfig, dataset: str, backbone: str) -> Path:
    return backbone_folder(grid, dataset, backbone) / "stats.safetensors"


def pending_stats(grid: GridConfig, dataset: str) -> list[str]:
    """The backbones of the grid still without statistics of ``dataset``: one pass computes them all."""
    return [b for b in grid.backbones if not stats_path(grid, dataset, b).exists()]


def run_stats(run: Run, cell: Cell) -> None:
    """The statistics of every backbone without them (this cell's included) in one pass over the images."""
    names = pending_stats(run.grid, cell.dataset)
    paths = [stats_path(run.grid, cell.dataset, b) for b in names]
    all_stats = dataset_stats_many(
        [run.backbone(b) for b in names],
        run.dataset(cell.dataset),
        run.grid.classifier,
        run.device,
        workers=run.grid.workers,
        progress=run.progress,
        precision=run.grid.backbone.real_precision,
        features_path=[p.with_name(FEATURES) for p in paths],
    )
    if run.rank == 0:
        for stats, path in zip(all_stats, paths, strict=True):
            stats.save(path)


def run_distill(run: Run, cell: Cell) -> None:
    from ..distill.loop import distill

    folder = cell.path.parent
    names = members(cell.backbone)
    distill(
        [run.backbone(b) for b in names],
        [run.member_stats(cell.dataset, b) for b in names],
        run.grid.distill_config(cell.name, cell.ipc, len(names)),
        folder,
        real=run.dataset(cell.dataset).train,
        resume=any(folder.glob("checkpoint*.safetensors")),
        device=run.device,
        progress=run.progress,
    )


def run_baseline(run: Run, cell: Cell) -> None:
    data = run.dataset(cell.dataset)
    synthetic = None
    if cell.name == "neighbors":
        images, labels, _ = load_images(cell.path.parent.parent / "sfm" / "synset.safetensors")
        synthetic = ImageSet("SFM", images, labels)
    chosen = select(
        cell.name,
        labels_of(data.train),
        data.num_classes,
        cell.ipc,
        seeds=run.grid.eval.seeds,
        features=None if cell.name == "random" else run.features(cell.dataset, cell.backbone),
        means=run.stats(cell).means,
        synthetic=synthetic,
        backbone=run.backbone(cell.backbone),
        device=run.device,
    )
    if run.rank == 0:
        chosen.save(cell.path)


def _source(run: Run, cell: Cell):
    """The set a cell evaluates: a distilled ``ImageSet``, or a baseline's (a function of the seed for random)."""
    folder = cell.path.parent
    if cell.name in DISTILLED:
        images, labels, _ = load_images(folder / "synset.safetensors")
        return ImageSet(cell.name, images, labels)
    return Selection.load(folder / "indices.json").source(run.dataset(cell.dataset))


def run_eval(run: Run, cell: Cell) -> None:
    grid = run.grid
    evaluator = Evaluator(
        run.backbone(members(cell.backbone)[0]),  # an ensemble: its first member's classifier is inherited
        run.stats(cell),
        run.cache(cell.dataset),
        grid.eval,
        [run.backbone(b) for b in grid.eval_list(cell.backbone)],
        run.device,
        run.progress,
    )
    scores = compare(
        evaluator, [_source(run, cell)], grid.eval.seeds, full_data=False, journal=cell.path.parent / "eval"
    )
    payload = {
        "distill_backbone": canonical(cell.backbone),
        "set": cell.name,
        "ipc": cell.ipc,
        "scores": [dataclasses.asdict(s) for s in scores],
    }
    if run.rank == 0:
        atomic_write_json(cell.path, payload)


def run_full(run: Run, cell: Cell) -> None:
    score = Evaluator(
        run.backbone(cell.backbone), run.stats(cell), run.cache(cell.dataset), run.grid.eval, device=run.device
    ).full_data()
    if run.rank == 0:
        atomic_write_json(cell.path, dataclasses.asdict(score))


RUNNERS = {"stats": run_stats, "distill": run_distill, "baseline": run_baseline, "eval": run_eval, "full": run_full}
"""Every kind of cell, run by every rank (:func:`fastsfm.reproduce.run.run_grid`): the statistics pass's
images, a distillation's classes (LGM's real batches too), an evaluation's and a full-data cell's test
features and an evaluation's seeds, k-means' classes are shared among the ranks; the other selections
(random, centroid, neighbors: seconds from the statistics pass's features) every rank computes alike.
Rank 0 writes every cell's output."""
