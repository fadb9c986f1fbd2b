"""The embedded default: the whole pipeline offline on CPU in about two minutes.

Data: scikit-learn's digits (shipped in its wheel), 32 px.  Backbones: ``digits_vit`` (a tiny
ViT) for distillation and ``digits_resnet`` (a tiny ResNet) for the cross-backbone row, both
**pre-trained self-supervised, without labels** (SimCLR on the digits train split) by
:mod:`fastsfm.pretrain` and shipped inside the package -- the setting SFM exists for.
``pretrained=False`` runs the same demo on randomly initialised backbones.

Steps: statistics and the real-data classifier once; per seed, SFM distillation at IPC = 1
from noise with the pyramid (the paper's setting, shortened), then the authors' evaluation
(probe, classifier inheritance, KD) of SFM, random reals, centroid reals, the nearest real
neighbours of the SFM images and the full-data classifier; the cross-backbone column
evaluates every set with ``digits_resnet`` through inheritance from ``digits_vit``'s
classifier.  Outputs: ``results.md``/``results.json``, ``comparison.png``, run folders.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .backbones import Backbone, load_backbone
from .baselines.reals import centroid_reals, nearest_reals, random_reals
from .config import ClassifierConfig, DistillConfig, EvalConfig
from .data import digits
from .distill import distill
from .evaluate import Evaluator, FeatureCache, ImageSet, compare, format_markdown, summarise, write_results
from .probe import encode
from .stats import compute_stats
from .synset import save_grid

__all__ = ["run_demo", "DEMO_CONFIG", "DEMO_EVAL", "DEMO_CLASSIFIER", "DEMO_BACKBONES"]

DEMO_BACKBONES = ("digits_vit", "digits_resnet")
DEMO_CONFIG = DistillConfig(ipc=1, steps=300, lr=2e-2, resolution=32, pyramid_extent=40, checkpoint_every=100)
"""The paper's setting (noise init, pyramid from 1x1, colour decorrelation, one view) at 32 px,
with fewer steps, faster pyramid growth and a larger learning rate to fit a CPU minute."""
DEMO_EVAL = EvalConfig(mode=("probe", "inherit", "kd", "inherit_ce"), seeds=3)
"""The authors' evaluation protocol unchanged (1000 epochs, batch min(100, N), their learning rates)."""
DEMO_CLASSIFIER = ClassifierConfig(classifier_epochs=100)
"""The authors' classifier settings, 100 epochs: 10 epochs of 1,257 digits are only 100 steps."""


def _describe(backbone: Backbone) -> str:
    if backbone.weights.startswith("random-init"):
        return f"{backbone.name} (RANDOMLY INITIALISED)"
    return f"{backbone.name} (pre-trained self-supervised by fastsfm.pretrain, {backbone.weights})"


def run_demo(
    out_dir: str | Path = "runs/demo",
    seeds: int = DEMO_EVAL.seeds,
    steps: int | None = None,
    ipc: int = 1,
    eval_epochs: int | None = None,
    pretrained: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Run the demo; print and return the table rows; write results and pictures into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = digits(32)
    backbone, cross = (load_backbone(name, pretrained=pretrained) for name in DEMO_BACKBONES)
    config = replace(DEMO_CONFIG, ipc=ipc, steps=steps or DEMO_CONFIG.steps)
    eval_config = replace(DEMO_EVAL, seeds=seeds, epochs=eval_epochs or DEMO_EVAL.epochs)
    print(
        f"distillation backbone: {_describe(backbone)}\ncross-backbone evaluation: {_describe(cross)}\n"
        f"data: {data.name}, {len(data.train)} train / {len(data.test)} test images, {data.num_classes} classes"
    )
    stats = compute_stats(
        backbone,
        DataLoader(data.train_eval, batch_size=256),
        data.class_names,
        data.name,
        classifier=DEMO_CLASSIFIER,
        progress=progress,
    )
    stats.save(out / "stats.safetensors")
    train_x, train_y = data.train.tensors
    train_f = encode(backbone, data.train_eval.tensors[0])
    centroids = centroid_reals(train_f, train_y, stats.means, ipc)
    distilled: dict[int, ImageSet] = {}

    def sfm(seed: int) -> ImageSet:
        if seed not in distilled:
            run = out / f"sfm-seed{seed}"
            synset = distill(
                backbone,
                stats,
                replace(config, seed=seed),
                run,
                progress=progress,
                resume=(run / "checkpoint.safetensors").exists(),
            )
            distilled[seed] = ImageSet("SFM", synset.render(), synset.labels)
        return distilled[seed]

    def neighbours(seed: int) -> ImageSet:
        syn = sfm(seed)
        idx = nearest_reals(backbone, syn.images, syn.labels, train_f, train_y)
        return ImageSet("nearest reals of SFM", train_x[idx], train_y[idx])

    sets = [
        sfm,
        lambda seed: ImageSet("random real", *data.train[random_reals(train_y, 10, ipc, seed)]),
        ImageSet("centroid real", train_x[centroids], train_y[centroids]),
        neighbours,
    ]
    cache = FeatureCache(data.test)
    evaluator = Evaluator(backbone, stats, cache, eval_config, eval_backbones=[backbone, cross])
    scores = compare(evaluator, sets, eval_config.seeds)
    rows = write_results(
        scores,
        out,
        {
            "distill_backbone": backbone.identity,
            "cross_backbone": cross.identity,
            "config": asdict(config),
            "eval": asdict(eval_config),
        },
    )
    shown = [
        sfm(0),
        ImageSet("", *data.train[random_reals(train_y, 10, ipc, 0)]),
        ImageSet("", train_x[centroids], train_y[centroids]),
        neighbours(0),
    ]
    grid = torch.cat([s.images for s in shown])
    save_grid(
        grid,
        torch.arange(len(shown)).repeat_interleave(len(shown[0].labels)),
        ["SFM", "random real", "centroid real", "nearest reals"],
        out / "comparison.png",
        title="rows: image sets (seed 0); columns: digits 0-9",
    )
    print(
        f"\nIPC={ipc}, {eval_config.seeds} seeds, top-1 accuracy % on {len(cache.labels)} test digits "
        f"(mean ± std); columns: evaluation mode (evaluation backbone)\n"
    )
    print(format_markdown(summarise(scores)))
    print(f"\nwrote {out / 'results.md'}, results.json, comparison.png and the sfm-seed* run folders")
    return rows
