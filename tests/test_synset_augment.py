"""Synthetic-set parameterisation, export, and the single augmentation pass."""

import pytest
import torch

from fastsfm.augment import SinglePassAugment
from fastsfm.synset import SyntheticSet, save_grid


def test_augment_shapes_gradients_and_seed():
    aug = SinglePassAugment(12)
    x = torch.rand(4, 3, 20, 20, requires_grad=True)
    torch.manual_seed(0)
    a = aug(x)
    a.sum().backward()
    assert a.shape == (4, 3, 12, 12) and x.grad.abs().sum() > 0
    torch.manual_seed(0)
    assert torch.equal(aug(x), a)
    assert not torch.equal(aug(x), a)  # fresh draws on the next call
    with pytest.raises(ValueError, match="expected images"):
        aug(torch.rand(3, 8, 8))


def test_pyramid_grows_on_schedule_and_renders_in_range():
    s = SyntheticSet(3, 2, 16, extent=5)
    assert s.sizes == [1, 2, 4, 8, 16] and len(s.levels) == 1
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    img = s.render()
    assert img.shape == (6, 3, 16, 16) and 0 <= img.min() and img.max() <= 1
    assert not s.grow(4) and s.grow(5) and len(s.levels) == 2 and not s.grow(9) and s.grow(10)
    assert SyntheticSet(2, 1, 12, param="pixels").sizes == [12]
    assert SyntheticSet(2, 1, 12, start_res=2).sizes == [2, 4, 8, 12]


def test_real_init_renders_the_real_images():
    real = torch.rand(4, 3, 8, 8) * 0.9 + 0.05
    for param in ("pixels", "pyramid"):
        s = SyntheticSet(2, 2, 8, param=param, init="real", real_images=real)
        torch.testing.assert_close(s.render(), real, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs real_images of shape"):
        SyntheticSet(2, 2, 8, init="real", real_images=torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="param must be"):
        SyntheticSet(2, 1, 8, param="svd")


def test_export_load_levels_and_grid(tmp_path):
    s = SyntheticSet(3, 1, 8, extent=1)
    s.grow(1)
    s.save(tmp_path / "s.safetensors", {"method": "sfm"})
    images, labels, meta = SyntheticSet.load_images(tmp_path / "s.safetensors")
    torch.testing.assert_close(images, s.render().detach())
    assert labels.tolist() == [0, 1, 2] and meta["ipc"] == "1"
    t = SyntheticSet(3, 1, 8, extent=1)
    t.load_levels(s.level_tensors())
    torch.testing.assert_close(t.render(), s.render())
    with pytest.raises(ValueError, match="expects"):
        SyntheticSet(3, 2, 8).load_levels(s.level_tensors())
    save_grid(images, labels, ["a", "b", "c"], tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
