"""The distillation objectives: exact chunked steps, views, precision, LGM."""

import collections
from dataclasses import replace

import pytest
import torch
from helpers import Recorder, grown_set, tiny_backbone, toy_data, toy_stats

from fastsfm import SFMLoss
from fastsfm.config import DistillConfig
from fastsfm.distill.loop import distill
from fastsfm.distill.objectives import SFMObjective, build_objective
from fastsfm.distill.optim import ChunkAdam
from fastsfm.distill.synset import SyntheticSet

CFG = DistillConfig(ipc=4, resolution=16, views=2, seed=5)


@pytest.fixture(scope="module")
def setup():
    bb = tiny_backbone()
    return bb, toy_stats(bb, toy_data())


@pytest.mark.parametrize(
    "config",
    [CFG, replace(CFG, views=1), replace(CFG, objective="decouple", alpha=0.4), replace(CFG, nontarget_divisor=11.0)],
)
def test_chunked_two_pass_gradient_equals_unchunked(setup, config):
    bb, stats = setup
    results = {}
    for chunk in (None, 5, 1):
        synset = grown_set()
        recorder = Recorder(synset)
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
    synset = grown_set()
    objective = SFMObjective(bb, stats, CFG, "cpu")
    with torch.no_grad():
        feats, _ = objective.features(synset, 0, 12, 3, grad=False)
    assert feats.shape == (2 * 12, bb.feature_dim)
    want = SFMLoss(stats)(feats, synset.labels.repeat(2)).item()
    assert abs(float(objective.step(synset, Recorder(synset), 3)) - want) < 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_gradient_points_the_same_way(setup, precision):
    bb, stats = setup
    grads = {}
    for p in ("fp32", precision):
        backbone = tiny_backbone()
        backbone.precision = p
        synset = grown_set()
        recorder = Recorder(synset)
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


def test_build_objective_errors(setup):
    bb, stats = setup
    with pytest.raises(ValueError, match="LGM needs the real training images"):
        build_objective(replace(CFG, method="lgm"), bb, stats, torch.device("cpu"))
    with pytest.raises(ValueError, match="method must be one of"):
        replace(CFG, method="kip")


def test_steps_return_the_loss_on_the_device_without_finishing_the_optimiser(setup):
    bb, stats = setup
    synset = grown_set()
    optim = ChunkAdam(synset, 0.01)
    loss = SFMObjective(bb, stats, CFG, "cpu").step(synset, optim, 0)
    assert isinstance(loss, torch.Tensor) and loss.shape == () and optim.in_step and optim.steps == 0


def test_chunks_follow_the_plan_or_the_config(setup):
    """Unplanned: one chunk; ``chunk_size``: fixed; a plan sets the chunk unless the config fixed it."""
    bb, stats = setup
    synset = SyntheticSet(3, 4, 16, extent=1)
    objective = SFMObjective(bb, stats, CFG, "cpu")
    assert objective.chunks(synset) == [(0, 12)]
    objective.chunk_size = 5  # what a plan sets
    assert objective.chunks(synset) == [(0, 5), (5, 10), (10, 12)]
    fixed = SFMObjective(bb, stats, replace(CFG, chunk_size=4), "cpu")
    assert fixed.chunks(synset) == [(0, 4), (4, 8), (8, 12)]
    assert fixed.plan(synset, 3).feasible and fixed.chunk_size == 4


@pytest.mark.gpu
def test_cuda_step_has_no_host_synchronisation(setup):
    """After the first step (label plans, image ids, constants cached on the device), a whole chunked
    step -- render, augment, encode, class sums, epilogue, backward, Adam -- queues without waiting."""
    bb, stats = setup
    backbone = tiny_backbone().cuda()
    synset = SyntheticSet(3, 4, 16, extent=1, storage="cuda", seed=1)
    synset.grow(2)
    optim = ChunkAdam(synset, 0.01)
    objective = SFMObjective(backbone, stats.to("cuda"), replace(CFG, chunk_size=5), "cuda")
    float(objective.step(synset, optim, 0))
    optim.finish_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = objective.step(synset, optim, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.gpu
def test_cuda_chunk_probe_runs_a_fitting_set_in_one_chunk(setup):
    bb, stats = setup
    synset = SyntheticSet(3, 4, 16, extent=1, storage="cuda")
    objective = SFMObjective(tiny_backbone().cuda(), stats.to("cuda"), CFG, "cuda")
    plan = objective.plan(synset, 3)
    assert plan.feasible and plan.passes == 1 and objective.chunks(synset) == [(0, 12)]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precision_policy_under_autocast(setup, precision):
    """bf16, and fp16 with its x1024 loss scale, give gradients that point as fp32's do, on CUDA."""
    _, stats = setup
    grads = {}
    for p in ("fp32", precision):
        backbone = tiny_backbone().cuda()
        backbone.precision = p
        synset = SyntheticSet(3, 4, 16, extent=1, storage="cuda", seed=1)
        synset.grow(2)
        recorder = Recorder(synset)
        objective = SFMObjective(backbone, stats.to("cuda"), CFG, "cuda")
        assert objective.scale == (1024.0 if p == "fp16" else 1.0)
        objective.step(synset, recorder, 0)
        grads[p] = torch.cat([g.flatten() for g in recorder.grads])
    assert torch.isfinite(grads[precision]).all()
    assert torch.nn.functional.cosine_similarity(grads["fp32"], grads[precision], dim=0) > 0.98


ATOMIC_OPS = (
    "grid_sampler_2d_backward",
    "upsample_bilinear2d_backward",
    "index_add",
    "index_put",
    "_index_put_impl",
    "scatter_add",
    "embedding_dense_backward",
)
"""aten ops whose CUDA kernels accumulate with float atomics (nondeterministic, slow when many
writes meet one address)."""


def _step_census(backbone, classes: int, ipc: int, views: int) -> collections.Counter:
    """aten ops of one SFM step (render, augment, backbone, Triton loss under the interpreter,
    backward, Adam) after a warm-up step, counted by a ``TorchDispatchMode``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastsfm.bench.timing import distill_setup, run_step

    class Census(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.name()] += 1
            return func(*args, **(kwargs or {}))

    config = DistillConfig(ipc=ipc, resolution=16, views=views, seed=1)
    synset, optim, objective = distill_setup(backbone, config, classes, torch.device("cpu"))
    objective.backend = "triton"  # the CUDA step's loss path, in Triton's interpreter
    run_step(objective, synset, optim, 0)
    with Census() as census:
        run_step(objective, synset, optim, 1)
    return census.ops


def test_step_op_budget_is_constant_and_free_of_atomic_ops(setup):
    """One step's aten ops do not grow with C, IPC or the number of views, one view makes no
    repeat copy, and no op whose CUDA kernel accumulates with atomics runs in a step."""
    bb, _ = setup
    base = _step_census(bb, 3, 1, 1)
    assert sum(_step_census(bb, 7, 3, 1).values()) == sum(base.values())
    assert sum(_step_census(bb, 3, 1, 2).values()) == sum(_step_census(bb, 5, 2, 4).values())
    assert "aten::repeat" not in base
    atomic = [op for op in base if any(op.split("::")[-1].split(".")[0].startswith(a) for a in ATOMIC_OPS)]
    assert not atomic, atomic
