"""The distillation loop: determinism, resume after interrupt, checkpoints, LGM."""

from dataclasses import replace

import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats

from fastsfm.augment import SinglePassAugment
from fastsfm.baselines.lgm import LGMObjective, lgm_loss, linear_ce_grad
from fastsfm.checkpoint import CheckpointError
from fastsfm.distill import DistillConfig, SFMObjective, distill

CFG = DistillConfig(ipc=2, steps=6, lr=0.05, resolution=16, pyramid_extent=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def setup():
    bb = tiny_backbone()
    return bb, toy_stats(bb, toy_data())


def _levels(s):
    return [p.detach().clone() for p in s.levels]


def test_same_seed_same_result_and_outputs(setup, tmp_path):
    bb, stats = setup
    a = distill(bb, stats, CFG, tmp_path / "a", progress=False)
    b = distill(bb, stats, CFG, tmp_path / "b", progress=False)
    assert len(a.levels) == 3  # grew at steps 2 and 4
    for x, y in zip(_levels(a), _levels(b), strict=True):
        assert torch.equal(x, y)
    assert (tmp_path / "a" / "synset.png").exists() and (tmp_path / "a" / "synset.safetensors").exists()


class _Interrupt:
    """Wraps an objective and raises KeyboardInterrupt on its k-th call."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def backward(self, images, labels):
        if self.calls == self.at:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner.backward(images, labels)


def test_resume_after_interrupt_equals_uninterrupted(setup, tmp_path):
    bb, stats = setup
    full = distill(bb, stats, CFG, tmp_path / "full", progress=False)
    inner = SFMObjective(bb, stats, SinglePassAugment(bb.input_size), CFG)
    with pytest.raises(KeyboardInterrupt):
        distill(bb, stats, CFG, tmp_path / "cut", objective=_Interrupt(inner, 4), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        distill(bb, stats, CFG, tmp_path / "cut", progress=False)
    resumed = distill(bb, stats, CFG, tmp_path / "cut", resume=True, progress=False)
    for x, y in zip(_levels(full), _levels(resumed), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_resume_extends_steps_and_rejects_other_runs(setup, tmp_path):
    bb, stats = setup
    distill(bb, stats, replace(CFG, steps=3), tmp_path / "r", progress=False)
    longer = distill(bb, stats, CFG, tmp_path / "r", resume=True, progress=False)
    full = distill(bb, stats, CFG, tmp_path / "f", progress=False)
    for x, y in zip(_levels(full), _levels(longer), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
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


def test_linear_ce_grad_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (7,), generator=gen)
    w = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(f @ w.T + b, y)
    gw, gb = torch.autograd.grad(ce, (w, b), create_graph=True)
    want = torch.cat([gw.flatten(), gb])
    torch.testing.assert_close(linear_ce_grad(f, y, w, b), want)
    # and the bi-level gradient (through the synthetic gradient into the features)
    g_real = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    direct = 1 - torch.nn.functional.cosine_similarity(g_real, want, dim=0)
    (df_direct,) = torch.autograd.grad(direct, f, retain_graph=True)
    ours = 1 - torch.nn.functional.cosine_similarity(g_real, linear_ce_grad(f, y, w, b), dim=0)
    (df_ours,) = torch.autograd.grad(ours, f)
    torch.testing.assert_close(df_ours, df_direct)
    assert 0 <= lgm_loss(f, y, f, y, w, b).item() < 1e-12  # identical batches: cosine 1


def test_lgm_runs_through_the_shared_loop(setup, tmp_path):
    bb, stats = setup
    cfg = replace(CFG, method="lgm", lgm_augs=2, steps=2)
    obj = LGMObjective.from_dataset(bb, toy_data(), 3, cfg)
    s = distill(bb, stats, cfg, tmp_path / "lgm", objective=obj, progress=False)
    assert s.render().shape == (6, 3, 16, 16)
