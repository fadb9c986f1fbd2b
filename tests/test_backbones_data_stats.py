"""Datasets, backbones and class statistics on tiny data."""

import os

import numpy as np
import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats
from PIL import Image
from safetensors.torch import save_file

from fastsfm.backbones import load_backbone
from fastsfm.data import digits, fingerprint, image_folder, labels_of
from fastsfm.stats import ClassStats


def test_digits_split_is_stratified_and_deterministic():
    a, b = digits(16), digits(16)
    x, y = a.train.tensors
    assert x.shape[1:] == (3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert len(a.train) + len(a.test) == 1797 and a.num_classes == 10
    assert torch.equal(y, b.train.tensors[1]) and fingerprint(a.train) == fingerprint(b.train)
    assert set(a.test.tensors[1].tolist()) == set(range(10))


def test_image_folder_and_fingerprint(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((20, 24, 3), 40 * i + 100, np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = image_folder(tmp_path, 8, 6)
    x, y = data.train[3]
    assert data.class_names == ["cat", "dog"] and x.shape == (3, 8, 8) and y == 1
    assert data.train_eval[3][0].shape == (3, 6, 6)  # resized to 8, centre-cropped to the backbone's 6
    torch.testing.assert_close(data.train_eval[3][0], x[:, 1:7, 1:7])
    assert labels_of(data.train).tolist() == [0, 0, 1, 1]
    before = fingerprint(data.train)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "dog" / "2.png")
    assert fingerprint(image_folder(tmp_path, 8, 8).train) != before
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "nope", 8, 8)


def test_random_init_backbone_is_seeded_and_frozen():
    a, b, c = tiny_backbone(0), tiny_backbone(0), tiny_backbone(1)
    x = torch.rand(2, 3, 20, 20)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert a.identity == "vit_tiny_patch16_224|random-init(seed=0)|16px|authors"
    assert not any(p.requires_grad for p in a.parameters()) and not a.train().training
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        a(torch.rand(3, 16, 16))


def test_paper_aliases_run_at_224_with_the_authors_preprocessing():
    from fastsfm.backbones import ALIASES, AUTHOR_NAMES, IMAGENET_MEAN, IMAGENET_STD

    assert {
        "dinov2_vitb14",
        "clip_vitb16",
        "eva02_vitb14",
        "mocov3_vitb16",
        "dino_vitb16",
        "dinov2_vits14",
        "dinov2_vitl14",
        "clip_vitb32",
        "clip_vitl14",
        "eva02_vitt14",
        "eva02_vits14",
        "eva02_vitl14",
        "mocov3_vitl16",
    } <= set(ALIASES)
    assert all(alias in ALIASES for alias in AUTHOR_NAMES.values())
    clip = load_backbone("clip_vitb", pretrained=False)  # the authors' name of CLIP ViT-B/16
    assert clip.name == "clip_vitb16" and clip.input_size == 224 and clip.feature_dim == 512  # projected embedding
    assert (clip.mean, clip.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert clip(torch.rand(1, 3, 224, 224)).shape == (1, 512)
    own = load_backbone("eva02_vitt14", pretrained=False, preprocess="model")
    assert own.input_size == 224 and own.mean != IMAGENET_MEAN and own.identity.endswith("|224px|model")
    dino = load_backbone("dinov2_vits14", pretrained=False)  # timm's default would be 518 px
    assert dino.input_size == 224 and dino.model.patch_embed.img_size == (224, 224)
    with pytest.raises(ValueError, match="preprocess must be"):
        load_backbone("eva02_vitt14", pretrained=False, preprocess="clip")


def test_backbone_precision_runs_under_autocast():
    bb = tiny_backbone()
    x = torch.rand(3, 3, 16, 16)
    bb.precision = "bf16"
    low = bb(x)
    bb.precision = "fp32"
    assert low.dtype == torch.float32 and not torch.equal(low, bb(x))
    torch.testing.assert_close(low, bb(x), rtol=0.05, atol=0.05)


def test_backbone_local_weight_file_and_missing_weights(tmp_path):
    src = tiny_backbone(3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    loaded = load_backbone("vit_tiny_patch16_224", pretrained=str(path), image_size=16)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), src(x))
    assert loaded.identity.startswith("vit_tiny_patch16_224|file:")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone("vit_tiny_patch16_224", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_backbone("vit_tiny_patch16_224", pretrained=True)


def test_stats_means_roundtrip_and_validation(tmp_path):
    bb, data = tiny_backbone(), toy_data()
    stats = toy_stats(bb, data)
    x, y = data.tensors
    feats = bb(x)
    for c in range(3):
        torch.testing.assert_close(stats.means[c], feats[y == c].mean(0), rtol=1e-4, atol=1e-5)
    assert stats.counts.tolist() == [6, 6, 6] and stats.classifier_weight.shape == (3, 192)
    stats.save(tmp_path / "s.safetensors")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    back = ClassStats.load(tmp_path / "s.safetensors")
    assert torch.equal(back.means, stats.means) and back.class_names == ["c0", "c1", "c2"]
    assert back.meta["backbone"] == bb.identity
    back.check_compatible(bb, num_classes=3)
    with pytest.raises(ValueError, match="computed with backbone"):
        back.check_compatible(tiny_backbone(seed=5))
    with pytest.raises(ValueError, match="statistics have 3 classes, the data has 4"):
        back.check_compatible(num_classes=4)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ClassStats.load(tmp_path / "bad.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fastsfm statistics file"):
        ClassStats.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="fastsfm stats"):
        ClassStats.load(tmp_path / "none.safetensors")


def test_stats_reject_bad_labels_and_empty_classes():
    bb = tiny_backbone()
    data = toy_data()
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    from fastsfm.stats import compute_stats

    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        compute_stats(bb, loader, ["a", "b"], "toy", progress=False)
    with pytest.raises(ValueError, match="classes without any image"):
        compute_stats(bb, loader, ["a", "b", "c", "d"], "toy", progress=False)
