"""``fastsfm`` command line: stats, distill, eval, export, reproduce, demo.

    fastsfm demo                                   # offline CPU demo on the embedded digits
    fastsfm stats   --data DIR --backbone dinov2_vitb14 --out stats.safetensors
    fastsfm distill --data DIR --stats stats.safetensors --backbone dinov2_vitb14 --ipc 1 --out runs/x
    fastsfm eval    --synset runs/x/synset.safetensors --stats stats.safetensors --data DIR --test-data DIR \\
                    --backbone dinov2_vitb14
    fastsfm export  runs/x --out runs/x/images       # <class>/<image>.png + synset.json
    torchrun --nproc_per_node=8 -m fastsfm.cli distill ...   # stats and distill shard over ranks

The distillation flags are derived from :class:`fastsfm.config.DistillConfig` (names, types,
choices, defaults and help), so the Python API and the command line cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch

from . import __version__
from .config import (
    Baseline,
    ClassifierConfig,
    DistillConfig,
    EvalConfig,
    Precision,
    Preprocess,
    choices,
    cli_fields,
    with_defaults,
)
from .distributed import shutdown

__all__ = ["main", "build_parser", "add_config_flags", "config_from_args"]

DEFAULT_BACKBONE = "dinov2_vitb14"
WORKERS_HELP = "image-decoding worker processes (default: this process's CPUs shared among the node's processes)"


def integer(low: int):
    """An argparse type: an integer >= ``low`` (else a one-line error naming the flag and the range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``fastsfm distill: error: argument --steps: ...``), exit 2, as
    the commands' own errors: no usage block in front of the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One ``--flag`` per field of the config dataclass ``cls`` (Literal -> choices, bool -> --x/--no-x).

    A flag that is not given leaves no attribute (``argparse.SUPPRESS``): :func:`config_from_args`
    then takes the dataset's default, else the field's (the help shows the field's)."""
    group = parser.add_argument_group(title)
    for name, kind, default, text in cli_fields(cls):
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{text} (default: {default})",
            )
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) is tuple:  # tuple[Literal[...], ...]: a list of choices
            group.add_argument(
                flag,
                dest=name,
                nargs="+",
                choices=list(typing.get_args(args[0])),
                default=argparse.SUPPRESS,
                help=f"{text} (default: {' '.join(default)})",
            )
            continue
        if typing.get_origin(kind) is Literal:
            group.add_argument(
                flag, dest=name, choices=list(args), default=argparse.SUPPRESS, help=f"{text} (default: {default})"
            )
            continue
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in args if a is not type(None))
        group.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, help=f"{text} (default: {default})")


def config_from_args(cls: type, args: argparse.Namespace, defaults: dict[str, object] | None = None):
    """The config dataclass ``cls`` from parsed flags, with ``defaults`` (the dataset's,
    :func:`fastsfm.datasets.dataset_defaults`) for the flags not given (its validation applies)."""
    given = {
        name: tuple(v) if isinstance(v, list) else v
        for name, v in ((name, getattr(args, name)) for name, *_ in cli_fields(cls) if hasattr(args, name))
    }
    return with_defaults(cls, defaults or {}, **given)


def _defaults(args: argparse.Namespace) -> dict[str, object]:
    """The defaults of the dataset of ``--data`` (empty without one)."""
    from .datasets import dataset_defaults

    return dataset_defaults(getattr(args, "data", None))


SYNTHETIC_PRECISION_HELP = (
    "backbone autocast of the synthetic side (eval: the augmented training views of every set): auto = bf16 "
    "on CUDA, fp32 on CPU; fp16 uses the authors' fixed x1024 loss scale"
)
REAL_PRECISION_HELP = (
    "backbone autocast of the real side -- class statistics, the real-data classifier's features, test "
    "features, baseline selection (default fp32: the authors run these without autocast)"
)


def _add_backbone(p: argparse.ArgumentParser, synthetic: bool = True, real: bool = True) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument(
        "--backbone",
        default=None,
        help="a paper alias (dinov2_vitb14, clip_vitb16, eva02_vitb14, mocov3_vitb16, ...; see "
        f"fastsfm.backbones.ALIASES), an author name (dinov2_vitb, ...) or any timm name (default: {DEFAULT_BACKBONE}; "
        "digits: digits_vit)",
    )
    w = g.add_mutually_exclusive_group()
    w.add_argument(
        "--weights",
        default=None,
        help="local weights in their publisher's format: a file (.safetensors, a .pth state dict, OpenAI's "
        "TorchScript .pt) or a checkpoint folder (MoCo-v3: config.json + model.safetensors); default: the local "
        "timm / Hugging Face caches",
    )
    w.add_argument("--random-init", action="store_true", help="no pretrained weights: seeded random init")
    g.add_argument(
        "--image-size",
        type=integer(1),
        default=None,
        help="backbone input size (default: 224 for the paper aliases, else the model's)",
    )
    g.add_argument(
        "--preprocess",
        choices=choices(Preprocess),
        default="authors",
        help="authors: ImageNet mean/std for every backbone (default); model: the model's own",
    )
    if synthetic:
        g.add_argument("--precision", choices=choices(Precision), default="auto", help=SYNTHETIC_PRECISION_HELP)
    if real:
        g.add_argument("--real-precision", choices=choices(Precision), default="fp32", help=REAL_PRECISION_HELP)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _backbone(args: argparse.Namespace, name: str | None = None, weights: str | None = None):
    """The backbone of the flags (``--backbone``/``--weights``), or ``name``/``weights`` with the same options."""
    from .backbones import load_backbone

    # an evaluation backbone's own --eval-weights count even with --random-init
    given = weights if name else args.weights
    pretrained = given or (False if args.random_init else True)
    return load_backbone(
        name or args.backbone or _defaults(args).get("backbone", DEFAULT_BACKBONE),
        pretrained,
        args.image_size,
        device=args.device,
        preprocess=args.preprocess,
        precision=getattr(args, "precision", "auto"),
    )


def _add_data(p: argparse.ArgumentParser, required: bool, test: bool = False, resolution: bool = True) -> None:
    p.add_argument("--data", required=required, help="ImageFolder root of the training images, or 'digits'")
    if test:
        p.add_argument("--test-data", default=None, help="ImageFolder root of the test split (digits: built in)")
    if resolution:
        p.add_argument(
            "--resolution",
            type=integer(1),
            default=None,
            help="real images are resized to this (shorter side) and centre-cropped to the backbone's "
            "input (default 256; digits: 32)",
        )


def _resolution(args: argparse.Namespace) -> int:
    """``--resolution``, else the dataset's default, else 256: one rule for every subcommand."""
    from .datasets import DEFAULT_RESOLUTION

    return args.resolution or int(_defaults(args).get("resolution", DEFAULT_RESOLUTION))


def _data(args: argparse.Namespace, crop: int):
    from .datasets import load_data

    return load_data(args.data, _resolution(args), crop, getattr(args, "test_data", None))


def _join_torchrun(args: argparse.Namespace) -> int:
    """Under torchrun: join the process group, use this rank's device; return the rank."""
    from .distributed import init_from_env, rank_world

    device = init_from_env()
    if device is not None:
        args.device = str(device)
    return rank_world()[0]


def cmd_stats(args: argparse.Namespace) -> None:
    from .stats import dataset_stats

    classifier = config_from_args(ClassifierConfig, args, _defaults(args))
    rank = _join_torchrun(args)
    backbone = _backbone(args)
    data = _data(args, backbone.input_size)
    stats = dataset_stats(
        backbone, data, classifier, args.device, args.batch_size, args.workers, precision=args.real_precision
    )
    if rank != 0:
        return
    stats.save(args.out)
    print(
        f"wrote {args.out}: {stats.num_classes} classes x {stats.feature_dim} dims, {stats.meta['num_images']} "
        f"images, backbone {backbone.identity}"
    )


def cmd_distill(args: argparse.Namespace) -> None:
    from .distill import distill
    from .stats import ClassStats

    config = config_from_args(DistillConfig, args, _defaults(args))
    args.precision = config.precision
    rank = _join_torchrun(args)
    backbone = _backbone(args)
    stats = ClassStats.load(args.stats)
    real = None
    if args.data is not None:
        args.resolution = config.resolution
        data = _data(args, backbone.input_size)
        stats.check_compatible(num_classes=data.num_classes)
        real = data.train
    elif config.init == "real" or config.method == "lgm":
        raise SystemExit("--data is needed for --init real and --method lgm")
    distill(backbone, stats, config, args.out, real=real, resume=args.resume, device=args.device)
    if rank == 0:
        print(f"wrote {Path(args.out) / 'synset.safetensors'}, synset.png, loss.png and metrics.jsonl")


def _image_sets(args: argparse.Namespace, seeds: int, data, stats, distill_bb, resolution: int) -> list:
    """The sets to evaluate: --synset files/folders and the --baselines that select real images
    (:mod:`fastsfm.baselines.sets`; neighbors: of each --synset)."""
    from .baselines.sets import baseline_sources
    from .evaluate import load_image_set
    from .probe import encode

    synthetic = [load_image_set(path, stats, resolution) for path in args.synset]
    ipc = args.ipc or (int(torch.bincount(synthetic[0].labels).max()) if synthetic else 1)
    baselines = [b for b in args.baselines if b != "full"]

    def features():
        with distill_bb.using_precision(args.real_precision):
            return encode(distill_bb, data.train_eval, device=args.device, workers=args.workers, progress=True)

    sets = synthetic + baseline_sources(
        data, baselines, ipc, seeds, features, stats.means, synthetic, distill_bb, args.device
    )
    if not sets and "full" not in args.baselines:
        raise ValueError("nothing to evaluate: give --synset and/or --baselines")
    return sets


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import Evaluator, FeatureCache, compare, format_markdown, summarise, write_results
    from .stats import ClassStats

    config = config_from_args(EvalConfig, args, _defaults(args))
    distill_bb = _backbone(args)
    eval_bb = _backbone(args, args.eval_backbone, args.eval_weights) if args.eval_backbone else distill_bb
    stats = ClassStats.load(args.stats)
    data = _data(args, eval_bb.input_size)
    if data.test is None:
        raise ValueError("--test-data is needed (the real test split)")
    stats.check_compatible(distill_bb, num_classes=data.num_classes)
    sets = _image_sets(args, config.seeds, data, stats, distill_bb, _resolution(args))
    cache = FeatureCache(data.test, args.device, args.workers, args.real_precision)
    evaluator = Evaluator(distill_bb, stats, cache, config, [eval_bb], args.device)
    journal = Path(args.out) / "journal" if args.out else None  # a rerun of the command resumes
    scores = compare(evaluator, sets, config.seeds, full_data="full" in args.baselines, journal=journal)
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
    from .export import SET_JSON, export_image_folder
    from .stats import ClassStats

    names = ClassStats.load(args.stats).class_names if args.stats else None
    out = export_image_folder(args.synset, args.out, names)
    files = sorted(out.rglob("*.png"))
    print(f"wrote {out}: {len(files)} PNG images in {len({f.parent for f in files})} class folders, and {SET_JSON}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    result = run_demo(config_from_args(DemoConfig, args))
    print(result["report"])
    print("wrote " + ", ".join(str(p) for p in result["written"]) + " and the run folders")


def cmd_reproduce(args: argparse.Namespace) -> None:
    from .distributed import init_from_env
    from .reproduce import load_grid, run_grid

    grid = load_grid(args.config, root=args.root, out=args.out)
    device = init_from_env(grid.wait_hours)  # under torchrun: this rank's device
    if device is not None:
        grid.device = str(device)
    if args.device is not None:
        grid.device = args.device
    outcome = run_grid(grid, dry_run=args.dry_run)
    if outcome.report is not None:
        print(outcome.report)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fastsfm",
        description="Statistical flow matching dataset distillation for frozen pre-trained vision backbones.",
    )
    parser.add_argument("--version", action="version", version=f"fastsfm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="one pass over the real data: class means + real-data classifier")
    _add_backbone(p, synthetic=False)
    _add_data(p, required=True)
    p.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    p.add_argument("--batch-size", type=integer(1), default=128, help="images per batch of the statistics pass")
    p.add_argument("--workers", type=integer(0), default=None, help=WORKERS_HELP)
    add_config_flags(p, ClassifierConfig, "real-data classifier (ClassifierConfig)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("distill", help="distill a synthetic set with SFM (or the LGM baseline)")
    _add_backbone(p, synthetic=False, real=False)  # the synthetic side's precision: --precision of DistillConfig
    _add_data(p, required=False, resolution=False)
    p.add_argument("--stats", required=True, help="statistics file from `fastsfm stats` (same backbone)")
    p.add_argument("--out", required=True, help="run folder: checkpoint, metrics, synset.safetensors, PNGs")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    add_config_flags(p, DistillConfig, "distillation (DistillConfig)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="probe / classifier inheritance / KD on the real test split, with baselines")
    _add_backbone(p)
    p.add_argument(
        "--eval-backbone",
        default=None,
        help="backbone whose features are classified (default: --backbone, the distillation backbone)",
    )
    p.add_argument("--eval-weights", default=None, help="local weight file of the evaluation backbone")
    _add_data(p, required=True, test=True)
    p.add_argument("--stats", required=True, help="statistics of the distillation backbone (real classifier)")
    p.add_argument(
        "--synset",
        nargs="*",
        default=[],
        help="synset.safetensors files, or folders of images made by any method (one subfolder per class)",
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
    p.add_argument("--dry-run", action="store_true", help="print the plan with projected device hours; run nothing")
    p.set_defaults(func=cmd_reproduce)

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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _show_library_logs()
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fastsfm {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        shutdown()  # leave torchrun's process groups while Python is whole (fastsfm.distributed)


if __name__ == "__main__":
    main()
