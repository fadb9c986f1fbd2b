"""The run planner: exact state bytes, the ImageNet-1k IPC 50 cases (computed, nothing allocated), figures
that match measured peaks on a CPU, and runs that cannot fit refused before they write anything."""

import dataclasses
import logging

import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats

from fastsfm.config import DistillConfig
from fastsfm.distill.loop import distill
from fastsfm.distill.objectives import SFMObjective
from fastsfm.distill.optim import ChunkAdam
from fastsfm.distill.plan import (
    GIB,
    HOST_FRACTION,
    HOST_WORKING,
    Machine,
    PlanError,
    StepCost,
    plan_run,
    probe_cost,
    state_bytes,
)
from fastsfm.distill.synset import SyntheticSet
from fastsfm.memory import peak_bytes
from fastsfm.models.backbones import load_backbone

MIB = 2**20
DINOV2_B14 = StepCost(576 * MIB, 92 * MIB, "recorded DINOv2-B/14 probe (bf16, 224 px: 2 images 760 MiB, 6: 1,128)")
IN1K = DistillConfig(ipc=50, resolution=256)
ONE_GPU = Machine("cuda", 80 * GIB, 128 * GIB)
EIGHT_GPUS = Machine("cuda", 80 * GIB, 128 * GIB, ranks=8, local_ranks=8)


def test_state_bytes_per_image_at_256px():
    levels, moments = state_bytes(IN1K)
    assert levels == 4 * 3 * sum(s * s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256)) == 1_048_572
    assert moments == 2 * levels  # fp32
    assert state_bytes(IN1K, "bf16")[1] == levels
    small = 4 * 3 * (1 + 4 + 16)  # 1x1 to 4x4 (<= 48 values per image) stay float32
    eight = 2 * (small + 3 * sum(s * s * (1 + 4 / min(256, 3 * s * s)) for s in (8, 16, 32, 64, 128, 256)))
    assert state_bytes(IN1K, "8bit")[1] == pytest.approx(eight)
    assert 1.5e6 < levels + state_bytes(IN1K, "8bit")[1] < 1.65e6  # ~1.6 MB per image, 79 GB at IPC 50


def test_imagenet1k_ipc50_on_one_80gb_gpu_is_refused_in_fp32_and_planned_in_8bit():
    """The issue's case, computed: fp32 needs 157 GB of state (neither the GPU nor the pinnable host
    holds it): refused with what would fit; 8bit offloaded pins ~79 GB: planned; 8 ranks: resident."""
    refused = plan_run(IN1K, 1000, DINOV2_B14, ONE_GPU)
    assert not refused.feasible and refused.state == pytest.approx(50_000 * 3 * 1_048_572)
    message = refused.message
    assert message.startswith("plan: refused") and "146.5 GiB per rank" in message
    assert "--optimizer-state 8bit (host-pinned" in message and "ranks" in message and "--ipc " in message
    with pytest.raises(PlanError, match="would fit"):
        refused.check()
    offloaded = plan_run(dataclasses.replace(IN1K, offload=True), 1000, DINOV2_B14, ONE_GPU)
    assert not offloaded.feasible and "pinned exceed the host" in offloaded.message
    compact = plan_run(
        dataclasses.replace(IN1K, optimizer_state="8bit"), 1000, DINOV2_B14, ONE_GPU
    )  # placed by the plan
    assert compact.feasible and compact.placement == "host-pinned" and compact.passes == 2
    assert 70 * GIB < compact.pinned < 80 * GIB and compact.device_peak < 0.85 * 80 * GIB
    assert compact.message.startswith("plan: host-pinned") and "passes/step" in compact.message
    assert compact == plan_run(
        dataclasses.replace(IN1K, offload=True, optimizer_state="8bit"), 1000, DINOV2_B14, ONE_GPU
    )
    resident = plan_run(dataclasses.replace(IN1K, offload=False, optimizer_state="8bit"), 1000, DINOV2_B14, ONE_GPU)
    assert not resident.feasible and "; --offload (host-pinned" in resident.message
    eight = plan_run(IN1K, 1000, DINOV2_B14, EIGHT_GPUS)
    assert eight.feasible and eight.placement == "GPU-resident" and eight.images == 125 * 50
    assert 18 * GIB < eight.state < 19 * GIB and 100 < eight.chunk < 6250 and eight.device_peak < 0.85 * 80 * GIB


def test_chunk_is_the_largest_that_fits_and_a_set_that_fits_is_one_chunk():
    small = plan_run(DistillConfig(ipc=1, resolution=256), 100, DINOV2_B14, ONE_GPU)
    assert small.feasible and small.chunk == small.images == 100 and small.passes == 1
    plan = plan_run(IN1K, 1000, DINOV2_B14, EIGHT_GPUS)
    for chunk, fits in ((plan.chunk, True), (plan.chunk + 1, False)):
        forced = plan_run(dataclasses.replace(IN1K, chunk_size=chunk), 1000, DINOV2_B14, EIGHT_GPUS)
        assert (forced.device_peak <= 0.85 * 80 * GIB) == fits or not fits and forced.chunk == plan.chunk


@pytest.fixture(scope="module")
def vit32():
    """ViT-Tiny at 32 px (5 tokens): images whose activations, not fixed transients, make the peak."""
    bb = load_backbone("vit_tiny_patch16_224", pretrained=False, image_size=32, seed=0)
    return bb, toy_stats(bb, toy_data(size=32))


@pytest.mark.parametrize("mode,chunk", [("fp32", None), ("fp32", 5), ("8bit", 5)])
def test_planned_peak_matches_the_measured_step_peak_on_cpu(vit32, mode, chunk):
    """Probed at the first pyramid level, planned for the last, then measured there: the plan's peak
    (state + fixed + chunk x per image) is within 15 % of a real step's (profiler allocation events)."""
    bb, stats = vit32
    config = DistillConfig(ipc=10, resolution=32, pyramid_extent=1, optimizer_state=mode, chunk_size=chunk)
    synset = SyntheticSet(stats.num_classes, 10, 32, extent=1)
    objective = SFMObjective(bb, stats, config, torch.device("cpu"))
    plan = plan_run(config, stats.num_classes, probe_cost(objective, synset), Machine("cpu", 8 * GIB, 8 * GIB))
    assert plan.feasible and plan.chunk == (chunk or synset.num_images)
    objective.chunk_size = plan.chunk
    for step in range(1, len(synset.sizes) + 1):
        synset.grow(step)
    optim = ChunkAdam(synset, 0.01, optimizer_state=mode)
    held = sum(t.numel() * t.element_size() for t in synset.levels) + optim.nbytes()
    assert held == pytest.approx(plan.state)
    objective.step(synset, optim, 0)  # warm: caches of label plans and upsamplers
    optim.finish_step()
    measured = held + peak_bytes(lambda: (objective.step(synset, optim, 1), optim.finish_step()), torch.device("cpu"))
    assert measured == pytest.approx(plan.device_peak, rel=0.15), (measured / 2**20, plan.device_peak / 2**20)


def test_a_run_that_cannot_fit_is_refused_before_it_writes(tmp_path, monkeypatch, caplog):
    bb = tiny_backbone()
    stats = toy_stats(bb, toy_data())
    config = DistillConfig(ipc=2, steps=2, resolution=16, pyramid_extent=1)
    host = (HOST_WORKING + 16 * MIB) / HOST_FRACTION  # 16 MiB beside the loop's working memory
    tiny = Machine("cpu", host, host)
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls, device, ranks=1, local_ranks=None: tiny))
    from fastsfm.distill.objectives import step

    monkeypatch.setattr(step, "probe_cost", lambda objective, synset: StepCost(2 * MIB, 4096, "given"))
    with pytest.raises(PlanError, match=r"plan: refused: IPC 2000 .*would fit: --ipc \d+"):
        distill(bb, stats, dataclasses.replace(config, ipc=2000), tmp_path / "big", progress=False)
    assert not (tmp_path / "big").exists()
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="fastsfm"):
        distill(bb, stats, config, tmp_path / "ok", progress=False)
    assert any(r.getMessage().startswith("plan: host, optimizer_state fp32") for r in caplog.records)


def test_an_unset_offload_is_the_plans_choice(tmp_path, monkeypatch):
    """``offload`` unset: a set that fits the device stays there; one that does not is drawn in host
    memory and offloaded (the plan says so); ``--no-offload`` then refuses."""
    bb = tiny_backbone()
    stats = toy_stats(bb, toy_data())
    config = DistillConfig(ipc=2, steps=1, resolution=16)
    roomy = Machine("cuda", 64 * GIB, 64 * GIB)
    cost = StepCost(0.0, 1e3, "given")
    assert plan_run(config, 3, cost, roomy).placement == "GPU-resident"
    small = dataclasses.replace(roomy, device_bytes=plan_run(config, 3, cost, roomy).state / 0.85 * 0.9)
    assert plan_run(config, 3, cost, small).placement == "host-pinned"
    assert not plan_run(dataclasses.replace(config, offload=False), 3, cost, small).feasible
    from fastsfm.distill import loop

    monkeypatch.setattr(loop, "_plan", lambda *a: plan_run(config, 3, cost, small))
    synset = distill(bb, stats, config, tmp_path / "auto", progress=False)
    assert synset.offload and synset.storage.type == "cpu"
