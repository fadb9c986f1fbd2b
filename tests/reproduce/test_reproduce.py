"""The resumable reproduction grid (``fastsfm reproduce``) on a tiny ImageNet-layout folder made here."""

import pytest
from helpers import imagenet_folder

from fastsfm.config import BackboneConfig, EvalConfig
from fastsfm.reproduce import GridConfig, load_grid, plan_grid, run_grid
from fastsfm.reproduce import cells as cells_mod
from fastsfm.reproduce.config import ProjectionConfig


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
        backbone=BackboneConfig(image_size=16, random_init=True),
        device="cpu",
        workers=0,
        distill=DistillConfig(steps=2, pyramid_extent=1, checkpoint_every=1),
        eval=EvalConfig(mode=("probe", "inherit"), epochs=2, seeds=2),
        classifier=ClassifierConfig(classifier_epochs=1),
    )
    values.update(kw)
    return GridConfig(**values)


def test_grid_runs_end_to_end_writes_the_tables_and_resumes(tmp_path, monkeypatch):
    root = imagenet_folder(tmp_path / "imagenet")
    grid = _grid(tmp_path, root)
    calls = []
    runners = dict(cells_mod.RUNNERS)

    def counting(kind):
        def run(r, cell):
            calls.append((kind, cell.backbone, cell.name))
            if kind == "eval" and cell.backbone == "test_vit" and interrupt["on"]:
                raise KeyboardInterrupt
            return runners[kind](r, cell)

        return run

    interrupt = {"on": True}
    for kind in runners:
        monkeypatch.setitem(cells_mod.RUNNERS, kind, counting(kind))
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, progress=False)
    first = list(calls)
    assert ("stats", "vit_tiny_patch16_224", "") in first and ("eval", "test_vit", "sfm") in first
    calls.clear()
    interrupt["on"] = False
    outcome = run_grid(grid, progress=False)  # resumes: finished cells are not redone
    cells = outcome.cells
    assert calls[0] == ("eval", "test_vit", "sfm") and all(k == "eval" for k, *_ in calls) and len(calls) == 2
    assert all(c.done() for c in cells) and len(cells) == 2 * (2 + 2 + 2)
    out = tmp_path / "grid" / "imagenette"
    assert outcome.report.startswith(f"wrote {out / 'results_ipc1.md'}")
    md = (out / "results_ipc1.md").read_text()
    assert "## Same backbone, probe" in md and "## Cross-backbone, SFM, inherit" in md
    assert (
        "| Distilled (SFM) |" in md and "| Random |" in md and "| Full dataset* |" in md and "5 runs x 100 epochs" in md
    )
    assert "| vit_tiny_patch16_224 |" in md and "| test_vit |" in md  # matrix rows: distillation backbones
    rows = (out / "results_ipc1.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,ipc,set,distill_backbone,eval_backbone,mode") and len(rows) == 1 + 2 * 2 * 2 * 2
    assert (out / "vit_tiny_patch16_224" / "ipc1" / "sfm" / "synset.png").exists()
    calls.clear()
    run_grid(grid, progress=False)
    assert calls == []  # everything done: nothing runs
    _stale_cells_are_refused_or_rerun(grid, cells, calls)


def _stale_cells_are_refused_or_rerun(grid, cells, calls):
    """Every finished cell records its settings; a grid whose settings changed refuses to reuse the
    cells they determine (naming the cell and the setting), keeps those they do not, and with
    ``rerun_stale`` reruns exactly the stale ones."""
    import dataclasses

    from fastsfm.reproduce.settings import settings_path, stale_cells

    assert all(settings_path(c).exists() for c in cells)
    faster = dataclasses.replace(grid, distill=dataclasses.replace(grid.distill, lr=0.5))
    stale, unrecorded = stale_cells(faster, cells)  # a distillation setting: its sets and their evaluations
    assert (
        unrecorded == []
        and sorted((c.kind, c.name) for c, _ in stale) == [("distill", "sfm")] * 2 + [("eval", "sfm")] * 2
    )
    assert all(diff == ["distill.lr: 0.002 -> 0.5"] for _, diff in stale)
    neutral = dataclasses.replace(grid, distill=dataclasses.replace(grid.distill, chunk_size=3, checkpoint_every=5))
    run_grid(neutral, progress=False)  # chunking and checkpoint cadence do not change a result
    assert calls == []
    changed = dataclasses.replace(grid, eval=dataclasses.replace(grid.eval, epochs=3))
    with pytest.raises(ValueError, match=r"grid cell 'eval imagenette .* eval\.epochs: 2 -> 3.*--rerun-stale"):
        run_grid(changed, progress=False)
    assert calls == []
    run_grid(changed, progress=False, rerun_stale=True)
    assert sorted(calls) == sorted(("eval", c.backbone, c.name) for c in cells if c.kind == "eval")
    calls.clear()
    run_grid(changed, progress=False)
    assert calls == []


def test_dry_run_reports_the_plan_with_projected_hours(tmp_path):
    """GPU-hours and wall time per cell on the projected ranks (statistics, SFM and LGM divide by them, an
    evaluation by its seeds; baselines run on rank 0), cells over the job limit flagged with how they
    resume; nothing written."""
    grid = _grid(tmp_path, imagenet_folder(tmp_path / "imagenet"), methods=["sfm", "lgm", "centroid"])
    outcome = run_grid(grid, dry_run=True, projected=ProjectionConfig(ranks=4, job_hours=1e-9))
    cells, out = outcome.cells, outcome.report
    assert "on 4 x cpu" in out and "| cell | status | GPU-hours | wall h on 4 rank(s) | note |" in out
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ")[1:] for r in out.splitlines() if r.startswith("| ")}
    sfm, lgm = rows["distill imagenette vit_tiny_patch16_224 IPC=1 sfm"], rows["distill imagenette test_vit IPC=1 lgm"]
    assert sfm[0] == lgm[0] == "to run" and "projected GPU-hours" in out
    assert float(sfm[2]) == pytest.approx(float(sfm[1]) / 4, rel=0.01)
    assert float(lgm[2]) == pytest.approx(float(lgm[1]) / 4, rel=0.01)
    assert "over the 1e-09 h job: resumes from its checkpoint" in sfm[3]
    evaluation = rows["eval imagenette vit_tiny_patch16_224 IPC=1 sfm"]
    seeds = min(4, grid.eval.seeds)  # an evaluation's seeds spread over the ranks
    assert float(evaluation[2]) == pytest.approx(float(evaluation[1]) / seeds, rel=0.01)
    assert float(evaluation[1]) > 0 and "resumes from its journal" in evaluation[3]
    assert len(cells) == len(plan_grid(grid)) and not (tmp_path / "grid").exists()


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"backbones": ["vit_tiny_patch16_224", "vit_nonexistent_9"]}, ValueError, "unknown backbones"),
        ({"datasets": ["imagenet-7"]}, ValueError, "unknown dataset 'imagenet-7'"),
        ({"methods": ["sfm", "dc"]}, ValueError, r"unknown methods \['dc'\]"),
        ({"views": {"sfm": 0, "lgm": 10}}, ValueError, "views: a table of positive integers"),
        ({"methods": ["neighbors"]}, ValueError, "add 'sfm' to methods"),
        ({"root": "/no/such/imagenet"}, FileNotFoundError, "does not exist"),
        ({"datasets": ["imagewoof"]}, ValueError, "10 classes of imagewoof are missing"),
        ({"eval_backbones": "some"}, ValueError, "eval_backbones must be"),
    ],
)
def test_bad_grids_fail_before_any_work(tmp_path, change, error, match):
    grid = _grid(tmp_path, imagenet_folder(tmp_path / "imagenet"), **change)
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
    bad.write_text('out = "x"\ndatasets = ["digits"]\nbackbones = ["test_vit"]\n[distill]\nipc = 10\nviews = 3\n')
    with pytest.raises(ValueError, match="the grid sets these keys itself.*'ipc'.*'views'.*top-level `views` table"):
        load_grid(bad)
    bad.write_bytes(b"\xff\xfe not toml")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_grid(bad)


def test_reproduce_command_line(tmp_path, capsys):
    from fastsfm.cli.commands import main

    root = imagenet_folder(tmp_path / "imagenet")
    config = tmp_path / "grid.toml"
    config.write_text(
        f'out = "{tmp_path / "grid"}"\ndatasets = ["imagenette"]\nbackbones = ["test_vit"]\nmethods = ["sfm"]\n'
        'resolution = 16\nworkers = 0\neval_backbones = "same"\n'
        "[distill]\nsteps = 1\n[eval]\nepochs = 1\nseeds = 1\n[backbone]\nimage_size = 16\nrandom_init = true\n"
    )
    main(["reproduce", str(config), "--root", str(root), "--device", "cpu", "--dry-run"])
    shown = capsys.readouterr().out  # the plan is the dry run's result: stdout
    assert "| distill imagenette test_vit IPC=1 sfm | to run |" in shown and "images/s per worker" in shown
    main(["reproduce", str(config), "--root", str(root), "--device", "cpu"])
    assert (tmp_path / "grid" / "imagenette" / "results_ipc1.md").exists()
    assert f"wrote {tmp_path / 'grid' / 'imagenette' / 'results_ipc1.md'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", str(config), "--root", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_grid_toml_refuses_out_of_range_options_in_its_sections(tmp_path):
    """The grid's [distill]/[eval]/[classifier] sections are the configs themselves: the same one-line
    range errors as the command line and the Python API."""
    for section, line, match in (
        ("distill", "alpha = 7", r"alpha must be a number in \[0, 1\], got 7"),
        ("distill", "nontarget_divisor = 0", "nontarget_divisor must be a number >= 1"),
        ("eval", "kd_weight = 2.0", r"kd_weight must be a number in \[0, 1\]"),
        ("classifier", "classifier_lr = 0.0", "classifier_lr must be a number > 0.0"),
        ("backbone", 'real_precision = "fp8"', "real_precision must be one of"),
        ("backbone", "image_size = 0", "image_size must be an integer >= 1"),
        ("backbone", 'backbone = "test_vit"', "the grid sets these keys itself"),
        ("distill", 'precision = "bf16"', r"unknown keys \['precision'\]"),
    ):
        config = tmp_path / f"{section}.toml"
        config.write_text(
            f'out = "{tmp_path}/g"\ndatasets = ["imagenette"]\nbackbones = ["test_vit"]\n[{section}]\n{line}\n'
        )
        with pytest.raises(ValueError, match=match):
            load_grid(config)
        assert not (tmp_path / "g").exists()
