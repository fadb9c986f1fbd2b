"""The distillation loop: determinism, resume after interrupts and signals, checkpoints, metrics, progress."""

import json
import os
import shutil
import signal
from dataclasses import replace

import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats

from fastsfm.distill.checkpoint import CheckpointError, load_checkpoint
from fastsfm.distill.loop import DistillConfig, distill
from fastsfm.distill.objectives import SFMObjective

CFG = DistillConfig(ipc=2, steps=6, lr=0.05, resolution=16, pyramid_extent=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def setup():
    bb = tiny_backbone()
    return bb, toy_stats(bb, toy_data())


def _levels(s):
    return [p.detach().clone() for p in s.levels]


def _assert_same(a, b):
    for x, y in zip(_levels(a), _levels(b), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_same_seed_same_result_and_outputs(setup, tmp_path):
    bb, stats = setup
    a = distill(bb, stats, CFG, tmp_path / "a", progress=False)
    b = distill(bb, stats, CFG, tmp_path / "b", progress=False)
    assert len(a.levels) == 3  # grew at steps 3 and 5 (the authors' extent + 1, 2 extent + 1)
    _assert_same(a, b)
    for name in ("synset.png", "synset.safetensors", "loss.png", "metrics.jsonl", "checkpoint.safetensors"):
        assert (tmp_path / "a" / name).exists(), name
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(6)) and [m["levels"] for m in lines] == [1, 1, 1, 2, 2, 3]
    assert all(m["loss"] >= 0 and m["step_s"] > 0 and "peak_mib" in m for m in lines)
    assert not torch.equal(
        _levels(a)[0], _levels(distill(bb, stats, replace(CFG, seed=1), tmp_path / "c", progress=False))[0]
    )


class _Interrupt:
    """Wraps an objective and, on its k-th call, raises KeyboardInterrupt or sends itself a signal."""

    def __init__(self, inner, at, signum=None):
        self.inner, self.at, self.signum, self.calls = inner, at, signum, 0

    def step(self, synset, optim, step):
        if self.calls == self.at and self.signum is None:
            raise KeyboardInterrupt
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)  # handled between steps: this step still completes
        self.calls += 1
        return self.inner.step(synset, optim, step)


def _full_and_interrupted(setup, tmp_path, wrapper):
    """The uninterrupted run in ``full/`` and a run into ``cut/`` whose objective ``wrapper`` stops at step 4."""
    bb, stats = setup
    full = distill(bb, stats, CFG, tmp_path / "full", progress=False)
    inner = SFMObjective(bb, stats, CFG, torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt):
        distill(bb, stats, CFG, tmp_path / "cut", objective=wrapper(inner, 4), progress=False)
    return full


def test_resume_after_ctrl_c_equals_uninterrupted(setup, tmp_path):
    bb, stats = setup
    full = _full_and_interrupted(setup, tmp_path, _Interrupt)
    with pytest.raises(FileExistsError, match="--resume"):
        distill(bb, stats, CFG, tmp_path / "cut", progress=False)
    resumed = distill(bb, stats, CFG, tmp_path / "cut", resume=True, progress=False)
    _assert_same(full, resumed)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))  # every step once, though step 3 ran before the interrupt too


@pytest.mark.parametrize("mode", ["bf16", "8bit"])
def test_compact_optimizer_state_resumes_exactly_and_is_part_of_the_identity(setup, tmp_path, mode):
    """A run with compact Adam moments resumes bit for bit from a Ctrl-C; a checkpoint of one mode does not
    resume another."""
    bb, stats = setup
    config = replace(CFG, resolution=32, optimizer_state=mode)  # 32 px: the finest levels are quantised
    full = distill(bb, stats, config, tmp_path / "full", progress=False)
    inner = SFMObjective(bb, stats, config, torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt):
        distill(bb, stats, config, tmp_path / "cut", objective=_Interrupt(inner, 4), progress=False)
    _assert_same(full, distill(bb, stats, config, tmp_path / "cut", resume=True, progress=False))
    with pytest.raises(CheckpointError, match="optimizer_state"):
        distill(bb, stats, replace(config, optimizer_state="fp32", steps=8), tmp_path / "cut", resume=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_checkpoints_the_step_and_exits_with_its_status(setup, tmp_path, signum):
    bb, stats = setup
    full = distill(bb, stats, CFG, tmp_path / "full", progress=False)
    inner = SFMObjective(bb, stats, CFG, torch.device("cpu"))
    with pytest.raises(SystemExit) as exc:
        distill(bb, stats, CFG, tmp_path / "cut", objective=_Interrupt(inner, 1, signum), progress=False)
    assert exc.value.code == 128 + signum
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    resumed = distill(bb, stats, CFG, tmp_path / "cut", resume=True, progress=False)
    _assert_same(full, resumed)


def test_resume_extends_steps_and_rejects_other_runs(setup, tmp_path):
    bb, stats = setup
    distill(bb, stats, replace(CFG, steps=3), tmp_path / "r", progress=False)
    distill(bb, stats, replace(CFG, steps=3), tmp_path / "r2", progress=False)
    longer = distill(bb, stats, CFG, tmp_path / "r", resume=True, progress=False)
    full = distill(bb, stats, CFG, tmp_path / "f", progress=False)
    _assert_same(full, longer)
    # chunking is an execution choice: a run may resume with another chunk size (same images up to
    # float32 rounding: batched matrix products -- the crop, the render -- of other batch sizes may sum
    # in another order; measured up to 1.2e-6 after the Adam steps)
    rechunked = distill(bb, stats, replace(CFG, chunk_size=1), tmp_path / "r2", resume=True, progress=False)
    for x, y in zip(_levels(full), _levels(rechunked), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="another run"):
        distill(bb, stats, replace(CFG, lr=0.1), tmp_path / "r", resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        distill(bb, stats, CFG, tmp_path / "none", resume=True, progress=False)


def test_corrupt_checkpoint_is_a_clear_error_and_untouched(setup, tmp_path):
    bb, stats = setup
    run = tmp_path / "c"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        distill(bb, stats, CFG, run, resume=True, progress=False)
    assert (run / "checkpoint.safetensors").read_bytes() == b"\x00garbage"


def test_stats_of_another_backbone_are_refused(setup, tmp_path):
    _, stats = setup
    with pytest.raises(ValueError, match="computed with backbone"):
        distill(tiny_backbone(seed=9), stats, CFG, tmp_path / "x", progress=False)


def test_non_finite_loss_stops_with_a_clear_error(setup, tmp_path):
    bb, stats = setup

    class Nan:
        def step(self, synset, optim, step):
            return float("nan") if step == 4 else 0.5

    with pytest.raises(FloatingPointError, match="the loss became nan at step 4.*checkpoint of step 3 is kept"):
        distill(bb, stats, CFG, tmp_path / "n", objective=Nan(), progress=False)


def test_real_init_and_lgm_need_real_images(setup, tmp_path):
    bb, stats = setup
    with pytest.raises(ValueError, match="init='real' needs the real training images"):
        distill(bb, stats, replace(CFG, init="real"), tmp_path / "i", progress=False)
    s = distill(
        bb, stats, replace(CFG, init="real", param="pixels", steps=1), tmp_path / "r", real=toy_data(), progress=False
    )
    assert s.render().shape == (6, 3, 16, 16)
    lgm = distill(
        bb, stats, replace(CFG, method="lgm", views=2, steps=2), tmp_path / "l", real=toy_data(), progress=False
    )
    assert lgm.render().shape == (6, 3, 16, 16)


class _LossNeverReadBack:
    """The step's chunks are applied, but reading its loss back is interrupted (a Ctrl-C while the
    host waits for the GPU): the loop must not count the step, nor checkpoint it as done."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def step(self, synset, optim, step):
        loss = self.inner.step(synset, optim, step)
        self.calls += 1
        return _Interrupting() if self.calls - 1 == self.at else loss


class _Interrupting:
    def __float__(self):
        raise KeyboardInterrupt


def test_interrupt_between_the_chunks_and_the_loss_readback_resumes_exactly(setup, tmp_path):
    bb, stats = setup
    full = _full_and_interrupted(setup, tmp_path, _LossNeverReadBack)
    identity = DistillConfig.identity(CFG) | _run_ids(bb, stats)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors", identity)
    assert saved["step"] == 3  # the last regular checkpoint; step 4 ran but was never counted
    resumed = distill(bb, stats, CFG, tmp_path / "cut", resume=True, progress=False)
    _assert_same(full, resumed)


def _run_ids(bb, stats):
    return {
        "precision": json.dumps(bb.precision),
        "stats_backbone": stats.meta.get("backbone", ""),
        "stats_dataset": stats.meta.get("dataset", ""),
        "world_size": "1",
    }


def test_checkpoints_by_time_as_well_as_steps_and_a_full_disk_is_refused(setup, tmp_path, monkeypatch):
    """``checkpoint_minutes``: a checkpoint as soon as that much time passed since the last, whatever
    ``checkpoint_every`` says (an execution choice: a resume ignores it); a checkpoint that the disk
    cannot hold is refused before writing, with the room it needs, and the last one is kept."""
    from fastsfm.distill import loop

    bb, stats = setup
    steps = []
    save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda p, t, step, *a: steps.append(step) or save(p, t, step, *a))
    distill(bb, stats, replace(CFG, checkpoint_every=100, checkpoint_minutes=0.0), tmp_path / "t", progress=False)
    assert steps == [1, 2, 3, 4, 5, 6]  # every step is 0 minutes after the last save
    steps.clear()
    distill(bb, stats, replace(CFG, checkpoint_every=100), tmp_path / "s", progress=False)
    assert steps == [6]  # 30 minutes never pass: only the last step
    kept = (tmp_path / "t" / "checkpoint.safetensors").read_bytes()
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=10 * 2**20))
    with pytest.raises(OSError, match=r"not enough free space to write .*checkpoint.safetensors: needs 0\.\d+ GiB"):
        distill(bb, stats, replace(CFG, steps=8), tmp_path / "t", resume=True, progress=False)
    assert (tmp_path / "t" / "checkpoint.safetensors").read_bytes() == kept
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        DistillConfig(checkpoint_minutes=-1)
