"""What writing a distilled set as 8-bit PNGs (``fastsfm export``) does to its accuracy, on the demo.

    fastsfm demo                                   # makes runs/demo (about 3 minutes on 2 CPU cores)
    python benches/export_accuracy.py --demo runs/demo --seeds 2

For each demo run folder (``sfm-seed*``, ``lgm-seed*``) the set is evaluated twice with the demo's
protocol (probe and classifier inheritance on ``digits_vit`` and ``digits_resnet``, the authors'
settings): as distilled (float32 ``synset.safetensors``) and as exported (an image folder of
8-bit PNGs read back, as ``fastsfm eval --synset DIR`` does).  Prints one table (top-1 %, mean over
the runs and seeds) and writes ``benches/out/export_accuracy.md``/``.json``; never touches tracked files.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from fastsfm.bench.benchmark import environment
from fastsfm.cli.demo import DEMO_BACKBONES, DEMO_EVAL
from fastsfm.config import BackboneConfig
from fastsfm.data.datasets import digits
from fastsfm.evaluate.evaluator import (
    Evaluator,
    FeatureCache,
    ImageSet,
    compare,
    format_markdown,
    load_image_set,
    summarise,
)
from fastsfm.evaluate.export import export_image_folder
from fastsfm.models.backbones import from_config
from fastsfm.stats import ClassStats


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="output folder of `fastsfm demo`")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=DEMO_EVAL.epochs)
    parser.add_argument("--out", type=Path, default=Path("benches/out"))
    args = parser.parse_args(argv)
    import torch

    print(environment(torch.device("cpu")))
    stats = ClassStats.load(args.demo / "stats.safetensors")
    runs = sorted(p for p in args.demo.glob("*-seed*") if (p / "synset.safetensors").exists())
    if not runs:
        raise SystemExit(f"no run folders with a synset.safetensors under {args.demo}: run `fastsfm demo` first")
    data = digits(32)
    backbone, cross = (from_config(BackboneConfig(), "cpu", name) for name in DEMO_BACKBONES)
    config = replace(DEMO_EVAL, mode=("probe", "inherit"), seeds=args.seeds, epochs=args.epochs)
    evaluator = Evaluator(backbone, stats, FeatureCache(data.test), config, eval_backbones=[backbone, cross])
    sets = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            method = run.name.split("-")[0].upper()
            exact = load_image_set(run / "synset.safetensors", stats, 32)
            folder = export_image_folder(run, Path(tmp) / run.name, stats.class_names)
            png = load_image_set(folder, stats, 32)
            sets += [ImageSet(f"{method} float32", exact.images, exact.labels)]
            sets += [ImageSet(f"{method} 8-bit PNG", png.images, png.labels)]
        rows = summarise(compare(evaluator, sets, args.seeds, full_data=False))
    table = format_markdown(rows)
    print(f"\n{len(runs)} runs x {args.seeds} seeds, top-1 % (mean ± std over runs and seeds)\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_accuracy.md").write_text(table + "\n")
    (args.out / "export_accuracy.json").write_text(json.dumps(rows, indent=1))
    print(f"runs: {', '.join(r.name for r in runs)}")
    return rows


if __name__ == "__main__":
    main()
