"""torch.distributed on CPU: 2 processes, gloo backend, spawned by torch.multiprocessing.

(In production the processes come from ``torchrun``; the code paths are the same.)
"""

import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TOY_CLASSIFIER, Recorder, make_problem, tiny_backbone, toy_data, toy_stats
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from fastsfm import SFMLoss
from fastsfm.distill.loop import DistillConfig, distill
from fastsfm.distill.objectives import SFMObjective
from fastsfm.distill.synset import SyntheticSet
from fastsfm.distributed import init_from_env, interleave_shards, shard_classes, shard_dataset, shutdown
from fastsfm.models.backbones import load_backbone
from fastsfm.models.ensemble import BackboneEnsemble
from fastsfm.stats import ClassStats, compute_stats, compute_stats_many

CFG = DistillConfig(ipc=2, steps=5, lr=0.05, resolution=16, pyramid_extent=2, checkpoint_every=2, views=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: str, tmp: str) -> None:
    """One rank, joined and left as the CLI does under torchrun, as on a CPU node (gloo)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    with mock.patch("torch.cuda.is_available", return_value=False):
        init_from_env()
    try:
        globals()[job](rank, world, Path(tmp))
    finally:
        shutdown()


def _loss_job(rank, world, tmp):
    """Each rank holds part of the rows; the loss and each rank's gradient rows equal the single process's."""
    z, y, mu = make_problem(90, 6, 37, seed=4)
    for objective in ("flow", "decouple"):
        x = z.clone().requires_grad_()
        want = SFMLoss(mu, objective=objective, alpha=0.5, backend="torch")(x, y)
        want.backward()
        for backend in ("torch", "triton"):
            for name, rows in (
                ("interleaved", torch.arange(rank, 90, world)),
                ("class-sharded", torch.nonzero((y >= 3) == bool(rank)).flatten()),
            ):
                part = z[rows].clone().requires_grad_()
                loss = SFMLoss(mu, objective=objective, alpha=0.5, backend=backend, process_group=dist.group.WORLD)(
                    part, y[rows]
                )
                loss.backward()
                msg = f"{objective}/{backend}/{name}"
                torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6, msg=msg)
                torch.testing.assert_close(part.grad, x.grad[rows], rtol=1e-4, atol=1e-8, msg=msg)


def _stats_job(rank, world, tmp):
    loader = DataLoader(shard_dataset(toy_data(), rank, world), batch_size=4)
    stats = compute_stats(tiny_backbone(), loader, ["c0", "c1", "c2"], "toy", classifier=TOY_CLASSIFIER, progress=False)
    stats.save(tmp / f"stats{rank}.safetensors")


def _objective_step(stats, first_class, classes, group, chunk, backbone=None):
    synset = SyntheticSet(classes, 2, 16, extent=1, seed=2, first_class=first_class)
    synset.grow(2)
    recorder = Recorder(synset)
    config = replace(CFG, chunk_size=chunk)
    objective = SFMObjective(backbone or tiny_backbone(), stats, config, torch.device("cpu"), group)
    return objective.step(synset, recorder, 4), recorder.grads


def _two_backbones():
    return [tiny_backbone(), load_backbone("test_vit", pretrained=False, image_size=16, seed=1)]


def _multi_backbone_job(rank, world, tmp):
    """Two backbones: their statistics in one sharded pass, and SFM against both with the classes split
    over the ranks (one all-reduce of both sums buffers), equal to the single process's."""
    loader = DataLoader(shard_dataset(toy_data(), rank, world), batch_size=4)
    names = ["c0", "c1", "c2"]
    stats = compute_stats_many(_two_backbones(), loader, names, "toy", classifier=TOY_CLASSIFIER, progress=False)
    for k, member in enumerate(stats):
        member.save(tmp / f"stats{k}.rank{rank}.safetensors")
    ensemble = BackboneEnsemble(_two_backbones())
    want_loss, want_grads = _objective_step(stats, 0, 3, None, None, ensemble)
    first, count = [(0, 2), (2, 1)][rank]
    for chunk in (None, 1):
        loss, grads = _objective_step(stats, first, count, dist.group.WORLD, chunk, ensemble)
        assert abs(loss - want_loss) < 1e-6
        for got, want in zip(grads, want_grads, strict=True):
            assert (got - want[2 * first : 2 * (first + count)]).abs().max() <= 1e-6


def _objective_job(rank, world, tmp):
    """Two ranks holding classes {0, 1} and {2}: the loss and each rank's image gradients equal the
    single-process step's (same images, same draws), chunked or not."""
    stats = ClassStats.load(tmp / "stats.safetensors")
    want_loss, want_grads = _objective_step(stats, 0, 3, None, None)
    first, count = [(0, 2), (2, 1)][rank]
    for chunk in (None, 1):
        loss, grads = _objective_step(stats, first, count, dist.group.WORLD, chunk)
        assert abs(loss - want_loss) < 1e-6
        for got, want in zip(grads, want_grads, strict=True):
            assert (got - want[2 * first : 2 * (first + count)]).abs().max() <= 1e-6


def _distill_job(rank, world, tmp):
    bb, stats = tiny_backbone(), ClassStats.load(tmp / "stats.safetensors")
    direct = distill(bb, stats, CFG, tmp / "direct", progress=False)
    distill(bb, stats, replace(CFG, steps=3), tmp / "resumed", progress=False)
    resumed = distill(bb, stats, CFG, tmp / "resumed", resume=True, progress=False)
    distill(bb, stats, replace(CFG, steps=3), tmp / "two_then_one", progress=False)  # resumed by 1 process
    distill(bb, stats, CFG, tmp / "one_then_two", resume=True, progress=False)  # 1 process wrote step 3
    assert direct.labels.tolist() == [[0, 0, 1, 1], [2, 2]][rank]
    for a, b in zip(direct.levels, resumed.levels, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


LGM = replace(CFG, method="lgm", views=2, steps=3, ipc=1, workers=0)


def _lgm_job(rank, world, tmp):
    """LGM on 2 ranks: each rank's classes' images, a piece of every real batch."""
    bb, stats = tiny_backbone(), ClassStats.load(tmp / "stats.safetensors")
    distill(bb, stats, replace(LGM, chunk_size=1), tmp / "lgm2", real=toy_data(n_per_class=4), progress=False)


def test_two_rank_lgm_equals_single_process(tmp_path):
    """The real batch split into pieces over the ranks, both head-gradient sums all-reduced: the images
    equal one process's up to the order of float sums, every loss too."""
    bb = tiny_backbone()
    toy_stats(bb, toy_data()).save(tmp_path / "stats.safetensors")
    stats = ClassStats.load(tmp_path / "stats.safetensors")
    single = distill(bb, stats, LGM, tmp_path / "lgm1", real=toy_data(n_per_class=4), progress=False)
    _spawn("_lgm_job", tmp_path)
    merged = load_file(str(tmp_path / "lgm2" / "synset.safetensors"))
    torch.testing.assert_close(merged["images"], single.render(), rtol=0, atol=1e-5)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("lgm1", "lgm2")
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and len(losses[0]) == 3


def _rank0_failure_job(rank, world, tmp):
    """Rank 0 raises inside rank-0-only work while rank 1 waits on the gloo control group: both leave
    with the error, neither hangs; a failure on rank 1 during all-rank work reaches rank 0 too."""
    from fastsfm.distributed import run_on_all, run_on_rank0

    assert run_on_rank0(lambda: "done") == ("done" if rank == 0 else None)

    def fail():
        raise ValueError("bad cell")

    with pytest.raises(ValueError if rank == 0 else RuntimeError, match="bad cell") as err:
        run_on_rank0(fail)
    if rank == 1:
        assert str(err.value) == "rank 0 failed: ValueError: bad cell"
    with pytest.raises((ValueError, RuntimeError), match="rank 1" if rank == 0 else "only rank 1"):
        run_on_all(lambda: (_ for _ in ()).throw(ValueError("only rank 1")) if rank == 1 else None)
    (tmp / f"ok{rank}").write_text("ok")


def _grid_failure_job(rank, world, tmp):
    """A grid under two ranks whose baseline cell fails on rank 0 only: rank 0 raises the cell's error,
    rank 1 -- which finished its part and waits on the gloo control group -- raises it too, instead of hanging."""
    from fastsfm.config import BackboneConfig, ClassifierConfig, DistillConfig, EvalConfig
    from fastsfm.reproduce import GridConfig, run_grid
    from fastsfm.reproduce import cells as cells_mod

    def failing(run, cell):
        if run.rank == 0:
            raise ValueError("baseline cell failed")

    cells_mod.RUNNERS["baseline"] = failing
    grid = GridConfig(
        out=str(tmp / "grid"),
        datasets=["digits"],
        backbones=["test_vit"],
        methods=["sfm", "random"],
        resolution=16,
        backbone=BackboneConfig(image_size=16, random_init=True),
        device="cpu",
        workers=0,
        eval_backbones="same",
        distill=DistillConfig(steps=1),
        eval=EvalConfig(epochs=1, seeds=1),
        classifier=ClassifierConfig(classifier_epochs=1),
    )
    with pytest.raises(ValueError if rank == 0 else RuntimeError, match="baseline cell failed"):
        run_grid(grid, progress=False)
    (tmp / f"grid{rank}").write_text("ok")


def _digits_grid(out):
    """A small digits grid: statistics, SFM, random, centroid and k-means reals, probe and inheritance, full data."""
    from fastsfm.config import BackboneConfig, ClassifierConfig, DistillConfig, EvalConfig
    from fastsfm.reproduce import GridConfig

    return GridConfig(
        out=str(out),
        datasets=["digits"],
        backbones=["test_vit"],
        methods=["sfm", "random", "centroid", "kmeans"],
        resolution=16,
        backbone=BackboneConfig(image_size=16, random_init=True),
        device="cpu",
        workers=0,
        eval_backbones="same",
        distill=DistillConfig(steps=3, pyramid_extent=1),
        eval=EvalConfig(mode=("probe", "inherit"), epochs=2, seeds=2),
        classifier=ClassifierConfig(classifier_epochs=1),
    )


def _grid_job(rank, world, tmp):
    """Rank 1 looks at the cells' outputs late: a rank-0 cell's output is written by then, and a rank
    that skipped the cell for it would leave rank 0 waiting (the grid agrees on rank 0's view)."""
    import time

    from fastsfm.reproduce import run_grid
    from fastsfm.reproduce.plan import Cell

    done = Cell.done
    if rank == 1:
        Cell.done = lambda self: time.sleep(0.3) or done(self)
    run_grid(_digits_grid(tmp / "grid2"), progress=False)


def test_two_rank_grid_writes_the_single_process_tables(tmp_path):
    """Every cell kind under 2 ranks (statistics, SFM, full data and evaluations sharded; baselines on
    rank 0): the result tables equal one process's."""
    from fastsfm.reproduce import run_grid

    run_grid(_digits_grid(tmp_path / "grid1"), progress=False)
    _spawn("_grid_job", tmp_path)
    one, two = (json.loads((tmp_path / g / "digits" / "results_ipc1.json").read_text()) for g in ("grid1", "grid2"))
    flat = [json.dumps(t, sort_keys=True) for t in (one, two)]
    numbers = [[float(x) for x in re.findall(r"-?\d+\.\d+", f)] for f in flat]
    assert re.sub(r"-?\d+\.\d+", "#", flat[0]) == re.sub(r"-?\d+\.\d+", "#", flat[1])  # the same cells
    assert numbers[0] == pytest.approx(numbers[1], abs=1e-6)  # the same scores (on a CPU: bit for bit)


def _toy_evaluation(journal):
    """Two sets (one drawn per seed) x 3 seeds x probe and inheritance, with the full-data row, journaled."""
    from fastsfm.config import EvalConfig
    from fastsfm.evaluate.evaluator import Evaluator, FeatureCache, ImageSet, compare

    bb = tiny_backbone()
    data = toy_data(n_per_class=4)
    stats = toy_stats(bb, data)
    images, labels = torch.stack([x for x, _ in data]), torch.tensor([y for _, y in data])
    fixed = ImageSet("fixed", images[::4], labels[::4])

    def drawn(seed):
        picks = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:6]
        return ImageSet("drawn", images[picks], labels[picks])

    config = EvalConfig(mode=("probe", "inherit"), epochs=3, seeds=3, batch=4)
    evaluator = Evaluator(bb, stats, FeatureCache(toy_data(n_per_class=3, seed=5)), config)
    return compare(evaluator, [fixed, drawn], 3, full_data=True, journal=journal)


def _eval_job(rank, world, tmp):
    scores = _toy_evaluation(tmp / "journal2")
    torch.save([dataclasses.asdict(s) for s in scores], tmp / f"scores{rank}.pt")


def _journal(folder):
    entries = {}
    for path in folder.glob("scores*.jsonl"):
        entries.update((e["key"], e["scores"]) for e in map(json.loads, path.read_text().splitlines()))
    return entries


def test_two_rank_evaluation_equals_single_process_and_resumes_on_any_world(tmp_path):
    """Seeds x sets x evaluators dealt over 2 ranks, the test features encoded half by each: every rank
    returns the single process's scores in its order, the two ranks' journals hold the single
    process's entries, and one process resumes from them with nothing redone."""
    from fastsfm.evaluate import evaluator as evaluation

    single = [dataclasses.asdict(s) for s in _toy_evaluation(tmp_path / "journal1")]
    _spawn("_eval_job", tmp_path)
    for rank in (0, 1):
        ranked = torch.load(tmp_path / f"scores{rank}.pt")
        assert [(s["set"], s["mode"], s["seed"]) for s in ranked] == [(s["set"], s["mode"], s["seed"]) for s in single]
        for a, b in zip(ranked, single, strict=True):
            assert a["top1"] == pytest.approx(b["top1"], abs=1e-4) and a["top5"] == pytest.approx(b["top5"], abs=1e-4)
    assert sorted(p.name for p in (tmp_path / "journal2").glob("scores*")) == [
        "scores.rank0.jsonl",
        "scores.rank1.jsonl",
    ]
    one, two = _journal(tmp_path / "journal1"), _journal(tmp_path / "journal2")
    assert one.keys() == two.keys() and len(one) == 6
    with mock.patch.object(evaluation.Evaluator, "evaluate", side_effect=AssertionError("redone")):
        resumed = [dataclasses.asdict(s) for s in _toy_evaluation(tmp_path / "journal2")]
    assert [s["top1"] for s in resumed[:-1]] == [s["top1"] for s in torch.load(tmp_path / "scores0.pt")][:-1]


def _spawn(job, tmp):
    mp.spawn(_worker, args=(2, _free_port(), job, str(tmp)), nprocs=2, join=True)


_TORCHRUN_RANK = """
import os, sys
from fastsfm.distributed import init_from_env, run_on_all, shutdown
init_from_env()
from fastsfm.models.backbones import load_backbone  # timm, imported after the group exists (as the CLI does)
load_backbone("vit_tiny_patch16_224", pretrained=False, image_size=16)
run_on_all(lambda: None)
shutdown()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
open(os.path.join(sys.argv[1], "threads" + os.environ["RANK"]), "w").write(" ".join(sorted(names)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_torchrun_ranks_leave_no_process_group_alive(tmp_path):
    """Under torchrun, after ``shutdown`` no gloo or TCP-store thread is left for Python's
    finalisation to tear down (where it can abort the process after the work is done)."""
    script = tmp_path / "rank.py"
    script.write_text(_TORCHRUN_RANK)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    run = subprocess.run([*cmd, str(tmp_path)], env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in range(2):
        threads = (tmp_path / f"threads{rank}").read_text()
        assert "gloo" not in threads and "tcpstore" not in threads, threads


def test_shard_helpers():
    assert [list(shard_classes(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="cannot shard 2 classes over 3 ranks"):
        shard_classes(2, 0, 3)
    data = list(range(7))
    parts = [torch.tensor([data[i] for i in shard_dataset(data, r, 3).indices]) for r in range(3)]
    assert interleave_shards(parts).tolist() == data


def test_a_failing_rank_makes_every_rank_exit_with_its_error(tmp_path):
    _spawn("_rank0_failure_job", tmp_path)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_a_failing_rank0_grid_cell_ends_every_rank(tmp_path):
    _spawn("_grid_failure_job", tmp_path)
    assert (tmp_path / "grid0").exists() and (tmp_path / "grid1").exists()
    assert (tmp_path / "grid" / "digits" / "test_vit" / "ipc1" / "sfm" / "synset.safetensors").exists()


def test_process_group_loss_equals_single_process(tmp_path):
    _spawn("_loss_job", tmp_path)


def test_distributed_stats_equal_single_process(tmp_path):
    _spawn("_stats_job", tmp_path)
    single = toy_stats(tiny_backbone(), toy_data())
    for rank in range(2):
        got = ClassStats.load(tmp_path / f"stats{rank}.safetensors")
        assert torch.equal(got.counts, single.counts) and got.meta == single.meta
        torch.testing.assert_close(got.means, single.means, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.classifier_weight, single.classifier_weight, rtol=1e-3, atol=1e-4)


def test_multi_backbone_two_rank_statistics_and_objective_equal_single_process(tmp_path):
    _spawn("_multi_backbone_job", tmp_path)
    loader = DataLoader(toy_data(), batch_size=4)
    single = compute_stats_many(_two_backbones(), loader, ["c0", "c1", "c2"], "toy", classifier=TOY_CLASSIFIER)
    for k, want in enumerate(single):
        for rank in range(2):
            got = ClassStats.load(tmp_path / f"stats{k}.rank{rank}.safetensors")
            assert torch.equal(got.counts, want.counts) and got.meta == want.meta
            torch.testing.assert_close(got.means, want.means, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.classifier_weight, want.classifier_weight, rtol=1e-3, atol=1e-4)


def test_two_rank_objective_equals_single_process(tmp_path):
    toy_stats(tiny_backbone(), toy_data()).save(tmp_path / "stats.safetensors")
    _spawn("_objective_job", tmp_path)


def test_distributed_distill_equals_single_process_resumes_and_merges(tmp_path, caplog):
    bb = tiny_backbone()
    toy_stats(bb, toy_data()).save(tmp_path / "stats.safetensors")
    stats = ClassStats.load(tmp_path / "stats.safetensors")
    distill(bb, stats, replace(CFG, steps=3), tmp_path / "one_then_two", progress=False)
    _spawn("_distill_job", tmp_path)
    merged = load_file(str(tmp_path / "direct" / "synset.safetensors"))
    assert merged["labels"].tolist() == [0, 0, 1, 1, 2, 2] and merged["images"].shape == (6, 3, 16, 16)
    single = distill(bb, stats, CFG, tmp_path / "single", progress=False)
    torch.testing.assert_close(merged["images"], single.render(), rtol=0, atol=1e-5)
    assert {p.name for p in (tmp_path / "direct").glob("checkpoint*")} == {
        "checkpoint.rank0of2.safetensors",
        "checkpoint.rank1of2.safetensors",
    }
    # a resume on another world size: the checkpoints' rows resharded to the ranks' classes
    for name in ("one_then_two", "two_then_one"):
        if name == "two_then_one":
            with caplog.at_level(logging.INFO, logger="fastsfm.distill.loop"):
                distill(bb, stats, CFG, tmp_path / name, resume=True, progress=False)
            assert "resuming from 2 checkpoints of another world size, resharded to 1 ranks" in caplog.text
        images = load_file(str(tmp_path / name / "synset.safetensors"))["images"]
        torch.testing.assert_close(images, single.render(), rtol=0, atol=1e-5)
    assert [p.name for p in (tmp_path / "two_then_one").glob("checkpoint*")] == ["checkpoint.safetensors"]
    assert {p.name for p in (tmp_path / "one_then_two").glob("checkpoint*")} == {
        "checkpoint.rank0of2.safetensors",
        "checkpoint.rank1of2.safetensors",
    }
    (tmp_path / "partial").mkdir()
    (tmp_path / "direct" / "checkpoint.rank1of2.safetensors").rename(tmp_path / "partial" / "x")
    with pytest.raises(FileNotFoundError, match="an incomplete set of another world size"):
        distill(bb, stats, CFG, tmp_path / "direct", resume=True, progress=False)
