"""Dataset presets and the resumable reproduction grid, on a tiny ImageNet-layout folder made here."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastsfm import grid as grid_mod
from fastsfm.config import EvalConfig
from fastsfm.data import load_data
from fastsfm.grid import GridConfig, load_grid, plan_grid, run_grid
from fastsfm.imagenet import SUBSETS, imagenet_subset, subset_wnids

IMAGENETTE = [
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
]


def _imagenet(root, wnids=IMAGENETTE, train=3, val=2, extra=("n09999999",)):
    """An ImageNet-layout folder: train/<wnid>/ and val/<wnid>/ of tiny images, one colour per class."""
    rng = np.random.default_rng(0)
    for i, wnid in enumerate(list(wnids) + list(extra)):
        for split, count in (("train", train), ("val", val)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                colour = np.array([25 * i % 255, 80 + 15 * i % 170, 200 - 17 * i % 200])
                arr = np.clip(colour + rng.normal(0, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{j}.png")
    return root


def test_subsets_are_the_authors_lists_in_their_order():
    assert {
        "imagenet-1k",
        "imagenet-100",
        "imagenette",
        "imagewoof",
        "imagenet-birds",
        "imagenet-fruits",
        "imagenet-cats",
        "imagenet-a",
        "imagenet-b",
        "imagenet-c",
        "imagenet-d",
        "imagenet-e",
    } == set(SUBSETS)
    assert subset_wnids("imagenette") == IMAGENETTE
    in100 = subset_wnids("imagenet-100")
    assert len(in100) == 100 and in100[:2] == ["n02869837", "n01749939"]  # the authors' imagenet100.txt order
    assert len(set(subset_wnids("imagenet-1k"))) == 1000
    with pytest.raises(ValueError, match="unknown ImageNet subset 'imagenet-7'"):
        subset_wnids("imagenet-7")


def test_imagenet_subset_relabels_in_order_and_ignores_other_classes(tmp_path):
    root = _imagenet(tmp_path / "imagenet")
    data = load_data(f"imagenette:{root}", 16, 12)
    assert data.num_classes == 10 and data.class_names[0] == "tench" and len(data.train) == 30
    assert data.train.classes == IMAGENETTE and data.train[3][1] == 1  # relabelled 0..9 in the listed order
    assert data.train[0][0].shape == (3, 16, 16) and data.train_eval[0][0].shape == (3, 12, 12)
    assert len(data.test) == 20 and data.test[0][0].shape == (3, 12, 12)
    torch.save(({w: (f"name{i}", "x") for i, w in enumerate(IMAGENETTE)}, {}), root / "meta.bin")
    assert imagenet_subset(root, "imagenette", 16, 12).class_names[:2] == ["name0", "name1"]  # torchvision's meta
    shutil.rmtree(root / "val" / IMAGENETTE[4])
    with pytest.raises(ValueError, match="1 classes of imagenette are missing from .*val.*n03028079"):
        load_data(f"imagenette:{root}", 16, 12)
    with pytest.raises(FileNotFoundError, match="torchvision.datasets.MNIST is not under"):
        load_data(f"torchvision:MNIST:{tmp_path / 'nothing'}", 16, 12)


def _grid(tmp_path, data_root, **kw) -> GridConfig:
    from fastsfm.config import ClassifierConfig, DistillConfig

    values = dict(
        out=str(tmp_path / "grid"),
        datasets=["imagenette"],
        root=str(data_root),
        backbones=["vit_tiny_patch16_224", "test_vit"],
        ipc=[1],
        methods=["sfm", "random"],
        resolution=16,
        image_size=16,
        random_init=True,
        device="cpu",
        workers=0,
        distill=DistillConfig(steps=2, pyramid_extent=1, checkpoint_every=1),
        eval=EvalConfig(mode=("probe", "inherit"), epochs=2, seeds=2),
        classifier=ClassifierConfig(classifier_epochs=1),
    )
    values.update(kw)
    return GridConfig(**values)


def test_grid_runs_end_to_end_writes_the_tables_and_resumes(tmp_path, monkeypatch):
    root = _imagenet(tmp_path / "imagenet")
    grid = _grid(tmp_path, root)
    calls = []
    runners = dict(grid_mod._RUNNERS)

    def counting(kind):
        def run(r, cell):
            calls.append((kind, cell.backbone, cell.name))
            if kind == "eval" and cell.backbone == "test_vit" and interrupt["on"]:
                raise KeyboardInterrupt
            return runners[kind](r, cell)

        return run

    interrupt = {"on": True}
    for kind in runners:
        monkeypatch.setitem(grid_mod._RUNNERS, kind, counting(kind))
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, progress=False)
    first = list(calls)
    assert ("stats", "vit_tiny_patch16_224", "") in first and ("eval", "test_vit", "sfm") in first
    calls.clear()
    interrupt["on"] = False
    cells = run_grid(grid, progress=False)  # resumes: finished cells are not redone
    assert calls[0] == ("eval", "test_vit", "sfm") and all(k == "eval" for k, *_ in calls) and len(calls) == 2
    assert all(c.done() for c in cells) and len(cells) == 2 * (2 + 2 + 2)
    out = tmp_path / "grid" / "imagenette"
    md = (out / "results_ipc1.md").read_text()
    assert "## Same backbone, probe" in md and "## Cross-backbone, SFM, inherit" in md
    assert "| Distilled (SFM) |" in md and "| Random |" in md and "| Full dataset |" in md
    assert "| vit_tiny_patch16_224 |" in md and "| test_vit |" in md  # matrix rows: distillation backbones
    rows = (out / "results_ipc1.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,ipc,set,distill_backbone,eval_backbone,mode") and len(rows) == 1 + 2 * 2 * 2 * 2
    assert (out / "vit_tiny_patch16_224" / "ipc1" / "sfm" / "synset.png").exists()
    calls.clear()
    run_grid(grid, progress=False)
    assert calls == []  # everything done: nothing runs


def test_dry_run_prints_the_plan_with_projected_hours(tmp_path, capsys):
    grid = _grid(tmp_path, _imagenet(tmp_path / "imagenet"), methods=["sfm", "lgm", "centroid"])
    cells = run_grid(grid, dry_run=True)
    out = capsys.readouterr().out
    assert "| distill imagenette vit_tiny_patch16_224 IPC=1 sfm | to run |" in out
    assert "| distill imagenette test_vit IPC=1 lgm | to run |" in out and "projected device hours" in out
    assert len(cells) == len(plan_grid(grid)) and not (tmp_path / "grid").exists()


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"backbones": ["vit_tiny_patch16_224", "vit_nonexistent_9"]}, ValueError, "unknown backbones"),
        ({"datasets": ["imagenet-7"]}, ValueError, "unknown dataset 'imagenet-7'"),
        ({"methods": ["sfm", "kmeans"]}, ValueError, r"unknown methods \['kmeans'\]"),
        ({"methods": ["neighbors"]}, ValueError, "add 'sfm' to methods"),
        ({"root": "/no/such/imagenet"}, FileNotFoundError, "does not exist"),
        ({"datasets": ["imagewoof"]}, ValueError, "10 classes of imagewoof are missing"),
        ({"eval_backbones": "some"}, ValueError, "eval_backbones must be"),
    ],
)
def test_bad_grids_fail_before_any_work(tmp_path, change, error, match):
    grid = _grid(tmp_path, _imagenet(tmp_path / "imagenet"), **change)
    with pytest.raises(error, match=match):
        run_grid(grid, progress=False)
    assert not (tmp_path / "grid").exists()


def test_grid_toml_loading(tmp_path):
    shipped = load_grid("imagenet100-ipc1", root=str(tmp_path))
    assert shipped.backbones == ["clip_vitb16", "dinov2_vitb14", "eva02_vitb14", "mocov3_vitb16"]
    assert shipped.distill.steps == 5000 and shipped.views == {"sfm": 1, "lgm": 10} and shipped.eval.epochs == 1000
    assert shipped.root == str(tmp_path) and load_grid("imagenet1k-ipc1").datasets == ["imagenet-1k"]
    bad = tmp_path / "bad.toml"
    bad.write_text('out = "x"\ndatasets = ["digits"]\nbackbones = ["test_vit"]\nbatch = 3\n')
    with pytest.raises(ValueError, match=r"unknown keys \['batch'\]"):
        load_grid(bad)
    bad.write_text('out = "x"\ndatasets = ["digits"]\nbackbones = ["test_vit"]\n[eval]\nmode = ["linear"]\n')
    with pytest.raises(ValueError, match="mode must be a non-empty subset"):
        load_grid(bad)
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        load_grid(tmp_path / "none.toml")


def test_reproduce_command_line(tmp_path, capsys):
    from fastsfm.cli import main

    root = _imagenet(tmp_path / "imagenet")
    config = tmp_path / "grid.toml"
    config.write_text(
        f'out = "{tmp_path / "grid"}"\ndatasets = ["imagenette"]\nbackbones = ["test_vit"]\nmethods = ["sfm"]\n'
        'resolution = 16\nimage_size = 16\nrandom_init = true\nworkers = 0\neval_backbones = "same"\n'
        "[distill]\nsteps = 1\n[eval]\nepochs = 1\nseeds = 1\n"
    )
    main(["reproduce", str(config), "--root", str(root), "--device", "cpu", "--dry-run"])
    assert "| distill imagenette test_vit IPC=1 sfm | to run |" in capsys.readouterr().out
    main(["reproduce", str(config), "--root", str(root), "--device", "cpu"])
    assert (tmp_path / "grid" / "imagenette" / "results_ipc1.md").exists()
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", str(config), "--root", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
