"""The CUDA-graph step (``cuda_graph``): its device-side step number gives the eager step's draws (CPU),
it refuses what it cannot replay, and on a GPU a graphed distillation equals the eager one."""

from dataclasses import replace

import pytest
import torch
from helpers import Recorder, grown_set, tiny_backbone, toy_data, toy_stats

from fastsfm import rng
from fastsfm.config import DistillConfig
from fastsfm.distill.loop import distill
from fastsfm.distill.objectives import GraphedStep, SFMObjective, build_objective

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
