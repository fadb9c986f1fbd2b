"""The distillation objectives: exact chunked steps, views, precision, LGM."""

from dataclasses import replace

import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats

from fastsfm import SFMLoss
from fastsfm.baselines.lgm import LGMObjective, lgm_loss, linear_ce_grad
from fastsfm.config import DistillConfig
from fastsfm.distill import build_objective, distill
from fastsfm.objective import SFMObjective
from fastsfm.synset import SyntheticSet

CFG = DistillConfig(ipc=4, resolution=16, views=2, seed=5)


@pytest.fixture(scope="module")
def setup():
    bb = tiny_backbone()
    return bb, toy_stats(bb, toy_data())


class _Recorder:
    """Stands in for ChunkAdam: keeps each chunk's gradients instead of stepping."""

    def __init__(self, synset):
        self.grads = [torch.zeros_like(level) for level in synset.levels]
        self.chunks = []

    def step_chunk(self, start, stop, params, grad_scale=1.0):
        self.chunks.append((start, stop))
        for full, p in zip(self.grads, params, strict=True):
            full[start:stop] = p.grad * grad_scale

    def finish_step(self):
        pass


def _set(seed=1):
    synset = SyntheticSet(3, 4, 16, extent=1, seed=seed)
    for step in range(1, 4):
        synset.grow(step)
    return synset


@pytest.mark.parametrize(
    "config",
    [CFG, replace(CFG, views=1), replace(CFG, objective="decouple", alpha=0.4), replace(CFG, nontarget_divisor=11.0)],
)
def test_chunked_two_pass_gradient_equals_unchunked(setup, config):
    bb, stats = setup
    results = {}
    for chunk in (None, 5, 1):
        synset = _set()
        recorder = _Recorder(synset)
        objective = SFMObjective(bb, stats, replace(config, chunk_size=chunk), "cpu")
        loss = float(objective.step(synset, recorder, step=7))
        results[chunk] = (loss, recorder)
    assert results[None][1].chunks == [(0, 12)] and results[5][1].chunks == [(0, 5), (5, 10), (10, 12)]
    for chunk in (5, 1):
        assert abs(results[chunk][0] - results[None][0]) < 1e-6
        for a, b in zip(results[chunk][1].grads, results[None][1].grads, strict=True):
            assert (a - b).abs().max() <= 1e-6
    assert any(g.abs().max() > 1e-4 for g in results[None][1].grads)


def test_step_loss_is_sfm_loss_of_the_augmented_views(setup):
    bb, stats = setup
    synset = _set()
    objective = SFMObjective(bb, stats, CFG, "cpu")
    with torch.no_grad():
        feats, _ = objective.features(synset, 0, 12, 3, grad=False)
    assert feats.shape == (2 * 12, bb.feature_dim)
    want = SFMLoss(stats)(feats, synset.labels.repeat(2)).item()
    assert abs(float(objective.step(synset, _Recorder(synset), 3)) - want) < 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_gradient_points_the_same_way(setup, precision):
    bb, stats = setup
    grads = {}
    for p in ("fp32", precision):
        backbone = tiny_backbone()
        backbone.precision = p
        synset = _set()
        recorder = _Recorder(synset)
        objective = SFMObjective(backbone, stats, CFG, "cpu")
        assert objective.scale == (1024.0 if p == "fp16" else 1.0)
        objective.step(synset, recorder, 0)
        grads[p] = torch.cat([g.flatten() for g in recorder.grads])
    assert torch.isfinite(grads[precision]).all()
    assert torch.nn.functional.cosine_similarity(grads["fp32"], grads[precision], dim=0) > 0.98


def test_offloaded_chunked_distillation_equals_resident(setup, tmp_path):
    bb, stats = setup
    cfg = replace(CFG, steps=4, pyramid_extent=2, lr=0.05, checkpoint_every=10)
    resident = distill(bb, stats, cfg, tmp_path / "a", progress=False)
    offloaded = distill(bb, stats, replace(cfg, chunk_size=5, offload=True), tmp_path / "b", progress=False)
    assert offloaded.offload and len(resident.levels) == 2
    for a, b in zip(resident.levels, offloaded.levels, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


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


def test_lgm_objective_is_a_function_of_seed_and_step(setup):
    bb, stats = setup
    cfg = replace(CFG, method="lgm", views=2)
    losses = []
    for order in ((0, 1, 2), (2,)):  # a fresh objective jumping to step 2 (a resume) sees the same batch
        objective = build_objective(cfg, bb, stats, torch.device("cpu"), real=toy_data())
        assert isinstance(objective, LGMObjective)
        for step in order:
            synset = _set()
            loss = float(objective.step(synset, _Recorder(synset), step))
        losses.append(loss)
    assert losses[0] == losses[1]


def test_build_objective_errors(setup):
    bb, stats = setup
    with pytest.raises(ValueError, match="LGM needs the real training images"):
        build_objective(replace(CFG, method="lgm"), bb, stats, torch.device("cpu"))
    with pytest.raises(ValueError, match="method must be one of"):
        replace(CFG, method="kip")
