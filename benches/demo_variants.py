"""Why are the demo's distilled digits colour patterns that transfer worse than real images?  The
experiments behind README's "A representative demo": the demo (SFM only) under variants of its setting.

Each variant runs :func:`fastsfm.cli.demo.run_demo` with ``--seeds`` seeds and reports SFM's top-1 on the
distillation backbone (same) and on the cross backbone (cross) in probe and inheritance modes, beside
the random and centroid real images of the same backbones:

* ``grey-pretrained backbones``: the earlier shipped weights, SimCLR without colour augmentation
  (``--grey-weights DIR``, made by ``fastsfm pretrain --no-colour --out DIR``);
* ``colour-pretrained backbones``: the shipped weights (SimCLR with colour augmentation);
* ``grey parameterisation``: one channel replicated to RGB (``channels="grey"``);
* ``4 views``: four augmented copies per step;
* ``1500 steps at lr 2e-3``: the authors' learning rate and pyramid extent (200), three times the steps;
* ``64 px``: synthetic images stored at 64 px (the backbones see 32 px crops);
* ``8x8 patches``: ``digits_vit8`` as the distillation backbone;
* ``Adam moments in bf16`` / ``8bit``: the compact optimiser states (``optimizer_state``), against the
  default's float32 moments.

``--pretrain-losses`` runs the contrastive-loss experiment instead: both demo backbones pre-trained
(``fastsfm pretrain``, ``--pretrain-epochs`` epochs, seed 0) with each loss of
:data:`fastsfm.config.PretrainLoss` -- SimCLR's NT-Xent and the three GCA losses -- then the demo's
SFM (``--seeds`` seeds) on each pair; rows as above plus each backbone's linear probe on all reals.

``--held-out`` runs the multi-backbone experiment instead: for each of the three shipped backbones
(``digits_vit``, ``digits_vit8``, ``digits_resnet``) held out, SFM distils the digits with each of the
other two alone and with both at once (:mod:`fastsfm.models.ensemble`), and every set is evaluated on the
held-out backbone (probe, and inheritance of the first distillation backbone's classifier), beside
random reals and the centroid reals of the first backbone, with ``--seeds`` seeds each.

    python benches/demo_variants.py --grey-weights /tmp/grey --seeds 2      # about 15 minutes on 2 CPU cores
    python benches/demo_variants.py --held-out --seeds 2                    # about 10 minutes
    python benches/demo_variants.py --pretrain-losses --seeds 2             # about 40 minutes

Writes ``benches/out/demo_variants.md`` and ``.json`` (``held_out``, ``pretrain_losses``); never touches tracked files.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fastsfm.bench.benchmark import markdown_table
from fastsfm.cli.demo import DEMO_BACKBONES, DEMO_CLASSIFIER, DEMO_DISTILL, DEMO_EVAL, DemoConfig, run_demo
from fastsfm.config import BackboneConfig, PretrainLoss, SimCLRConfig, choices
from fastsfm.data.datasets import digits
from fastsfm.distill.loop import distill
from fastsfm.evaluate.baselines import baseline_sources
from fastsfm.evaluate.evaluator import Evaluator, FeatureCache, ImageSet, compare, mean_std, summarise
from fastsfm.models.backbones import encode, from_config
from fastsfm.models.pretrain import pretrain_and_save
from fastsfm.stats import compute_stats_many

VARIANTS = {
    "colour-pretrained backbones (the default)": {},
    "grey parameterisation": {"distill": {"channels": "grey"}},
    "4 views per step": {"distill": {"views": 4}},
    "1500 steps at lr 2e-3, pyramid every 200": {"distill": {"steps": 1500, "lr": 2e-3, "pyramid_extent": 200}},
    "64 px synthetic images": {"distill": {"resolution": 64}},
    "8x8 patches (digits_vit8)": {"backbones": ("digits_vit8", "digits_resnet")},
    "Adam moments in bf16": {"distill": {"optimizer_state": "bf16"}},
    "Adam moments in 8bit": {"distill": {"optimizer_state": "8bit"}},
}


def _cell(rows: list[dict], name: str, mode: str, backbone: str) -> str:
    row = next((r for r in rows if r["set"] == name and r["mode"] == mode and r["backbone"] == backbone), None)
    return "" if row is None else f"{row['top1 mean']:.1f} ± {row['top1 std']:.1f}"


def table_rows(variant: str, rows: list[dict], backbones: tuple[str, str]) -> list[dict]:
    """SFM and the real baselines of one variant: same- and cross-backbone probe and inheritance."""
    out = []
    for name in ("SFM", "random reals (IPC=1)", "centroid reals (IPC=1)"):
        entry = {"variant": variant if name == "SFM" else "", "set": name}
        for label, backbone in (("same", backbones[0]), ("cross", backbones[1])):
            for mode in ("probe", "inherit"):
                entry[f"{mode} ({label})"] = _cell(rows, name, mode, backbone)
        out.append(entry)
    return out


HELD_OUT_BACKBONES = ("digits_vit", "digits_vit8", "digits_resnet")


def held_out(seeds: int, eval_epochs: int, out: Path, steps: int = DEMO_DISTILL.steps) -> list[dict]:
    """Rows of the held-out experiment (module docstring): per held-out backbone and set (the
    backbones SFM distilled it with, or a real baseline), its probe and inheritance top-1 on the
    held-out backbone (mean ± std over ``seeds``)."""
    cpu = torch.device("cpu")
    data = digits(32)
    backbones = {n: from_config(BackboneConfig(), cpu, n) for n in HELD_OUT_BACKBONES}
    loader = DataLoader(data.train_eval, batch_size=256)
    stats = dict(
        zip(
            backbones,
            compute_stats_many(
                list(backbones.values()), loader, data.class_names, data.name, DEMO_CLASSIFIER, progress=False
            ),
            strict=True,
        )
    )
    config = replace(DEMO_DISTILL, steps=steps)
    eval_config = replace(DEMO_EVAL, mode=("probe", "inherit"), seeds=seeds, epochs=eval_epochs)
    cache = FeatureCache(data.test)

    def sfm(names: tuple[str, ...]):
        def make(seed: int) -> ImageSet:
            run = out / "held_out" / f"{'+'.join(names)}-seed{seed}"
            synset = distill(
                [backbones[n] for n in names],
                [stats[n] for n in names],
                replace(config, seed=seed),
                run,
                progress=False,
                resume=(run / "checkpoint.safetensors").exists(),
            )
            return ImageSet(f"SFM {' + '.join(names)}", synset.render(), synset.labels)

        return make

    rows = []
    for held in HELD_OUT_BACKBONES:
        first, second = (n for n in HELD_OUT_BACKBONES if n != held)
        scores = []
        for lead, sets in ((first, [sfm((first,)), sfm((first, second))]), (second, [sfm((second,))])):
            evaluator = Evaluator(backbones[lead], stats[lead], cache, eval_config, [backbones[held]])
            if lead == first:
                train_f = encode(backbones[lead], data.train_eval.tensors[0])
                sets += baseline_sources(
                    data, ["random", "centroid"], 1, seeds, lambda f=train_f: f, stats[lead].means, [], backbones[lead]
                )
            scores += compare(evaluator, sets, seeds, full_data=False)
        cells = {(r["set"], r["mode"]): mean_std(r["top1 mean"], r["top1 std"], r["seeds"]) for r in summarise(scores)}
        begun = len(rows)
        for name in dict.fromkeys(name for name, _ in cells):
            made = name.removeprefix("SFM ") if name.startswith("SFM ") else f"(real) {name}"
            rows.append({"held out": held, "set": made} | {m: cells.get((name, m), "") for m in eval_config.mode})
        print(markdown_table(rows[begun:]), flush=True)
    return rows


def _pretrained(loss: str, epochs: int, folder: Path) -> dict[str, tuple[str, float]]:
    """``{backbone: (weight file, all-reals probe %)}`` of the demo backbones pre-trained with ``loss``
    (files already in ``folder`` are reused: a killed run resumes)."""
    from safetensors import safe_open

    config = SimCLRConfig(loss=loss, epochs=epochs, colour_start=epochs // 6, colour_ramp=epochs // 3)
    missing = [n for n in DEMO_BACKBONES if not (folder / f"{n}.safetensors").exists()]
    if missing:
        pretrain_and_save(missing, config, folder)
    out = {}
    for name in DEMO_BACKBONES:
        path = folder / f"{name}.safetensors"
        with safe_open(str(path), "pt") as f:
            out[name] = (str(path), float(f.metadata()["linear_probe_test_accuracy"]))
    return out


def pretrain_losses(seeds: int, eval_epochs: int, out: Path, epochs: int) -> list[dict]:
    """Rows of the contrastive-loss experiment (module docstring)."""
    table = []
    for loss in choices(PretrainLoss):
        pretrained = _pretrained(loss, epochs, out / "pretrained" / loss)
        config = replace(DemoConfig(out=str(out / f"demo-{loss}"), seeds=seeds), eval_epochs=eval_epochs)
        weights = {name: path for name, (path, _) in pretrained.items()}
        result = run_demo(config, weights=weights, methods=("sfm",), progress=False)
        rows = table_rows(f"pre-trained with {loss}, {epochs} epochs", result["rows"], DEMO_BACKBONES)
        rows[0]["all-reals probe (same / cross)"] = " / ".join(f"{pretrained[n][1]:.1f}" for n in DEMO_BACKBONES)
        table += rows
        print(markdown_table(table[-3:]), flush=True)
    return table


def _write(table: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(markdown_table(table) + "\n")
    path.with_suffix(".json").write_text(json.dumps(table, indent=1))
    print(f"\n{markdown_table(table)}\nwrote {path.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grey-weights", type=Path, default=None, help="folder of the grey-pretrained weights")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--eval-epochs", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument("--held-out", action="store_true", help="the multi-backbone held-out experiment instead")
    parser.add_argument("--steps", type=int, default=DEMO_DISTILL.steps, help="--held-out: distillation steps")
    parser.add_argument("--pretrain-losses", action="store_true", help="the contrastive-loss experiment instead")
    parser.add_argument("--pretrain-epochs", type=int, default=60, help="--pretrain-losses: pretraining epochs")
    parser.add_argument("--out", type=Path, default=Path("benches/out/demo_variants"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.held_out:
        table = held_out(args.seeds, args.eval_epochs, args.out, args.steps)
        _write(table, args.out.with_name("held_out"))
        return table
    if args.pretrain_losses:
        table = pretrain_losses(args.seeds, args.eval_epochs, args.out, args.pretrain_epochs)
        _write(table, args.out.with_name("pretrain_losses"))
        return table
    variants = dict(VARIANTS)
    if args.grey_weights:
        weights = {n: str(args.grey_weights / f"{n}.safetensors") for n in DEMO_BACKBONES}
        variants = {"grey-pretrained backbones (the earlier default)": {"weights": weights}, **variants}
    table = []
    for name, variant in variants.items():
        if args.only and name not in args.only:
            continue
        backbones = variant.get("backbones", DEMO_BACKBONES)
        steps = variant.get("distill", {}).get("steps", DEMO_DISTILL.steps)
        config = DemoConfig(out=str(args.out / name.split(" (")[0].replace(" ", "_")), seeds=args.seeds, steps=steps)
        config = replace(config, eval_epochs=args.eval_epochs)
        result = run_demo(
            config,
            distill_config=replace(DEMO_DISTILL, **variant.get("distill", {})),
            backbones=backbones,
            weights=variant.get("weights"),
            methods=("sfm",),
            progress=False,
        )
        table += table_rows(name, result["rows"], backbones)
        print(markdown_table(table[-3:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    _write(table, args.out)
    return table


if __name__ == "__main__":
    main()
