"""The CUDA-graph step (``cuda_graph``): its device-side step number gives the eager step's draws (CPU),
it refuses what it cannot replay, its stream and in-step bookkeeping (CPU, CUDA stubbed), and on a GPU
a graphed distillation equals the eager one."""

import gc
import weakref
from dataclasses import replace

import pytest
import torch
from helpers import FakeCuda, Recorder, grown_set, tiny_backbone, toy_data, toy_stats

from fastsfm import rng
from fastsfm.config import DistillConfig
from fastsfm.distill.loop import distill
from fastsfm.distill.objectives import GraphedStep, SFMObjective, build_objective
from fastsfm.distill.optim import ChunkAdam

CFG = DistillConfig(ipc=2, steps=7, lr=0.05, resolution=16, pyramid_extent=2, checkpoint_every=7)


@pytest.fixture(scope="module")
def setup():
    bb = tiny_backbone()
    return bb, toy_stats(bb, toy_data())


def test_a_tensor_step_number_gives_the_int_steps_keys_and_step():
    ids = torch.arange(7) * 3
    for step in (0, 5, 4999):
        assert torch.equal(rng.augment_keys(11, torch.tensor(step), 2, ids), rng.augment_keys(11, step, 2, ids))
    assert not torch.equal(rng.augment_keys(11, torch.tensor(5), 2, ids), rng.augment_keys(11, 6, 2, ids))
    bb = tiny_backbone()
    stats = toy_stats(bb, toy_data())
    objective = SFMObjective(bb, stats, DistillConfig(ipc=4, resolution=16, seed=5), torch.device("cpu"))
    synset = grown_set()
    by_int, by_tensor = Recorder(synset), Recorder(synset)
    loss = objective.step(synset, by_int, 3)
    assert torch.equal(objective.step(synset, by_tensor, torch.tensor(3)), loss)
    for a, b in zip(by_int.grads, by_tensor.grads, strict=True):
        assert torch.equal(a, b)


def test_cuda_graph_option_refuses_what_it_cannot_replay_and_runs_eagerly_on_cpu(setup, tmp_path):
    with pytest.raises(ValueError, match="cuda_graph replays SFM steps"):
        DistillConfig(cuda_graph=True, method="lgm")
    with pytest.raises(ValueError, match="cuda_graph replays SFM steps"):
        DistillConfig(cuda_graph=True, offload=True)
    bb, stats = setup
    graphed_config = replace(CFG, cuda_graph=True)
    objective = build_objective(graphed_config, bb, stats, torch.device("cpu"))
    assert isinstance(objective, GraphedStep) and objective.backbone is bb
    eager = distill(bb, stats, CFG, tmp_path / "eager", progress=False)
    graphed = distill(bb, stats, graphed_config, tmp_path / "graphed", progress=False, objective=objective)
    assert objective.captures == 0  # no CUDA: the wrapped step ran eagerly, with the same result
    for a, b in zip(eager.levels, graphed.levels, strict=True):
        assert torch.equal(a, b)
    resumed = distill(bb, stats, CFG, tmp_path / "graphed", resume=True, progress=False)  # an execution choice
    assert len(resumed.levels) == len(eager.levels)


def test_graphed_step_makes_one_side_stream_per_graph_and_replays_in_step(setup, monkeypatch):
    """Two warm-ups then a capture on the same side stream, one stream per graph key (a growth makes a
    new one), and the optimiser is in-step while a replay runs (a Ctrl-C then writes no checkpoint one
    step off) until the loop's finish_step."""
    bb, stats = setup
    synset = grown_set(classes=stats.num_classes, ipc=2)
    optim = ChunkAdam(synset, lr=0.01)
    fake = FakeCuda(optim, monkeypatch)
    objective = GraphedStep(SFMObjective(bb, stats, replace(CFG, resolution=16), torch.device("cpu")))
    monkeypatch.setattr(objective, "_graphable", lambda synset, optim: True)
    inner_step = objective.inner.step

    def recorded(synset, optim, number):
        fake.warmups.append(fake.current)
        return inner_step(synset, optim, number)

    monkeypatch.setattr(objective.inner, "step", recorded)
    side_streams = []
    for step in range(8):
        if step == 5:
            synset.grow(step)  # a new level count: a new graph key
            optim.reset()
        made = len(fake.made)
        objective.step(synset, optim, step)
        side_streams += fake.made[made:][:1] if step in (0, 5) else []
        optim.finish_step()
        assert not optim.in_step
    assert objective.captures == 2 and fake.replays == [True] * 4  # steps 2-4 and 7; in-step at each replay
    # the current-stream calls make throwaway fakes; the side streams are the ones used by warm-up and capture
    assert fake.warmups[:2] == [side_streams[0]] * 2 and fake.warmups[3:5] == [side_streams[1]] * 2
    assert fake.captures == side_streams
    graph = weakref.ref(objective._graph)
    objective.release()  # what a benchmark does between sections: nothing keeps the graph (its pool)
    gc.collect()
    assert graph() is None and objective._loss is None and objective._side is None


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 2])
def test_graphed_distillation_equals_eager_on_cuda(setup, tmp_path, chunk):
    """Steps across two pyramid growths (three level counts, each 2 warm-up steps then a capture: three
    captures), whole or chunked; bf16."""
    _, stats = setup
    bb = tiny_backbone().cuda()
    bb.precision = "bf16"
    config = replace(CFG, chunk_size=chunk, steps=10, pyramid_extent=3)  # levels grow at steps 4 and 7
    eager = distill(bb, stats, config, tmp_path / "eager", device="cuda", progress=False)
    objective = build_objective(replace(config, cuda_graph=True), bb, stats.to("cuda"), torch.device("cuda"))
    graphed = distill(
        bb,
        stats,
        replace(config, cuda_graph=True),
        tmp_path / "graphed",
        device="cuda",
        progress=False,
        objective=objective,
    )
    assert objective.captures == 3
    for a, b in zip(eager.levels, graphed.levels, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    losses = [tmp_path / name / "metrics.jsonl" for name in ("eager", "graphed")]
    assert losses[0].read_text().count("loss") == losses[1].read_text().count("loss") == config.steps
