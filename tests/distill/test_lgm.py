"""The LGM baseline objective: its closed-form head gradient against autograd, its exact two-pass
chunks against one graph and against the literal double backward, its real batches drawn per epoch."""

from dataclasses import replace

import pytest
import torch
from helpers import Recorder, grown_set, tiny_backbone, toy_data, toy_stats

from fastsfm import rng
from fastsfm.config import DistillConfig
from fastsfm.distill.objectives import build_objective
from fastsfm.distill.objectives.lgm import LGMObjective, RealBatches, lgm_loss, linear_ce_grad

CFG = DistillConfig(method="lgm", ipc=4, resolution=16, views=2, seed=5)


@pytest.fixture(scope="module")
def setup():
    bb = tiny_backbone()
    return bb, toy_stats(bb, toy_data())


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
    cfg = CFG
    losses = []
    for order in ((0, 1, 2), (2,)):  # a fresh objective jumping to step 2 (a resume) sees the same batch
        objective = build_objective(cfg, bb, stats, torch.device("cpu"), real=toy_data(10))
        assert isinstance(objective, LGMObjective)
        for step in order:
            synset = grown_set()
            loss = float(objective.step(synset, Recorder(synset), step))
        losses.append(loss)
    assert losses[0] == losses[1]


def test_chunked_lgm_step_equals_one_graph_and_the_double_backward(setup):
    """Chunks of 5 and 1 images give the one-graph step's loss and gradients; the one-graph step equals
    the literal bi-level computation (LGM's double backward through the synthetic head gradient)."""
    bb, stats = setup
    real = toy_data(10)
    results = {}
    for chunk in (None, 5, 1):
        synset = grown_set()
        recorder = Recorder(synset)
        objective = build_objective(replace(CFG, chunk_size=chunk), bb, stats, torch.device("cpu"), real=real)
        results[chunk] = (float(objective.step(synset, recorder, 3)), recorder.grads)
    for chunk in (5, 1):
        assert abs(results[chunk][0] - results[None][0]) < 1e-6
        for a, b in zip(results[chunk][1], results[None][1], strict=True):
            assert (a - b).abs().max() <= 1e-6 * max(1.0, b.abs().max().item())
    # the literal computation: the same batch, keys and head, one autograd graph, create_graph double backward
    synset = grown_set()
    objective = build_objective(CFG, bb, stats, torch.device("cpu"), real=real)
    objective.begin(synset, 3)
    batch = objective.sampler.batch_indices(3)
    images = torch.stack([real[int(i)][0] for i in batch])
    labels = torch.stack([real[int(i)][1] for i in batch])
    keys = rng.derive(rng.derive(CFG.seed, rng.REAL_STREAM, 3), torch.arange(len(batch)))
    with torch.no_grad():
        real_f = bb(objective.augment(images, keys))
    params = synset.chunk(0, 12, "cpu", requires_grad=True)
    crops = objective.augment(
        synset.render_levels(params).repeat(2, 1, 1, 1), rng.augment_keys(CFG.seed, 3, 2, synset.image_ids)
    )
    weight, bias = objective.weight.clone().requires_grad_(), objective.bias.clone().requires_grad_()
    syn_f = bb(crops)
    g_syn = torch.autograd.grad(
        torch.nn.functional.cross_entropy(syn_f @ weight.T + bias, synset.labels.repeat(2)),
        (weight, bias),
        create_graph=True,
    )
    g_real = linear_ce_grad(real_f, labels, objective.weight, objective.bias)
    loss = 1 - torch.nn.functional.cosine_similarity(g_real, torch.cat([g_syn[0].flatten(), g_syn[1]]), dim=0)
    loss.backward()
    assert abs(loss.item() - results[None][0]) < 1e-6
    for p, g in zip(params, results[None][1], strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6 * g.abs().max().item())


def test_real_batches_are_drawn_per_epoch_without_replacement():
    """LGM's shuffled loader with drop_last: every epoch is a permutation cut into whole batches, its
    last partial batch dropped -- no batch holds an image twice, none crosses an epoch."""
    sampler = RealBatches(size=10, batch=4, piece=3, seed=0)
    batches = [sampler.batch_indices(s) for s in range(6)]  # two batches per epoch: three epochs
    for epoch in range(3):
        seen = torch.cat(batches[2 * epoch : 2 * epoch + 2]).tolist()
        assert len(set(seen)) == 8 and set(seen) <= set(range(10))
    assert not torch.equal(batches[0], batches[2])
    wide = RealBatches(size=40, batch=36, piece=36, seed=0)  # the case: 40 images, batches of 36
    assert all(len(set(wide.batch_indices(s).tolist())) == 36 for s in range(200))
    with pytest.raises(ValueError, match="larger than the 10 real images"):
        RealBatches(size=10, batch=11, piece=4, seed=0)
    pieces = iter(sampler)
    assert [len(next(pieces)) for _ in range(4)] == [3, 1, 3, 1] and sampler.pieces_per_step() == 2
    assert torch.equal(RealBatches(10, 4, 3, seed=0).batch_indices(3), sampler.batch_indices(3))
