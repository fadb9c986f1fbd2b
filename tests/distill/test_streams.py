"""An offloaded set's chunks stream through upload/download streams in the resident path's order of work:
each next chunk's upload is issued before the current chunk's compute, each write-back after its
optimiser step, and the images are the resident run's bit for bit."""

from dataclasses import replace

import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats

from fastsfm.config import DistillConfig
from fastsfm.distill.objectives import SFMObjective
from fastsfm.distill.optim import ChunkAdam
from fastsfm.distill.synset import SyntheticSet

CFG = DistillConfig(ipc=4, resolution=16, chunk_size=5, pyramid_extent=1)


@pytest.fixture(scope="module")
def setup():
    bb = tiny_backbone()
    return bb, toy_stats(bb, toy_data())


def _logged_steps(setup, offload: bool, mode: str, steps: int = 2):
    """Two steps with every forward, backward, optimiser step and copy logged in one list, in issue order."""
    bb, stats = setup
    config = replace(CFG, offload=offload, optimizer_state=mode)
    synset = SyntheticSet(3, 4, 16, extent=1, offload=offload, seed=2)
    for step in range(1, 5):
        synset.grow(step)
    optim = ChunkAdam(synset, 0.05, optimizer_state=mode)
    objective = SFMObjective(bb, stats, config, torch.device("cpu"))
    log = []
    features, backward, step_chunk = objective.features, objective.backward, optim.step_chunk

    def logged_features(synset, start, stop, step, grad, params=None):
        log.append(("forward", start))
        return features(synset, start, stop, step, grad, params)

    def logged_backward(feats, rows, grad):
        log.append(("backward", None))
        return backward(feats, rows, grad)

    def logged_step_chunk(start, stop, params, grad_scale=1.0, moments=None, streams=None):
        log.append(("optimizer", start))
        assert (moments is not None) == offload  # offloaded: the moments came through the upload stream
        return step_chunk(start, stop, params, grad_scale, moments, streams)

    objective.features, objective.backward, optim.step_chunk = logged_features, logged_backward, logged_step_chunk
    if offload:
        objective._streams(synset).events = log
    for step in range(steps):
        objective.step(synset, optim, step)
        optim.finish_step()
    return log, synset, optim


@pytest.mark.parametrize("mode", ["fp32", "8bit"])
def test_offloaded_chunks_stream_in_the_resident_order_and_give_the_same_images(setup, mode):
    resident, kept, kept_optim = _logged_steps(setup, False, mode)
    offloaded, moved, moved_optim = _logged_steps(setup, True, mode)
    copies = ("upload", "take", "download", "finish")
    assert [e for e in offloaded if e[0] not in copies] == resident  # the same work in the same order
    one_step = offloaded[: offloaded.index(("finish", None)) + 1]
    expected = [("upload", (1, 0))]
    items = [(p, start) for p in (1, 2) for start in (0, 5, 10)]
    for k, item in enumerate(items):
        expected += [("upload", items[k + 1])] if k + 1 < len(items) else []  # the next chunk, before this one's work
        expected += [("take", item), ("forward", item[1])]
        expected += [("backward", None), ("optimizer", item[1]), ("download", ("write-back", item[1]))] * (item[0] == 2)
    assert one_step == expected + [("finish", None)]
    for a, b in zip(kept.levels, moved.levels, strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(kept_optim.state()[k], moved_optim.state()[k]) for k in kept_optim.state())
