"""The embedded default: the whole pipeline offline on CPU in about three minutes -- SFM beside LGM.

Data: scikit-learn's digits (shipped in its wheel), 32 px.  Backbones: ``digits_vit`` (a tiny
ViT) for distillation and ``digits_resnet`` (a tiny ResNet) for the cross-backbone columns, both
**pre-trained self-supervised, without labels** (SimCLR on the digits train split, with colour
augmentation so that, like natural-image backbones, they are not blind to colour) by
:mod:`fastsfm.models.pretrain` and shipped inside the package -- the setting SFM exists for.

Steps: statistics and the real-data classifier once; per seed, SFM and LGM distillations at the
same IPC with the same backbone, steps and pyramid (the paper's setting, shortened); one step of
each measured for time and peak memory; then the authors' evaluation (probe, classifier
inheritance, KD) of SFM, LGM, random reals, centroid reals (k-means reals beyond IPC 1) and the
real images nearest the SFM images, on both backbones.  Outputs: ``results.md``/``results.json``
(accuracy, and SFM vs LGM step time, peak memory and their ratios), ``comparison.png``, run folders.

The quick default (about three minutes on two CPU cores) evaluates in the paper's two main modes
(probe and classifier inheritance) with two seeds, LGM with one; ``--full`` in every mode with
three seeds for every set (about seven minutes).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..bench.benchmark import markdown_table
from ..bench.timing import distill_setup, run_step, step_seconds
from ..config import (
    BackboneConfig,
    ClassifierConfig,
    DistillConfig,
    EvalConfig,
    option,
    require,
    with_defaults,
)
from ..data.datasets import dataset_defaults, digits
from ..data.setfile import save_grid
from ..distill.loop import distill
from ..evaluate.baselines import baseline_sources
from ..evaluate.evaluator import (
    Evaluator,
    FeatureCache,
    ImageSet,
    compare,
    format_markdown,
    summarise,
    write_results,
)
from ..io import atomic_write_json
from ..memory import peak_bytes
from ..models.backbones import Backbone, encode, from_config
from ..stats import compute_stats

__all__ = ["DemoConfig", "run_demo", "DEMO_DISTILL", "DEMO_EVAL", "DEMO_CLASSIFIER", "DEMO_BACKBONES"]

log = logging.getLogger(__name__)

_DIGITS = dataset_defaults("digits")
DEMO_BACKBONES = (str(_DIGITS["backbone"]), "digits_resnet")
DEMO_DISTILL = with_defaults(DistillConfig, _DIGITS, ipc=1)
"""The paper's setting (noise init, pyramid from 1x1, colour decorrelation, one view for SFM and LGM's
ten) with the digits' own defaults (:data:`fastsfm.data.datasets.DATASET_DEFAULTS`: 32 px, fewer steps,
faster pyramid growth and a larger learning rate to fit a CPU minute, no loader processes), so that
``fastsfm stats/distill/eval --data digits`` run what the demo runs."""
DEMO_EVAL = EvalConfig(mode=("probe", "inherit", "kd", "inherit_ce"), seeds=3)
"""The authors' evaluation protocol unchanged (1000 epochs, batch min(100, N), their learning rates)."""
DEMO_CLASSIFIER = with_defaults(ClassifierConfig, _DIGITS)
"""The authors' classifier settings with the digits' 100 epochs (10 epochs of 1,257 digits are only 100 steps)."""


@dataclass
class DemoConfig:
    """What ``fastsfm demo`` runs (its flags are generated from these fields)."""

    out: str = option("runs/demo", "output folder")
    seeds: int | None = option(None, "evaluation seeds (default 2; with --full 3, as the authors' eval_syn)")
    steps: int = option(DEMO_DISTILL.steps, "distillation steps of SFM and LGM")
    ipc: int = option(DEMO_DISTILL.ipc, "synthetic images per class")
    eval_epochs: int = option(DEMO_EVAL.epochs, "evaluation epochs (the authors': 1000)")
    full: bool = option(
        False,
        "the complete table: every mode (probe, inherit, kd, inherit_ce) and 3 seeds for every set, LGM "
        "included (about 7 minutes); the quick default: probe and inherit, 2 seeds, LGM 1 (about 3 minutes)",
    )
    random_init: bool = option(False, "randomly initialised backbones instead of the shipped self-supervised ones")

    def __post_init__(self) -> None:
        require(self, at_least={"seeds": 1, "steps": 1, "ipc": 1, "eval_epochs": 1})


def _describe(backbone: Backbone) -> str:
    if backbone.weights.startswith("random-init"):
        return f"{backbone.name} (RANDOMLY INITIALISED)"
    return f"{backbone.name} (pre-trained self-supervised by fastsfm.models.pretrain, {backbone.weights})"


TIMED_STEPS = 7
"""Steps of each method timed after a warm-up step; the demo reports their median and range."""


def _efficiency(backbone: Backbone, config: DistillConfig, classes: int, device: torch.device) -> list[dict]:
    """Step time (median of :data:`TIMED_STEPS` steps, with their range) and peak memory of an SFM
    and an LGM step, the same backbone, set and pyramid."""
    rows = []
    for method in ("sfm", "lgm"):
        method_config = replace(config, method=method)
        synset, optim, objective = distill_setup(backbone, method_config, classes, device)
        ms = [1e3 * t for t in step_seconds(objective, synset, optim, TIMED_STEPS, device)]
        peak = peak_bytes(lambda o=objective, s=synset, a=optim: run_step(o, s, a, 99), device)
        rows.append(
            {
                "method": method.upper(),
                "views": method_config.effective_views,
                "step ms": statistics.median(ms),
                "step ms min": min(ms),
                "step ms max": max(ms),
                "timed_steps": len(ms),
                "peak MiB": peak / 2**20,
            }
        )
    sfm, lgm = rows
    ratio = {"step ms": lgm["step ms"] / sfm["step ms"], "peak MiB": lgm["peak MiB"] / sfm["peak MiB"]}
    return rows + [{"method": "LGM / SFM", **ratio}]


def run_demo(
    config: DemoConfig | None = None,
    *,
    distill_config: DistillConfig = DEMO_DISTILL,
    backbones: tuple[str, str] = DEMO_BACKBONES,
    weights: dict[str, str] | None = None,
    methods: tuple[str, ...] = ("sfm", "lgm"),
    progress: bool = True,
) -> dict:
    """Run the demo (progress logged); write results and pictures into ``config.out``; return
    ``{"rows": accuracy rows, "efficiency": SFM vs LGM rows, "report": the tables as text,
    "written": the result files}`` (the command line prints the report and the paths on stdout).
    ``distill_config``, ``backbones``, ``weights`` (name -> file) and ``methods`` let
    ``benches/demo_variants.py`` run the README's experiments."""
    config = config or DemoConfig()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    data = digits(32)
    weights = weights or {}
    options = BackboneConfig(random_init=config.random_init)
    backbone, cross = (from_config(options, device, n, weights.get(n)) for n in backbones)
    base = replace(distill_config, ipc=config.ipc, steps=config.steps)
    modes = DEMO_EVAL.mode if config.full else ("probe", "inherit")
    seeds = config.seeds or (DEMO_EVAL.seeds if config.full else 2)
    eval_config = replace(DEMO_EVAL, mode=modes, seeds=seeds, epochs=config.eval_epochs)
    log.info(
        "distillation backbone: %s\ncross-backbone evaluation: %s\ndata: %s, %d train / %d test images, %d classes",
        _describe(backbone),
        _describe(cross),
        data.name,
        len(data.train),
        len(data.test),
        data.num_classes,
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
    train_f = encode(backbone, data.train_eval.tensors[0])
    distilled: dict[tuple[str, int], ImageSet] = {}

    def distilled_set(method: str):
        def make(seed: int) -> ImageSet:
            if (method, seed) not in distilled:
                run = out / f"{method}-seed{seed}"
                synset = distill(
                    backbone,
                    stats,
                    replace(base, method=method, seed=seed),
                    run,
                    real=data.train,
                    progress=progress,
                    resume=(run / "checkpoint.safetensors").exists(),
                )
                distilled[(method, seed)] = ImageSet(method.upper(), synset.render(), synset.labels)
            return distilled[(method, seed)]

        return make

    sfm = distilled_set("sfm")
    selection = "centroid" if config.ipc == 1 else "kmeans"  # k-means reals are the centroid reals at IPC 1
    real_sets = baseline_sources(
        data, ["random", selection], config.ipc, seeds, lambda: train_f, stats.means, [], backbone, device
    )

    def neighbors(seed: int) -> ImageSet:
        sources = baseline_sources(
            data, ["neighbors"], config.ipc, 1, lambda: train_f, stats.means, [sfm(seed)], backbone
        )
        return sources[0]

    cache = FeatureCache(data.test)
    evaluator = Evaluator(backbone, stats, cache, eval_config, eval_backbones=[backbone, cross])
    scores = compare(evaluator, [sfm], eval_config.seeds, full_data=False)
    lgm_seeds = eval_config.seeds if config.full else 1
    if "lgm" in methods:
        scores += compare(evaluator, [distilled_set("lgm")], lgm_seeds, full_data=False)
    scores += compare(evaluator, [*real_sets, neighbors], eval_config.seeds)
    efficiency = _efficiency(backbone, base, data.num_classes, device) if "lgm" in methods else []
    rows = write_results(
        scores,
        out,
        {
            "distill_backbone": backbone.identity,
            "cross_backbone": cross.identity,
            "config": asdict(base),
            "eval": asdict(eval_config),
            "efficiency": efficiency,
        },
    )
    if efficiency:
        with open(out / "results.md", "a") as fh:
            fh.write(f"\nOne distillation step, SFM vs LGM (CPU)\n\n{markdown_table(efficiency)}\n")
    shown = [s(0) if callable(s) else s for s in (sfm, *real_sets[:2])] + (
        [distilled[("lgm", 0)]] if "lgm" in methods else []
    )
    size = data.train.tensors[0].shape[-1]  # one picture: every set at the data's resolution
    save_grid(
        torch.cat([torch.nn.functional.interpolate(s.images, size=(size, size), mode="area") for s in shown]),
        torch.arange(len(shown)).repeat_interleave(len(shown[0].labels)),
        [s.name for s in shown],
        out / "comparison.png",
        title="rows: image sets (seed 0); columns: digits 0-9",
    )
    report = (
        f"IPC={config.ipc}, {eval_config.seeds} seeds (LGM: {lgm_seeds}), top-1 accuracy % on {len(cache.labels)} "
        f"test digits (mean ± std over seeds); columns: evaluation mode (evaluation backbone)\n\n"
        f"{format_markdown(summarise(scores))}\n"
    )
    if efficiency:
        report += (
            f"\none distillation step, SFM vs LGM, same backbone and pyramid (median of {TIMED_STEPS} timed steps "
            f"after a warm-up; min and max beside it):\n\n{markdown_table(efficiency)}\n"
        )
    atomic_write_json(out / "efficiency.json", efficiency)
    written = [out / name for name in ("results.md", "results.json", "efficiency.json", "comparison.png")]
    return {"rows": rows, "efficiency": efficiency, "report": report, "written": written}
