"""The batched augmentation against the authors' operations applied one after another."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastsfm import rng
from fastsfm.data.augment import BatchAugment


def _authors_order(images, aug, keys):
    """Flip the selected images, then crop each with its box (affine_grid/grid_sample), then add noise:
    the authors' three modules in sequence, with the draws of ``aug.params``."""
    p = aug.params(keys)
    x = images.clone()
    x[p.flip] = torch.flip(x[p.flip], dims=[3])
    theta = torch.zeros(len(keys), 2, 3, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = p.width, p.height
    theta[:, 0, 2] = (p.left + p.width / 2 - 0.5) * 2
    theta[:, 1, 2] = (p.top + p.height / 2 - 0.5) * 2
    grid = F.affine_grid(theta, [len(keys), 3, aug.size, aug.size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    noise = rng.normal(rng.derive(keys, 7), (3, aug.size, aug.size))
    return out + p.noise.float()[:, None, None, None] * (aug.noise_std * noise + aug.noise_mean)


def test_batched_augmentation_equals_the_authors_sequence():
    aug = BatchAugment(12, noise_std=0.2, noise_mean=0.5)
    images = torch.rand(64, 3, 20, 17)
    keys = rng.derive(3, torch.arange(64))
    torch.testing.assert_close(aug(images, keys), _authors_order(images, aug, keys), rtol=1e-5, atol=1e-5)


def test_draws_are_functions_of_keys_and_differentiable():
    aug = BatchAugment(10)
    images = torch.rand(6, 3, 16, 16, requires_grad=True)
    keys = rng.derive(0, torch.arange(6))
    out = aug(images, keys)
    out.sum().backward()
    assert out.shape == (6, 3, 10, 10) and images.grad.abs().sum() > 0
    torch.testing.assert_close(aug(images[2:5], keys[2:5]), out[2:5])  # any subset, same rows: chunks are exact
    assert not torch.equal(aug(images, keys + 1), out)
    with pytest.raises(ValueError, match="one key per image"):
        aug(images, keys[:3])
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        aug(images[0], keys)


def test_draw_distribution_matches_the_authors():
    aug = BatchAugment(224)
    p = aug.params(rng.derive(11, torch.arange(200_000)))
    area = p.width * p.height
    assert abs(p.flip.float().mean() - 0.5) < 0.01 and abs(p.noise.float().mean() - 0.5) < 0.01
    assert abs(area.mean() - 0.54) < 0.01 and area.min() >= 0.08 - 1e-6 and area.max() <= 1.0 + 1e-6
    aspect = torch.log(p.width / p.height)
    assert aspect.min() >= math.log(3 / 4) - 1e-5 and aspect.max() <= math.log(4 / 3) + 1e-5
    outside = ((p.width > 1) | (p.height > 1)).float().mean()
    assert 0.12 < outside < 0.16  # continuous boxes, never rejected: about 14 % run past the image
    covered = (p.width.clamp(max=1) * p.height.clamp(max=1)).mean()
    assert abs(covered - 0.53) < 0.01


def test_no_noise_and_no_flip_options():
    images = torch.rand(8, 3, 12, 12)
    keys = rng.derive(5, torch.arange(8))
    plain = BatchAugment(12, flip=False, noise_std=0.0)
    assert not plain.params(keys).flip.any() and not plain.params(keys).noise.any()
    torch.testing.assert_close(plain(images, keys), _authors_order(images, plain, keys))
    # a crop box covering the whole image is the identity
    identity = BatchAugment(12, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, noise_std=0.0)
    torch.testing.assert_close(identity(images, keys), images, rtol=1e-5, atol=1e-5)


def test_separable_crop_equals_grid_sample_in_float64_values_and_gradients():
    """The crop as two batched matrix products equals affine_grid + grid_sample (bilinear, zero padding,
    align_corners=False) in float64 -- flipped and unflipped boxes, boxes past the image, non-square
    images -- for the values and for the gradient of the images (which grid_sample scatters with atomics)."""
    aug = BatchAugment(13, noise_std=0.0)
    keys = rng.derive(9, torch.arange(96))
    images = torch.rand(96, 3, 21, 18, dtype=torch.float64, requires_grad=True)
    p = aug.params(keys)
    assert p.flip.any() and (~p.flip).any() and ((p.width > 1) | (p.height > 1)).any()
    got = aug(images, keys)
    reference = images.detach().clone().requires_grad_()
    want = _authors_order(reference, aug, keys)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    upstream = torch.randn_like(got)
    got.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(images.grad, reference.grad, rtol=0, atol=1e-11)
