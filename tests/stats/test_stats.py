"""Class statistics: one streaming pass, the real-data classifier, files and their validation."""

import os

import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats
from safetensors.torch import save_file

from fastsfm.stats import ClassStats


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
