"""Synthetic-set parameterisation, storage and export; chunk-wise Adam."""

import pytest
import torch
import torch.nn.functional as F

from fastsfm.data.setfile import load_images, save_grid, save_images
from fastsfm.distill.synset import SyntheticSet, upsample_matrix


def test_pyramid_grows_on_schedule_and_renders_in_range():
    s = SyntheticSet(3, 2, 16, extent=5)
    assert s.sizes == [1, 2, 4, 8, 16] and len(s.levels) == 1
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2] and s.image_ids.tolist() == list(range(6))
    img = s.render()
    assert img.shape == (6, 3, 16, 16) and 0 <= img.min() and img.max() <= 1
    # the authors' schedule: a level at steps extent + 1, 2 extent + 1, ...
    assert not s.grow(5) and s.grow(6) and len(s.levels) == 2 and not s.grow(10) and s.grow(11)
    assert SyntheticSet(2, 1, 12, param="pixels").sizes == [12]
    assert SyntheticSet(2, 1, 12, start_res=2).sizes == [2, 4, 8, 12]


def test_a_shard_holds_exactly_the_rows_of_the_whole_set():
    """Every random draw is keyed by the global image index: a rank's shard equals the single-process rows."""
    whole = SyntheticSet(5, 2, 8, extent=1, seed=3)
    shard = SyntheticSet(2, 2, 8, extent=1, seed=3, first_class=2)
    assert shard.labels.tolist() == [2, 2, 3, 3] and shard.image_ids.tolist() == [4, 5, 6, 7]
    for step in range(1, 5):
        whole.grow(step)
        shard.grow(step)
    for a, b in zip(whole.levels, shard.levels, strict=True):
        assert torch.equal(a[4:8], b)
    torch.testing.assert_close(whole.render(4, 8), shard.render())


def test_real_init_renders_the_real_images():
    real = torch.rand(4, 3, 8, 8) * 0.9 + 0.05
    for param in ("pixels", "pyramid"):
        s = SyntheticSet(2, 2, 8, param=param, init="real", real_images=real)
        torch.testing.assert_close(s.render(), real, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs real_images of shape"):
        SyntheticSet(2, 2, 8, init="real", real_images=torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="param must be"):
        SyntheticSet(2, 1, 8, param="svd")


def test_chunks_are_views_when_resident_and_copies_when_offloaded():
    resident, offloaded = SyntheticSet(2, 3, 8), SyntheticSet(2, 3, 8, offload=True)
    (view,) = resident.chunk(1, 4, "cpu", requires_grad=True)
    (copy,) = offloaded.chunk(1, 4, "cpu", requires_grad=True)
    assert view.is_leaf and view.requires_grad and view.data_ptr() == resident.levels[0][1:4].data_ptr()
    assert copy.is_leaf and copy.data_ptr() != offloaded.levels[0][1:4].data_ptr()
    torch.testing.assert_close(copy, view)


def test_export_load_levels_and_grid(tmp_path):
    s = SyntheticSet(3, 1, 8, extent=1)
    s.grow(2)
    save_images(tmp_path / "s.safetensors", s.render(), s.labels, {"method": "sfm"})
    images, labels, meta = load_images(tmp_path / "s.safetensors")
    torch.testing.assert_close(images, s.render())
    assert labels.tolist() == [0, 1, 2] and meta["method"] == "sfm"
    t = SyntheticSet(3, 1, 8, extent=1, seed=9)
    t.load_state(s.state())
    torch.testing.assert_close(t.render(), s.render())
    with pytest.raises(ValueError, match="expects"):
        SyntheticSet(3, 2, 8).load_state(s.state())
    save_grid(images, labels, ["a", "b", "c"], tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_grey_images_have_one_channel_replicated_to_rgb():
    s = SyntheticSet(2, 2, 8, extent=1, channels="grey")
    s.grow(2)
    assert all(level.shape[1] == 1 for level in s.levels) and s.bytes_per_image() == 4 * (1 + 4)
    img = s.render()
    assert img.shape == (4, 3, 8, 8) and torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 1], img[:, 2])
    real = torch.rand(4, 3, 8, 8) * 0.9 + 0.05
    init = SyntheticSet(2, 2, 8, param="pixels", init="real", real_images=real, channels="grey")
    torch.testing.assert_close(init.render()[:, 0], real.mean(1), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="channels must be one of"):
        SyntheticSet(2, 2, 8, channels="cmyk")


@pytest.mark.parametrize("size,resolution", [(1, 256), (2, 7), (3, 28), (7, 32), (16, 32)])
def test_upsampling_matrices_are_bilinear_interpolation(size, resolution):
    """``A @ x @ A.T`` equals ``F.interpolate(mode="bilinear")`` (LGM's upsampling, no antialiasing),
    values and gradients, float64, on sizes that do not divide the resolution too."""
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    a = upsample_matrix(size, resolution)
    want = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    torch.testing.assert_close(a @ x @ a.T, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(want)
    (got_grad,) = torch.autograd.grad((a @ x @ a.T * weights).sum(), x)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), x)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_render_is_the_sum_of_interpolated_levels():
    """The set renders ``sigmoid(2 D (sum_l Upsample(P_l)))`` with interpolate's numbers (float32)."""
    synset = SyntheticSet(3, 2, 24, extent=1)
    while synset.grow(len(synset.levels) + 1):
        pass
    levels = synset.chunk(0, synset.num_images, "cpu", requires_grad=False)
    total = sum(F.interpolate(level, size=(24, 24), mode="bilinear", align_corners=False) for level in levels)
    want = torch.sigmoid(2.0 * torch.einsum("ij,njhw->nihw", synset.decor, total))
    assert len(levels) == len(synset.sizes) > 3
    torch.testing.assert_close(synset.render_levels(levels), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", ["rgb", "grey"])
def test_one_gemm_render_equals_the_sum_of_interpolated_levels_in_float64(channels):
    """``[A_1 Q_1 | ... ] @ [A_1 | ... ]^T`` plus the finest level, then the decorrelation as a matrix
    product, equals ``sigmoid(2 D sum_l interpolate(Q_l))`` in float64: values and the levels' gradients."""
    synset = SyntheticSet(3, 2, 20, extent=1, channels=channels)
    while synset.grow(len(synset.levels) + 1):
        pass
    levels = [q.double().requires_grad_() for q in synset.chunk(0, synset.num_images, "cpu")]
    literal = [q.detach().clone().requires_grad_() for q in levels]
    got = synset.render_levels(levels)
    total = sum(F.interpolate(q, size=(20, 20), mode="bilinear", align_corners=False) for q in literal)
    want = torch.sigmoid(2.0 * torch.einsum("ij,njhw->nihw", synset.decor.double(), total))
    want = want if channels == "rgb" else want.expand(-1, 3, -1, -1)
    assert len(levels) > 3 and levels[-1].shape[-1] == 20
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for a, b in zip(levels, literal, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    early = synset.render_levels([q.detach() for q in levels[:2]])  # no full-resolution level yet
    assert early.shape == (6, 3, 20, 20)
