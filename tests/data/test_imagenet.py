"""ImageNet and the authors' subsets on a tiny ImageNet-layout folder made here; datasets by name."""

import shutil

import pytest
import torch
from helpers import IMAGENETTE, imagenet_folder

from fastsfm.data.datasets import load_data
from fastsfm.data.imagenet import SUBSETS, imagenet_subset, subset_wnids


def test_subsets_are_the_authors_lists_in_their_order():
    assert {
        "imagenet-1k",
        "imagenet-100",
        "imagenette",
        "imagewoof",
        "imagenet-birds",
        "imagenet-fruits",
        "imagenet-cats",
        "imagenet-a",
        "imagenet-b",
        "imagenet-c",
        "imagenet-d",
        "imagenet-e",
    } == set(SUBSETS)
    assert subset_wnids("imagenette") == IMAGENETTE
    in100 = subset_wnids("imagenet-100")
    assert len(in100) == 100 and in100[:2] == ["n02869837", "n01749939"]  # the authors' imagenet100.txt order
    assert len(set(subset_wnids("imagenet-1k"))) == 1000
    with pytest.raises(ValueError, match="unknown ImageNet subset 'imagenet-7'"):
        subset_wnids("imagenet-7")


def test_imagenet_subset_relabels_in_order_and_ignores_other_classes(tmp_path):
    root = imagenet_folder(tmp_path / "imagenet")
    data = load_data(f"imagenette:{root}", 16, 12)
    assert data.num_classes == 10 and data.class_names[0] == "tench" and len(data.train) == 30
    assert data.train.classes == IMAGENETTE and data.train[3][1] == 1  # relabelled 0..9 in the listed order
    assert data.train[0][0].shape == (3, 16, 16) and data.train_eval[0][0].shape == (3, 12, 12)
    assert len(data.test) == 20 and data.test[0][0].shape == (3, 12, 12)
    torch.save(({w: (f"name{i}", "x") for i, w in enumerate(IMAGENETTE)}, {}), root / "meta.bin")
    assert imagenet_subset(root, "imagenette", 16, 12).class_names[:2] == ["name0", "name1"]  # torchvision's meta
    shutil.rmtree(root / "val" / IMAGENETTE[4])
    with pytest.raises(ValueError, match="1 classes of imagenette are missing from .*val.*n03028079"):
        load_data(f"imagenette:{root}", 16, 12)
    with pytest.raises(FileNotFoundError, match="torchvision.datasets.MNIST is not under"):
        load_data(f"torchvision:MNIST:{tmp_path / 'nothing'}", 16, 12)


class _Payload:
    """Unpickling it would call ``ran.append`` -- code execution in a crafted meta.bin."""

    def __reduce__(self):
        return (print, ("code ran while loading meta.bin",))


def test_a_crafted_meta_bin_is_refused_not_run(tmp_path, capsys):
    root = imagenet_folder(tmp_path / "imagenet")
    torch.save(({w: _Payload() for w in IMAGENETTE}, {}), root / "meta.bin")
    with pytest.raises(ValueError, match="not torchvision's ImageNet meta.bin.*refused"):
        imagenet_subset(root, "imagenette", 16, 12)
    assert "code ran" not in capsys.readouterr().out
