"""``fastsfm`` command line: stats, distill, eval, export, reproduce, pretrain, demo.

    fastsfm demo                                   # offline CPU demo on the embedded digits
    fastsfm stats   --data DIR --backbone dinov2_vitb14 --out stats.safetensors
    fastsfm stats   --data DIR --backbone dinov2_vitb14 clip_vitb16 --out stats/   # one pass, one file each
    fastsfm distill --data DIR --stats stats.safetensors --backbone dinov2_vitb14 --ipc 1 --out runs/x
    fastsfm distill --data DIR --backbone dinov2_vitb14 clip_vitb16 \
                    --stats stats/dinov2_vitb14.safetensors stats/clip_vitb16.safetensors --out runs/y
    fastsfm eval    --synset runs/x/synset.safetensors --stats stats.safetensors --data DIR --test-data DIR \\
                    --backbone dinov2_vitb14
    fastsfm export  runs/x --out runs/x/images       # <class>/<image>.png + synset.json
    fastsfm pretrain --loss gca-uot --out DIR        # demo backbones pre-trained with a GCA loss
    torchrun --nproc_per_node=8 -m fastsfm.cli distill ...   # stats, distill and eval shard over ranks

The distillation flags are derived from :class:`fastsfm.config.DistillConfig` (names, types,
choices, defaults and help), so the Python API and the command line cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..config import Baseline, ClassifierConfig, DistillConfig, EvalConfig, MachineConfig, SimCLRConfig, choices
from ..distributed import shutdown
from .flags import (
    WORKERS_HELP,
    Parser,
    add_backbone_flags,
    add_config_flags,
    add_data_flags,
    backbone_config_of,
    backbone_configs_of,
    config_from_args,
    data_from_args,
    dataset_defaults_of,
    integer,
    number,
    resolution_of,
)

__all__ = ["main", "build_parser"]


def _join_torchrun(args: argparse.Namespace) -> int:
    """Under torchrun: join the process group, use this rank's device; return the rank."""
    from ..distributed import init_from_env, rank_world

    device = init_from_env()
    if device is not None:
        args.device = str(device)
    return rank_world()[0]


def cmd_stats(args: argparse.Namespace) -> None:
    from ..models.backbones import from_config
    from ..stats import dataset_stats_many, input_crops, stats_file
    from ..stats.resume import checkpoint_folder

    classifier = config_from_args(ClassifierConfig, args, dataset_defaults_of(args))
    options = backbone_configs_of(args)
    if len(options) > 1 and Path(args.out).suffix == ".safetensors":
        raise ValueError(
            f"with several --backbone, --out is a folder (one <backbone>.safetensors each), not {args.out}"
        )
    paths = [Path(args.out)] if len(options) == 1 else [stats_file(args.out, o.backbone) for o in options]
    rank = _join_torchrun(args)
    backbones = [from_config(o, args.device) for o in options]
    data = data_from_args(args, input_crops(backbones))
    all_stats = dataset_stats_many(
        backbones,
        data,
        classifier,
        args.device,
        args.batch_size,
        args.workers,
        precision=options[0].real_precision,
        checkpoint_folder=checkpoint_folder(args.out),
        checkpoint_minutes=args.checkpoint_minutes,
        resume=args.resume,
        skip_bad=args.skip_bad_images,
    )
    if rank != 0:
        return
    for stats, backbone, path in zip(all_stats, backbones, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
        print(
            f"wrote {path}: {stats.num_classes} classes x {stats.feature_dim} dims, {stats.meta['num_images']} "
            f"images, backbone {backbone.identity}"
        )


def _print_plan(args: argparse.Namespace, config: DistillConfig, machine_config: MachineConfig, options) -> None:
    """``fastsfm distill --plan``: the plan (or the refusal, exit 2) on stdout, for this machine or the
    one the flags describe; the backbones are built with random weights (memory does not depend on
    them), probed on ``--device`` with the precision the planned device would run (bf16 for CUDA's auto)."""
    import dataclasses
    import os

    from ..distill.loop import plan_distill
    from ..distill.plan import machine_of
    from ..models.backbones import from_config
    from ..models.precision import autocast_dtype
    from ..stats import ClassStats

    classes = machine_config.classes or (ClassStats.load(args.stats[0]).num_classes if args.stats else None)
    if classes is None:
        raise ValueError("--plan needs --classes or --stats (the number of classes of the run)")
    device = torch.device(args.device)
    machine = machine_of(machine_config, device, int(os.environ.get("WORLD_SIZE", "1")))
    backbones = []
    for option in options:
        dtype = autocast_dtype(option.precision, machine.device)
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        backbones.append(from_config(dataclasses.replace(option, random_init=True, precision=precision), device))
    plan = plan_distill(backbones, config, classes, machine, device)
    print(plan.message)
    if not plan.feasible:
        raise SystemExit(2)


def cmd_distill(args: argparse.Namespace) -> None:
    from ..distill.loop import distill
    from ..models.backbones import from_config
    from ..stats import ClassStats

    config = config_from_args(DistillConfig, args, dataset_defaults_of(args))
    options = backbone_configs_of(args)  # their precision is the distillation's
    machine = config_from_args(MachineConfig, args)
    if machine.plan:
        return _print_plan(args, config, machine, options)
    if not args.stats or args.out is None:
        raise ValueError(
            "--stats and --out are required (but with --plan): statistics of `fastsfm stats`, a run folder"
        )
    if len(args.stats) != len(options):
        raise ValueError(f"{len(args.stats)} --stats files for {len(options)} backbones: give one per --backbone")
    rank = _join_torchrun(args)
    backbones = [from_config(o, args.device) for o in options]
    stats = [ClassStats.load(path) for path in args.stats]
    real = None
    if args.data is not None:
        args.resolution = config.resolution
        data = data_from_args(args, backbones[0].input_size)
        stats[0].check_compatible(num_classes=data.num_classes)
        real = data.train
    elif config.init == "real" or config.method == "lgm":
        raise SystemExit("--data is needed for --init real and --method lgm")
    distill(backbones, stats, config, args.out, real=real, resume=args.resume, device=args.device)
    if rank == 0:
        print(f"wrote {Path(args.out) / 'synset.safetensors'}, synset.png, loss.png and metrics.jsonl")


def _feature_folder(args: argparse.Namespace) -> Path | None:
    """``--feature-cache`` (``none``: no disk cache), else the default folder."""
    from ..evaluate.feature_store import default_folder

    if args.feature_cache is None:
        return default_folder()
    return None if args.feature_cache == "none" else Path(args.feature_cache)


def _image_sets(
    args: argparse.Namespace, seeds: int, real_precision: str, data, stats, distill_bb, resolution: int
) -> list:
    """The sets to evaluate: --synset files/folders and the --baselines that select real images
    (:mod:`fastsfm.evaluate.baselines`; neighbors: of each --synset)."""
    from ..evaluate.baselines import baseline_sources
    from ..evaluate.evaluator import load_image_set
    from ..evaluate.feature_store import stored_features
    from ..models.backbones import encode_sharded

    synthetic = [load_image_set(path, stats, resolution) for path in args.synset]
    ipc = args.ipc or (int(torch.bincount(synthetic[0].labels).max()) if synthetic else 1)
    baselines = [b for b in args.baselines if b != "full"]

    def features():
        def run():
            with distill_bb.using_precision(real_precision):
                return encode_sharded(
                    distill_bb, data.train_eval, device=args.device, workers=args.workers, progress=True
                )

        return stored_features(
            _feature_folder(args), data.train_eval, "train", distill_bb, resolution, real_precision, run
        )

    sets = synthetic + baseline_sources(
        data, baselines, ipc, seeds, features, stats.means, synthetic, distill_bb, args.device
    )
    if not sets and "full" not in args.baselines:
        raise ValueError("nothing to evaluate: give --synset and/or --baselines")
    return sets


def cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluate.evaluator import (
        Evaluator,
        FeatureCache,
        compare,
        format_markdown,
        summarise,
        write_results,
    )
    from ..models.backbones import from_config
    from ..stats import ClassStats

    config = config_from_args(EvalConfig, args, dataset_defaults_of(args))
    options = backbone_config_of(args)
    rank = _join_torchrun(args)  # under torchrun: features and evaluations shared among the ranks
    distill_bb = from_config(options, args.device)
    eval_bb = (
        from_config(options, args.device, args.eval_backbone, args.eval_weights) if args.eval_backbone else distill_bb
    )
    stats = ClassStats.load(args.stats)
    data = data_from_args(args, eval_bb.input_size)
    if data.test is None:
        raise ValueError("--test-data is needed (the real test split)")
    stats.check_compatible(distill_bb, num_classes=data.num_classes)
    sets = _image_sets(args, config.seeds, options.real_precision, data, stats, distill_bb, resolution_of(args))
    cache = FeatureCache(
        data.test, args.device, args.workers, options.real_precision, disk=_feature_folder(args),
        resolution=resolution_of(args), progress=True,
    )  # fmt: skip
    evaluator = Evaluator(distill_bb, stats, cache, config, [eval_bb], args.device)
    journal = Path(args.out) / "journal" if args.out else None  # a rerun of the command resumes
    scores = compare(evaluator, sets, config.seeds, full_data="full" in args.baselines, journal=journal)
    if rank != 0:
        return
    print(format_markdown(summarise(scores)))
    if args.out:
        meta = {
            "distill_backbone": distill_bb.identity,
            "eval_backbone": eval_bb.identity,
            "config": json.dumps(asdict(config)),
            "stats": str(args.stats),
        }
        write_results(scores, args.out, meta)
        print(f"wrote {Path(args.out) / 'results.json'} and results.md")


def cmd_export(args: argparse.Namespace) -> None:
    from ..evaluate.export import SET_JSON, export_image_folder
    from ..stats import ClassStats

    names = ClassStats.load(args.stats).class_names if args.stats else None
    out = export_image_folder(args.synset, args.out, names)
    files = sorted(out.rglob("*.png"))
    print(f"wrote {out}: {len(files)} PNG images in {len({f.parent for f in files})} class folders, and {SET_JSON}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from ..models.pretrain import WEIGHTS, pretrain_and_save

    config = config_from_args(SimCLRConfig, args)
    names = args.names or ["digits_vit", "digits_resnet"]
    out = Path(args.out) if args.out else WEIGHTS
    for r in pretrain_and_save(names, config, out):
        print(
            f"{r['name']}: {config.loss} loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}, linear probe "
            f"{r['probe']:.1f} % (test, all train features), {r['seconds']:.0f} s -> {r['path']}"
        )


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    result = run_demo(config_from_args(DemoConfig, args))
    print(result["report"])
    print("wrote " + ", ".join(str(p) for p in result["written"]) + " and the run folders")


def cmd_reproduce(args: argparse.Namespace) -> None:
    from ..distributed import init_from_env
    from ..reproduce import load_grid, run_grid
    from ..reproduce.config import ProjectionConfig

    projected = config_from_args(ProjectionConfig, args)
    grid = load_grid(args.config, root=args.root, out=args.out)
    device = init_from_env(grid.wait_hours)  # under torchrun: this rank's device
    if device is not None:
        grid.device = str(device)
    if args.device is not None:
        grid.device = args.device
    outcome = run_grid(grid, dry_run=args.dry_run, rerun_stale=args.rerun_stale, projected=projected)
    if outcome.report is not None:
        print(outcome.report)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fastsfm",
        description="Statistical flow matching dataset distillation for frozen pre-trained vision backbones.",
    )
    parser.add_argument("--version", action="version", version=f"fastsfm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not its one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "stats", help="one pass over the real data: class means + real-data classifier, of one or several backbones"
    )
    add_backbone_flags(p, several=True)
    add_data_flags(p, required=True)
    p.add_argument(
        "--out",
        required=True,
        help="statistics file to write (.safetensors); with several --backbone a folder, one <backbone>.safetensors "
        "each (every image is decoded once and encoded by every backbone)",
    )
    p.add_argument("--batch-size", type=integer(1), default=128, help="images per batch of the statistics pass")
    p.add_argument("--workers", type=integer(0), default=None, help=WORKERS_HELP)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the pass from its checkpoint (OUT.partial, or OUT/.partial for a folder); needs the same "
        "world size and batch size",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=number(0.0),
        default=10.0,
        help="minutes between checkpoints of the pass's running sums (also written on SIGTERM/SIGUSR1/Ctrl-C)",
    )
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave undecodable images out (listed in the statistics' metadata and the log) instead of stopping",
    )
    add_config_flags(p, ClassifierConfig, "real-data classifier (ClassifierConfig)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "distill", help="distill a synthetic set with SFM (against one backbone or several), or the LGM baseline"
    )
    add_backbone_flags(p, several=True)
    add_data_flags(p, required=False, resolution=False)
    p.add_argument(
        "--stats",
        nargs="+",
        default=[],
        help="statistics files from `fastsfm stats`, one per --backbone in the same order (SFM against several "
        "backbones minimises the mean of their flow losses; --backbone-weights weighs them); required but "
        "with --plan --classes",
    )
    p.add_argument("--out", default=None, help="run folder: checkpoint, metrics, synset.safetensors, PNGs")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    add_config_flags(p, DistillConfig, "distillation (DistillConfig)")
    add_config_flags(p, MachineConfig, "planning (MachineConfig): the plan is logged before step 1 of every run")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="probe / classifier inheritance / KD on the real test split, with baselines")
    add_backbone_flags(p)
    p.add_argument(
        "--eval-backbone",
        default=None,
        help="backbone whose features are classified (default: --backbone, the distillation backbone)",
    )
    p.add_argument("--eval-weights", default=None, help="local weight file of the evaluation backbone")
    add_data_flags(p, required=True, test=True)
    p.add_argument("--stats", required=True, help="statistics of the distillation backbone (real classifier)")
    p.add_argument(
        "--synset",
        nargs="*",
        default=[],
        help="synset.safetensors files (or run folders holding one), or folders of images made by any method "
        "(one subfolder per class: fastsfm export writes one)",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        default=[],
        choices=[*choices(Baseline), "full"],
        help="real-image baselines at the same IPC (kmeans: the reals nearest k-means centres, the authors' "
        "centroid baseline extended beyond IPC 1; neighbors: of each --synset) and the full-data classifier",
    )
    p.add_argument(
        "--ipc", type=integer(1), default=None, help="IPC of the baselines (default: the first --synset's, else 1)"
    )
    p.add_argument("--workers", type=integer(0), default=None, help=WORKERS_HELP)
    p.add_argument(
        "--feature-cache",
        default=None,
        help="folder where the encoded train/test features are kept and reused by later calls, keyed by split "
        "content, backbone, resolution and precision ('none': off; default: $FASTSFM_FEATURE_CACHE or "
        "~/.cache/fastsfm/features)",
    )
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    add_config_flags(p, EvalConfig, "evaluation (EvalConfig)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export", help="a distilled set as an image folder (<class>/<image>.png) for ImageFolder, timm, LGM's eval"
    )
    p.add_argument("synset", help="a synset.safetensors file, or a run folder of `fastsfm distill`")
    p.add_argument("--out", required=True, help="the image folder to write (must not exist, or be empty)")
    p.add_argument("--stats", default=None, help="statistics whose class names name the folders (default: the set's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reproduce", help="a resumable grid of datasets x backbones x IPC x methods x evaluations")
    p.add_argument("config", help="a grid TOML file, or a shipped one: imagenet100-ipc1, imagenet1k-ipc1")
    p.add_argument("--root", default=None, help="dataset root (overrides the config's `root`)")
    p.add_argument("--out", default=None, help="output folder (overrides the config's `out`)")
    p.add_argument("--device", default=None, help="overrides the config's `device`")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan with each cell's projected GPU-hours and wall time on the ranks; run nothing",
    )
    p.add_argument(
        "--rerun-stale",
        action="store_true",
        help="discard and rerun done cells whose recorded settings differ from the grid file's (default: refuse)",
    )
    from ..reproduce.config import ProjectionConfig

    add_config_flags(p, ProjectionConfig, "projection (ProjectionConfig)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "pretrain", help="self-supervised pretraining of the demo backbones on the digits (NT-Xent or a GCA loss)"
    )
    p.add_argument(
        "--names", nargs="+", choices=["digits_vit", "digits_vit8", "digits_resnet"], default=None,
        help="demo backbones to pretrain (default: digits_vit digits_resnet)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="folder for <name>.safetensors (default: the package's shipped weights)")
    add_config_flags(p, SimCLRConfig, "pretraining (SimCLRConfig)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="the whole pipeline offline on CPU on the embedded digits data, SFM beside LGM")
    from .demo import DemoConfig

    add_config_flags(p, DemoConfig, "demo (DemoConfig)")
    p.set_defaults(func=cmd_demo)
    return parser


class _Stderr(logging.Handler):
    """Writes records to the current ``sys.stderr`` (resolved at each record, not when configured)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def _show_library_logs() -> None:
    """Library modules log (``logging.getLogger(__name__)``); the command line shows their INFO messages."""
    logger = logging.getLogger("fastsfm")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)
        logger.propagate = False


EXPECTED = (ValueError, OSError, torch.OutOfMemoryError)
"""Failures a user meets -- bad input, damaged or missing files (weights included), I/O errors, an
out-of-memory device -- that the command line reports in one line with exit 2 (``--debug``: the
traceback); anything else is a bug and keeps its traceback."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` in one line: a loader worker's re-raised error (which carries the
    worker's traceback) gives its original last line; out of memory gives the flags that lower it."""
    text = str(err).strip() or type(err).__name__
    if "Original Traceback" in text:  # torch.utils.data's ExceptionWrapper: "Module.Error: message" last
        text = text.splitlines()[-1].split(": ", 1)[-1]
    if isinstance(err, torch.OutOfMemoryError):
        return f"out of memory ({text.splitlines()[0]}); lower --batch-size or --chunk-size, or use --offload"
    return " ".join(line.strip() for line in text.splitlines())


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _show_library_logs()
    try:
        args.func(args)
    except EXPECTED as err:
        if args.debug:
            raise
        print(f"fastsfm {args.command}: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        shutdown()  # leave torchrun's process groups while Python is whole (fastsfm.distributed)
