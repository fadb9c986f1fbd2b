"""The counter-based generator: the same bits for ints and tensors, uniform and normal draws, and
independent streams at the scale of ImageNet-1k with 50 images per class (50,000 images)."""

import numpy as np
import torch

from fastsfm import rng
from fastsfm.distill.synset import SyntheticSet

C, IPC = 1000, 50


def test_ints_and_tensors_give_the_same_bits():
    ints = [rng.derive(7, rng.SYNTHETIC_STREAM, 12, v, i) for v in range(2) for i in (0, 1, 2**40)]
    tensors = rng.derive(7, rng.SYNTHETIC_STREAM, 12, torch.arange(2)[:, None], torch.tensor([0, 1, 2**40])[None, :])
    assert all(isinstance(k, int) and 0 <= k < 2**64 for k in ints)
    assert tensors.flatten().tolist() == [k - 2**64 if k >= 2**63 else k for k in ints]
    assert rng.derive(1, 2, 3) == rng.derive(1, 2, 3) != rng.derive(1, 3, 2)
    assert (rng.words(torch.tensor([0, 1]), 4) != 0).all()  # the finaliser's fixed point 0 stays out


def test_uniform_and_normal_statistics():
    keys = rng.derive(123, torch.arange(20000))
    u = rng.uniform(keys, 8)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005 and abs(u.std() - 12**-0.5) < 0.005
    assert torch.corrcoef(u.T).fill_diagonal_(0).abs().max() < 0.03
    z = rng.normal(keys[:64], (3, 32, 32))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert torch.equal(rng.uniform(keys[5:9], 8), u[5:9])  # a row depends on its key only


def _pairs(words: np.ndarray) -> np.ndarray:
    """Each run of two consecutive 64-bit words as one 128-bit value (as a void dtype for unique)."""
    both = np.stack([words[:, :-1], words[:, 1:]], axis=2)
    return np.ascontiguousarray(both).view(np.dtype((np.void, 16))).reshape(words.shape[0], -1)


def _shifted_copies(words: np.ndarray) -> int:
    """Pairs of different streams sharing two consecutive words at any offsets: under independence
    the expected count is (#windows)^2 / 2^129 (about 1e-26 here), so any hit is a shifted copy."""
    windows = _pairs(words)
    owner = np.repeat(np.arange(words.shape[0]), windows.shape[1])
    _, first, counts = np.unique(windows.ravel(), return_index=True, return_counts=True)
    repeated = np.flatnonzero(counts > 1)
    shared = 0
    for value_index in repeated:  # a value seen twice is a shifted copy if seen in two streams
        hits = np.flatnonzero(windows.ravel() == windows.ravel()[first[value_index]])
        shared += len(set(owner[hits].tolist())) > 1
    return shared


def _max_correlation(x: torch.Tensor) -> float:
    """Largest |Pearson r| between different rows; for independent rows of length L it is about
    sqrt(2 ln(rows^2)) / sqrt(L) (0.14 for 2,000 rows of 1,024), so 0.2 bounds it at > 6 sigma."""
    r = torch.corrcoef(x.double()).fill_diagonal_(0)
    return float(r.abs().max())


def test_pyramid_noise_streams_of_50000_images_are_independent():
    """C = 1000, IPC = 50: the finest-level noise of every image (the first 32 words of its stream),
    and the pixel-initialisation level: no shifted copies, no correlation beyond chance."""
    synset = SyntheticSet(C, IPC, 256, extent=1, seed=0)
    for level in (0, len(synset.sizes) - 1):
        keys = rng.derive(rng.derive(0, rng.PYRAMID_STREAM, level), synset.image_ids)
        assert keys.unique().numel() == C * IPC
        assert _shifted_copies(rng.words(keys, 32).numpy()) == 0
        sample = keys[torch.randperm(len(keys), generator=torch.Generator().manual_seed(level))[:2000]]
        assert _max_correlation(rng.normal(sample, (1024,))) < 0.2


def test_augmentation_draws_of_50000_images_are_independent():
    """One step's augmentation keys (two views) of 50,000 images: distinct, no shifted copies among
    their streams (which give the six crop/flip/noise uniforms and the noise), no correlation."""
    keys = rng.augment_keys(0, 4321, 2, torch.arange(C * IPC))
    assert keys.unique().numel() == 2 * C * IPC
    assert _shifted_copies(rng.words(keys, 16).numpy()) == 0
    params = rng.uniform(keys, 6)
    assert torch.corrcoef(params.T).fill_diagonal_(0).abs().max() < 0.01  # 100,000 draws: sd 0.003
    assert _max_correlation(rng.normal(rng.derive(keys[:2000], 7), (1024,))) < 0.2


def test_the_old_linear_scheme_would_fail_the_shift_test():
    """The statistic can fail: streams that are shifted copies (hash(key + counter) with keys 3
    apart, the scheme this generator replaced) share the 36 two-word windows of their 37-word overlap."""
    base = np.arange(40, dtype=np.uint64)[None, :] + np.array([0, 3, 1000], dtype=np.uint64)[:, None]
    words = np.array([[rng.mix64(int(v)) for v in row] for row in base], dtype=np.uint64)
    assert _shifted_copies(words) == 36
