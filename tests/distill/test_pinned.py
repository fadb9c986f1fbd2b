"""Exact-size page-locked host tensors: the bytes asked for, registered with CUDA when it is present,
unregistered when the last view goes."""

import gc

import pytest
import torch

from fastsfm.distill import pinned


def test_exact_shape_and_dtype_without_cuda_registration_off_gpu():
    t = pinned.zeros((3, 5, 7), torch.float32)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and t.is_contiguous() and not t.any()
    assert t.untyped_storage().nbytes() == 3 * 5 * 7 * 4  # no rounding up
    half = pinned.empty((4,), torch.bfloat16)
    assert half.element_size() == 2 and half.numel() == 4
    assert pinned.empty((0, 3)).numel() == 0


@pytest.mark.gpu
def test_registered_exactly_and_released_with_the_last_view():
    gc.collect()
    start = pinned.stats()["current"]
    t = pinned.empty((1000, 3, 17, 17))
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape))  # fresh memory may hold NaN bit patterns
    nbytes = t.numel() * 4
    assert t.is_pinned() and pinned.stats()["current"] - start == nbytes
    view = t[10:20]
    del t
    gc.collect()
    assert pinned.stats()["current"] - start == nbytes  # a view keeps the memory registered
    gpu = view.to("cuda", non_blocking=True)
    back = pinned.empty(tuple(view.shape))
    back.copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, view)
    del view, back
    gc.collect()
    assert pinned.stats()["current"] == start
