"""Chunk-wise Adam over a synthetic set: equal to ``torch.optim.Adam`` on whole tensors, resident or
offloaded; non-finite gradients skip their chunk without poisoning parameters or moments."""

import pytest
import torch

from fastsfm.distill.optim import ChunkAdam
from fastsfm.distill.synset import SyntheticSet


def _loss(levels):
    return sum(((lv - 0.3) ** 2 * torch.arange(1, lv.numel() + 1).view_as(lv)).sum() for lv in levels)


@pytest.mark.parametrize("offload,fused", [(False, False), (True, False), (False, True), (True, True)])
def test_chunked_adam_equals_torch_adam_on_whole_tensors(offload, fused):
    """Chunk by chunk, resident or offloaded, foreach or fused (CUDA's default, its step count kept
    on the device): the whole-tensor ``torch.optim.Adam``."""
    synset = SyntheticSet(4, 3, 8, extent=1, offload=offload)
    synset.grow(2)
    reference = [p.clone().requires_grad_() for p in synset.levels]
    torch_adam = torch.optim.Adam(reference, lr=0.05)
    ours = ChunkAdam(synset, lr=0.05, fused=fused)
    for _ in range(3):
        torch_adam.zero_grad()
        _loss(reference).backward()
        torch_adam.step()
        for start, stop in ((0, 5), (5, 7), (7, 12)):
            params = synset.chunk(start, stop, "cpu", requires_grad=True)
            _loss(params).backward()
            ours.step_chunk(start, stop, params)
        ours.finish_step()
        assert not ours.in_step
    for a, b in zip(reference, synset.levels, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
    restored = ChunkAdam(synset, lr=0.05)
    restored.load_state(ours.state(), ours.steps)
    assert restored.steps == 3 and torch.equal(restored.exp_avg_sq[1].values, ours.exp_avg_sq[1].values)
    ours.reset()
    assert ours.steps == 0 and not any(m.values.any() for m in ours.exp_avg)


def test_non_finite_gradients_skip_their_chunk_only():
    """fp16 policy (``check_finite``): a chunk whose gradient overflowed keeps its parameters and
    moments, the other chunks step; the skipped count is kept on the device."""
    synset = SyntheticSet(2, 3, 8, extent=1)
    synset.grow(2)
    before = [level.clone() for level in synset.levels]
    optim = ChunkAdam(synset, lr=0.05, check_finite=True)
    for start, stop, poison in ((0, 3, True), (3, 6, False)):
        params = synset.chunk(start, stop, "cpu", requires_grad=True)
        (1024.0 * _loss(params)).backward()
        if poison:
            params[1].grad[0, 0, 0, 0] = float("inf")
        optim.step_chunk(start, stop, params, grad_scale=1 / 1024)
    optim.finish_step()
    assert optim.skipped.item() == 1
    for now, was in zip(synset.levels, before, strict=True):
        assert torch.equal(now[:3], was[:3]) and not torch.equal(now[3:], was[3:])
    assert all(m.values[:3].eq(0).all() and m.values[3:].ne(0).any() for m in optim.exp_avg_sq)
    reference = ChunkAdam(SyntheticSet(2, 3, 8, extent=1), lr=0.05)  # the healthy chunk steps as unchecked Adam
    reference.synset.grow(2)
    reference.reset()
    params = reference.synset.chunk(3, 6, "cpu", requires_grad=True)
    (1024.0 * _loss(params)).backward()
    reference.step_chunk(3, 6, params, grad_scale=1 / 1024)
    for a, b in zip(reference.synset.levels, synset.levels, strict=True):
        torch.testing.assert_close(a[3:], b[3:])


def test_reset_zeroes_moments_in_place_and_adds_the_new_levels():
    synset = SyntheticSet(2, 2, 8, extent=1)
    optim = ChunkAdam(synset, lr=0.1)
    params = synset.chunk(0, 4, "cpu", requires_grad=True)
    _loss(params).backward()
    optim.step_chunk(0, 4, params)
    first = optim.exp_avg[0].values
    synset.grow(2)
    optim.reset()
    assert optim.exp_avg[0].values is first and not first.any() and len(optim.exp_avg) == 2
    assert optim.exp_avg[1].values.shape == synset.levels[1].shape


def test_offloaded_state_allocates_exactly_what_it_holds(monkeypatch):
    """Offloaded levels and moments are allocated at their exact size, only when new: at every level
    of growth the page-locked bytes asked for equal the bytes held (ratio 1.0; the caching host
    allocator would round each block up to a power of two)."""
    from fastsfm.distill import pinned

    asked = []
    real_empty = pinned.empty

    def counting(shape, dtype=torch.float32):
        t = real_empty(shape, dtype)
        asked.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(pinned, "empty", counting)
    synset = SyntheticSet(5, 3, 32, extent=1, offload=True)
    optim = ChunkAdam(synset, lr=0.1)
    for step in range(1, 2 * len(synset.sizes)):
        if synset.grow(step):
            optim.reset()
        held = sum(t.numel() * 4 for t in synset.levels) + optim.nbytes()
        assert sum(asked) == held
    assert len(synset.levels) == len(synset.sizes) and sum(asked) == 3 * 15 * synset.bytes_per_image(final=True)
