"""Evaluation of small training sets (synthetic or real baselines) on the real test split.

One orchestration for the CLI, the demo and the grid runner: :class:`Evaluator` evaluates
one image set with one (distillation backbone, evaluation backbone) pair in the modes of an
:class:`fastsfm.config.EvalConfig` -- ``probe``, ``inherit``, ``kd`` (:mod:`fastsfm.evaluate.inherit`)
-- and :func:`compare` runs image sets x seeds through one or more evaluators into rows of
mean ± std; :func:`format_markdown` and :func:`write_results` present them.

The statistics and the real-data classifier always belong to the *distillation* backbone
(checked); the evaluation backbone may be any other (cross-backbone inheritance).  Test
features are encoded once per evaluation backbone and shared by every evaluator built on
the same :class:`FeatureCache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..config import EvalConfig, Precision
from ..data.augment import BatchAugment
from ..data.images import labels_of
from ..distributed import all_gather, rank_world
from ..models.backbones import Backbone, encode_sharded
from ..models.classifier import new_head
from ..signals import StopSignals
from ..stats import ClassStats
from .feature_store import stored_features
from .inherit import InheritedClassifier, kd_loss
from .probe import Head, HeadCheckpoint, topk_accuracy, train_heads

__all__ = [
    "ImageSet",
    "Score",
    "FeatureCache",
    "Evaluator",
    "compare",
    "summarise",
    "format_markdown",
    "write_results",
    "load_image_set",
    "mean_std",
    "EvalJournal",
    "SetSource",
]


@dataclass
class ImageSet:
    """A small training set: images (N, 3, R, R) in [0, 1] and labels (N,)."""

    name: str
    images: Tensor
    labels: Tensor


@dataclass
class Score:
    """One evaluation: top-1/top-5 accuracy (%) of ``set`` in ``mode`` with ``backbone`` for ``seed``."""

    set: str
    mode: str
    backbone: str
    seed: int
    top1: float
    top5: float | None


@dataclass
class FeatureCache:
    """Test-split features per backbone identity (encoded once, shared by evaluators; ``workers``
    decode images in parallel), under ``precision`` (fp32 by default: the authors compute test
    features without autocast); with ``disk`` (a folder) also kept on disk for later calls
    (:func:`fastsfm.evaluate.feature_store.stored_features`; ``resolution`` is part of their key)."""

    test: Dataset
    device: str | torch.device = "cpu"
    workers: int | None = None
    precision: Precision = "fp32"
    features: dict[str, Tensor] = field(default_factory=dict)
    disk: Path | None = None
    resolution: int | None = None
    progress: bool = False

    def __call__(self, backbone: Backbone) -> Tensor:
        if backbone.identity not in self.features:

            def run() -> Tensor:
                with backbone.using_precision(self.precision):
                    return encode_sharded(
                        backbone, self.test, device=self.device, workers=self.workers, progress=self.progress
                    )

            self.features[backbone.identity] = stored_features(
                self.disk, self.test, "test", backbone, self.resolution, self.precision, run
            )
        return self.features[backbone.identity]

    @property
    def labels(self) -> Tensor:
        return labels_of(self.test)


class Evaluator:
    """Evaluates image sets with a distillation backbone (statistics, real classifier) and one or
    more evaluation backbones, each in every mode of ``config``.

    Args:
        distill_backbone: the backbone the statistics and real classifier belong to (checked).
        stats: its statistics (``classifier_weight``/``bias`` used by ``inherit`` and ``kd``).
        cache: the test split and its cached features.
        config: modes, epochs, seeds and learning rates (:class:`EvalConfig`).
        eval_backbones: the backbones whose features are classified (default: the distillation
            backbone).  All heads of one set and seed train on the same augmented views, and
            each backbone encodes each view once (the distillation backbone's features serve
            every evaluation backbone's inheritance and KD).  ``inherit_ce`` is evaluated for
            the distillation backbone only.
    """

    def __init__(
        self,
        distill_backbone: Backbone,
        stats: ClassStats,
        cache: FeatureCache,
        config: EvalConfig | None = None,
        eval_backbones: list[Backbone] | None = None,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ):
        stats.check_compatible(distill_backbone)
        test_max = int(cache.labels.max())
        if test_max >= stats.num_classes:
            raise ValueError(
                f"the test split has labels up to {test_max}, the statistics only {stats.num_classes} classes"
            )
        self.distill = distill_backbone
        self.evals = list(eval_backbones or [distill_backbone])
        if len({b.name for b in self.evals}) != len(self.evals):
            raise ValueError(f"evaluation backbones need distinct names, got {[b.name for b in self.evals]}")
        self.stats, self.cache, self.config = stats, cache, config or EvalConfig()
        self.device, self.progress = torch.device(device), progress

    def real_classifier(self) -> nn.Linear:
        head = nn.Linear(self.stats.feature_dim, self.stats.num_classes)
        with torch.no_grad():
            head.weight.copy_(self.stats.classifier_weight)
            head.bias.copy_(self.stats.classifier_bias)
        return head.to(self.device).requires_grad_(False)

    def full_data(self) -> Score:
        """The real-data classifier on the distillation backbone's test features (the "full data" row)."""
        with torch.no_grad():
            logits = self.real_classifier()(self.cache(self.distill).to(self.device))
        acc = topk_accuracy(logits, self.cache.labels)
        return Score("full data", "classifier", self.distill.name, 0, acc[1], acc[5])

    def _heads(self, backbone: Backbone, batch: int, seed: int) -> dict[str, Head]:
        """The heads of every mode on ``backbone``'s features (keys: mode)."""
        cfg, c, d = self.config, self.stats.num_classes, backbone.feature_dim
        own, distill, scale = backbone.identity, self.distill.identity, batch / 256
        heads: dict[str, Head] = {}
        if "probe" in cfg.mode:
            probe = new_head(d, c, seed)
            heads["probe"] = Head(probe, lambda f, y: F.cross_entropy(probe(f[own]), y), cfg.probe_lr * scale)
        if "inherit" in cfg.mode:
            inherited = InheritedClassifier(self.stats.classifier_weight, self.stats.classifier_bias, d, seed)
            heads["inherit"] = Head(
                inherited, lambda f, y: inherited.regression_loss(f[own], f[distill]), cfg.inherit_lr * scale
            )
        if "kd" in cfg.mode:
            student, teacher = new_head(d, c, seed), self.real_classifier()
            heads["kd"] = Head(
                student,
                lambda f, y: kd_loss(student(f[own]), teacher(f[distill]), y, cfg.temperature, cfg.kd_weight),
                cfg.probe_lr * scale,
            )
        if "inherit_ce" in cfg.mode and backbone is self.distill:  # identity start: the distillation backbone only
            ce = InheritedClassifier(self.stats.classifier_weight, self.stats.classifier_bias, d, seed, identity=True)
            heads["inherit_ce"] = Head(ce, lambda f, y: F.cross_entropy(ce(f[own]), y), cfg.probe_lr * scale)
        return heads

    def key(self, image_set: ImageSet, seed: int) -> str:
        """What identifies one evaluation of ``image_set`` for a journal: the set, the seed, the backbones,
        the statistics and the settings that change its scores -- not the number of seeds (seed ``k``'s
        result is the same among 3 or 5) nor the checkpoint cadence, so changing either redoes nothing."""
        settings = {k: v for k, v in asdict(self.config).items() if k not in KEY_NEUTRAL}
        parts = [image_set.name, seed, self.distill.identity, [b.identity for b in self.evals]]
        parts += [self.stats.meta.get("dataset", ""), settings]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def evaluate(self, image_set: ImageSet, seed: int, checkpoint: HeadCheckpoint | None = None) -> list[Score]:
        """Train each (evaluation backbone, mode) head on ``image_set`` (seeded); score it on the test split.
        ``checkpoint``: save and resume the heads' training (:class:`fastsfm.evaluate.probe.HeadCheckpoint`)."""
        labels = image_set.labels.long()
        if len(labels) == 0:
            raise ValueError(f"image set {image_set.name!r} is empty")
        if int(labels.min()) < 0 or int(labels.max()) >= self.stats.num_classes:
            raise ValueError(
                f"image set {image_set.name!r} has labels in [{int(labels.min())}, "
                f"{int(labels.max())}], the statistics {self.stats.num_classes} classes"
            )
        batch = min(self.config.batch, len(labels))
        heads = {(b.name, mode): head for b in self.evals for mode, head in self._heads(b, batch, seed).items()}
        backbones = {b.identity: b for b in self.evals}
        if any(mode in ("inherit", "kd") for _, mode in heads):
            backbones[self.distill.identity] = self.distill
        augment = BatchAugment(self.evals[0].input_size, noise_std=0.0)
        train_heads(
            heads,
            image_set.images,
            labels,
            backbones,
            augment,
            self.config.epochs,
            self.config.batch,
            seed,
            self.device,
            self.progress,
            checkpoint,
        )
        scores = []
        with torch.no_grad():
            for backbone in self.evals:
                test = self.cache(backbone).to(self.device)
                for mode in (m for m in self.config.mode if (backbone.name, m) in heads):
                    acc = topk_accuracy(heads[(backbone.name, mode)].module(test), self.cache.labels)
                    scores.append(Score(image_set.name, mode, backbone.name, seed, acc[1], acc[5]))
        return scores


def load_image_set(path: str | Path, stats: ClassStats, resolution: int) -> ImageSet:
    """A set to evaluate: an exported ``synset.safetensors`` (checked against the statistics'
    backbone -- one of the set's, for a set distilled with several -- and classes) or a run folder holding one, or a
    folder of images made by any method
    (``fastsfm export``'s, or any), one subfolder per class."""
    from ..data.images import image_set_folder
    from ..data.setfile import load_images

    path = Path(path)
    if path.is_dir() and (path / "synset.safetensors").is_file():
        path = path / "synset.safetensors"
    if path.is_dir():
        images, labels = image_set_folder(path, stats.class_names, resolution)
        return ImageSet(path.name, images, labels)
    if not path.is_file():
        raise FileNotFoundError(f"image set {path} does not exist (a synset.safetensors file or a folder)")
    images, labels, meta = load_images(path)
    made_with = json.loads(meta["backbones"]) if "backbones" in meta else [meta.get("backbone")]
    stats_of = stats.meta.get("backbone")
    if made_with[0] and stats_of and stats_of not in made_with:
        named = f"backbone{'s' * (len(made_with) > 1)} {' + '.join(map(repr, made_with))}"
        raise ValueError(
            f"{path} was distilled with {named}, the statistics are of {stats_of!r}: pass the statistics of a "
            "distillation backbone, whose real classifier inheritance reuses (evaluate on any other backbone with "
            "--eval-backbone)"
        )
    if meta.get("num_classes") and int(meta["num_classes"]) != stats.num_classes:
        raise ValueError(f"{path} has {meta['num_classes']} classes, the statistics {stats.num_classes}")
    return ImageSet(path.parent.name if path.name == "synset.safetensors" else path.stem, images, labels)


SetSource = ImageSet | Callable[[int], ImageSet]
"""An image set, or a function of the seed returning one (random real images differ per seed)."""


KEY_NEUTRAL = ("seeds", "checkpoint_every")
"""Fields of :class:`fastsfm.config.EvalConfig` left out of a journal key (:meth:`Evaluator.key`)."""


class EvalJournal:
    """A folder that makes a long evaluation resumable: ``scores.jsonl`` (``scores.rank<r>.jsonl`` for
    rank r of a ``torch.distributed`` run) holds each finished (set, seed, evaluators) result as it is
    written, ``heads.safetensors`` (``heads.rank<r>...``) the training state of the one running
    (:class:`fastsfm.evaluate.probe.HeadCheckpoint`, every ``EvalConfig.checkpoint_every`` epochs).
    Every rank reads every ``scores*.jsonl``: a rerun on any number of ranks redoes no finished evaluation."""

    def __init__(self, folder: str | Path, rank: int = 0, world: int = 1):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        suffix = "" if world == 1 else f".rank{rank}"
        self.path = self.folder / f"scores{suffix}.jsonl"
        self.heads = self.folder / f"heads{suffix}.safetensors"
        self.done: dict[str, list[Score]] = {}
        for path in sorted(self.folder.glob("scores*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["key"]] = [Score(**s) for s in entry["scores"]]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that evaluation runs again

    def record(self, key: str, scores: list[Score]) -> None:
        self.done[key] = scores
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"key": key, "scores": [asdict(s) for s in scores]}) + "\n")
            fh.flush()

    def checkpoint(self, key: str, every: int, stop) -> HeadCheckpoint:
        return HeadCheckpoint(self.heads, key, every, stop)


def compare(
    evaluators: Evaluator | list[Evaluator],
    sets: Iterable[SetSource],
    seeds: int,
    full_data: bool = True,
    journal: str | Path | None = None,
) -> list[Score]:
    """Every set x seed through every evaluator (in its modes); plus the full-data score of each
    distillation backbone.  Sets given as functions are re-drawn per seed; each keeps its own name.

    ``journal``: a folder (:class:`EvalJournal`) where finished evaluations are recorded as they end
    and the running one is checkpointed; a rerun with the same folder skips the finished ones and
    continues the interrupted one exactly.  SIGTERM/SIGUSR1 (and a first Ctrl-C) then save the
    running evaluation at its next block of epochs and exit with ``128 + signal``.

    Under ``torch.distributed`` every rank calls it: the (seed, set, evaluator) evaluations are dealt
    round-robin over the ranks, each rank journals its own, and every rank returns all the scores in
    the single-process order (gathered over the control group; each evaluation is seeded by its seed
    alone, so the scores equal one process's).  At ImageNet-1k, IPC 50, 3 seeds x 2 evaluation
    backbones: 6 evaluations, 6 of 8 ranks busy.
    """
    evaluators = [evaluators] if isinstance(evaluators, Evaluator) else evaluators
    sets = list(sets)
    rank, world = rank_world()
    book = EvalJournal(journal, rank, world) if journal is not None else None
    items = [(seed, i, j) for seed in range(seeds) for i in range(len(sets)) for j in range(len(evaluators))]
    for evaluator in evaluators:  # the test features first, on every rank: their encoding is sharded
        for backbone in {b.identity: b for b in [*evaluator.evals] + [evaluator.distill] * full_data}.values():
            evaluator.cache(backbone)
    drawn: dict[tuple[int, int], ImageSet] = {}
    mine: dict[int, list[Score]] = {}
    with StopSignals() if book is not None else contextlib.nullcontext() as stop:
        for k, (seed, i, j) in enumerate(items):
            if k % world != rank:
                continue
            if (seed, i) not in drawn:
                drawn[(seed, i)] = sets[i](seed) if callable(sets[i]) else sets[i]
            evaluator, image_set = evaluators[j], drawn[(seed, i)]
            key = evaluator.key(image_set, seed)
            if book is not None and key in book.done:
                mine[k] = book.done[key]
                continue
            ckpt = book.checkpoint(key, evaluator.config.checkpoint_every, stop) if book else None
            mine[k] = evaluator.evaluate(image_set, seed, ckpt)
            if book is not None:
                book.record(key, mine[k])
    every = {k: v for part in all_gather(mine) for k, v in part.items()}
    scores = [score for k in range(len(items)) for score in every[k]]
    if full_data:
        seen = set()
        for evaluator in evaluators:
            if evaluator.distill.identity not in seen:
                seen.add(evaluator.distill.identity)
                scores.append(evaluator.full_data())
    return scores


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values)


def mean_std(mean: float, std: float | None, seeds: int = 2) -> str:
    """A table cell with one decimal: ``mean ± std`` over several seeds; ``mean`` alone for one seed
    (or no std), where "± 0.0" would read as zero variance."""
    return f"{mean:.1f}" if std is None or seeds < 2 else f"{mean:.1f} ± {std:.1f}"


def summarise(scores: list[Score]) -> list[dict]:
    """Mean and (population, as the authors' ``np.std``) standard deviation over seeds per
    (set, mode, backbone), in first-seen order."""
    groups: dict[tuple, list[Score]] = {}
    for s in scores:
        groups.setdefault((s.set, s.mode, s.backbone), []).append(s)
    rows = []
    for (name, mode, backbone), group in groups.items():
        row = {"set": name, "mode": mode, "backbone": backbone, "seeds": len(group)}
        row["top1 mean"], row["top1 std"] = _mean_std([s.top1 for s in group])
        if all(s.top5 is not None for s in group):
            row["top5 mean"], row["top5 std"] = _mean_std([s.top5 for s in group])
        rows.append(row)
    return rows


def format_markdown(rows: list[dict], metric: str = "top1") -> str:
    """A Markdown table: one row per set, one column per (mode, backbone), cells ``mean ± std``
    (``mean`` alone for a single seed)."""
    columns = list(dict.fromkeys((r["mode"], r["backbone"]) for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    cell = {(r["set"], r["mode"], r["backbone"]): r for r in rows}
    header = "| set | " + " | ".join(f"{m} ({b})" for m, b in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name in sets:
        values = []
        for mode, backbone in columns:
            r = cell.get((name, mode, backbone))
            values.append(
                ""
                if r is None or f"{metric} mean" not in r
                else mean_std(r[f"{metric} mean"], r[f"{metric} std"], r["seeds"])
            )
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_results(scores: list[Score], out_dir: str | Path, meta: dict | None = None) -> list[dict]:
    """Write ``results.json`` (rows, every score, ``meta``) and ``results.md`` (top-1, then top-5
    tables) into ``out_dir``."""
    rows = summarise(scores)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "scores": [asdict(s) for s in scores], "meta": meta or {}}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "results.md").write_text(
        f"Top-1 accuracy (%)\n\n{format_markdown(rows)}\n\nTop-5 accuracy (%)\n\n{format_markdown(rows, 'top5')}\n"
    )
    return rows
