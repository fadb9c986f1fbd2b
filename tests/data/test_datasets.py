"""Datasets by name: one grammar (``DatasetSpec``) for ``--data`` and the grid's ``datasets``, and the
defaults a dataset owns."""

import pytest
from helpers import imagenet_folder

from fastsfm.config import DistillConfig, with_defaults
from fastsfm.data.datasets import DATASET_DEFAULTS, DatasetSpec, dataset_defaults
from fastsfm.reproduce import GridConfig, validate_grid


def test_one_grammar_for_every_entry_point():
    parse = DatasetSpec.parse
    assert parse("digits") == DatasetSpec("digits", "digits")
    assert parse("imagenet-100:/data/in") == DatasetSpec("imagenet", "imagenet-100", "/data/in")
    assert parse("imagenet-100", root="/grid/root") == DatasetSpec("imagenet", "imagenet-100", "/grid/root")
    assert parse("imagenet-100:/own", root="/grid/root").root == "/own"  # the entry's own root wins
    assert parse("torchvision:CIFAR10:/c") == DatasetSpec("torchvision", "CIFAR10", "/c")
    assert parse("folder:/d") == DatasetSpec("folder", "folder:/d", "/d/train", "/d/val")
    assert parse("/some/train", test_root="/some/val") == DatasetSpec(
        "folder", "/some/train", "/some/train", "/some/val"
    )
    with pytest.raises(ValueError, match="needs a root"):
        parse("imagenet-100")


def test_a_grid_entry_may_name_its_own_root(tmp_path):
    root = imagenet_folder(tmp_path / "imagenet")
    grid = GridConfig(out=str(tmp_path / "g"), datasets=[f"imagenette:{root}"], backbones=["test_vit"], methods=["sfm"])
    validate_grid(grid)  # no top-level root needed
    assert grid.dataset(f"imagenette:{root}").root == str(root)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet-7'"):
        validate_grid(GridConfig(out=str(tmp_path / "g"), datasets=["imagenet-7"], backbones=["test_vit"]))


def test_digits_defaults_are_the_demo_settings_and_flags_win():
    from fastsfm.cli.demo import DEMO_CLASSIFIER, DEMO_DISTILL

    digits = dataset_defaults("digits")
    assert digits == DATASET_DEFAULTS["digits"] and dataset_defaults("imagenet-100:/x") == {}
    assert DEMO_DISTILL == with_defaults(DistillConfig, digits, ipc=1)
    assert DEMO_CLASSIFIER.classifier_epochs == digits["classifier_epochs"]
    assert with_defaults(DistillConfig, digits, steps=5).steps == 5 and with_defaults(DistillConfig, digits).lr == 2e-2
