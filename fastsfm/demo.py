"""The embedded default: the whole pipeline offline on CPU in a few minutes.

Data: scikit-learn's digits (shipped in its wheel), upsampled to 32 px.  Backbone: timm's
``vit_tiny_patch16_224`` at 32 px with a *seeded random initialisation* -- no pretrained
vision weights ship inside any package we may depend on, and the output says so.
Statistics once; per seed: SFM distillation (IPC=1 by default) initialised from that seed's random
real images -> evaluation of SFM, the same random real
images and the centroid-nearest real images, by a linear probe and by classifier inheritance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .backbones import load_backbone
from .baselines.reals import centroid_reals, random_reals
from .data import digits
from .distill import DistillConfig, distill
from .evaluate import Score, evaluate_images, summarise
from .probe import encode
from .stats import compute_stats
from .synset import save_grid

__all__ = ["run_demo", "DEMO_CONFIG"]

DEMO_CONFIG = DistillConfig(ipc=1, steps=200, lr=1e-2, resolution=32, param="pixels", init="real", checkpoint_every=50)
DEMO_BACKBONE = "vit_tiny_patch16_224"


def run_demo(
    out_dir: str | Path = "runs/demo",
    seeds: int = 3,
    steps: int | None = None,
    ipc: int = 1,
    probe_epochs: int = 300,
    probe_lr: float = 1e-2,
    progress: bool = True,
) -> list[dict]:
    """Run the demo, print and return the results table, write ``results.json`` and PNG grids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = digits(32)
    backbone = load_backbone(DEMO_BACKBONE, pretrained=False, image_size=32)
    print(
        f"backbone: {backbone.identity} -- RANDOMLY INITIALISED (no pretrained weights are available offline); "
        f"data: {data.name}, {len(data.train)} train / {len(data.test)} test images, {data.num_classes} classes"
    )
    stats = compute_stats(
        backbone, DataLoader(data.train, batch_size=256), data.class_names, data.name, progress=progress
    )
    stats.save(out / "stats.safetensors")
    train_x, train_y = data.train.tensors
    test_x, test_y = data.test.tensors
    test_f = encode(backbone, test_x)
    centroid = centroid_reals(encode(backbone, train_x), train_y, stats.means, ipc)
    base_cfg = replace(DEMO_CONFIG, ipc=ipc, steps=steps or DEMO_CONFIG.steps)
    scores: list[Score] = []
    for seed in range(seeds):
        reals = random_reals(train_y, data.num_classes, ipc, seed)
        sets = {
            "random real": (train_x[reals], train_y[reals]),
            "centroid real": (train_x[centroid], train_y[centroid]),
        }
        cfg = replace(base_cfg, seed=seed)
        run_dir = out / f"sfm-seed{seed}"
        synset = distill(
            backbone,
            stats,
            cfg,
            run_dir,
            real=data.train,
            progress=progress,
            resume=(run_dir / "checkpoint.safetensors").exists(),
        )
        sets["SFM"] = (synset.render(), synset.labels)
        for name, (x, y) in sets.items():
            scores.append(
                evaluate_images(backbone, x, y, test_f, test_y, stats, probe_epochs, seed, name, probe_lr=probe_lr)
            )
        if seed == 0:
            grid = torch.cat([sets[k][0] for k in sets])
            labels = torch.arange(len(sets)).repeat_interleave(data.num_classes * ipc)
            save_grid(grid, labels, list(sets), out / "comparison.png", title="rows: image sets; columns: digits 0-9")
    table = summarise(scores)
    print(
        f"\nIPC={ipc}, {seeds} seeds, {data.name}, backbone {backbone.identity} (random init), accuracy % on "
        f"{len(test_y)} test images"
    )
    print(f"{'method':<22}{'linear probe':>18}{'classifier inheritance':>26}")
    for row in table:
        inh = f"{row['inherit mean']:.1f} ± {row['inherit std']:.1f}" if "inherit mean" in row else "-"
        print(f"{row['method']:<22}{row['probe mean']:>11.1f} ± {row['probe std']:<4.1f}{inh:>26}")
    (out / "results.json").write_text(
        json.dumps(
            {
                "table": table,
                "scores": [asdict(s) for s in scores],
                "config": asdict(base_cfg),
                "backbone": backbone.identity,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out / 'results.json'}, {out / 'comparison.png'} and per-run synset.png grids")
    return table
