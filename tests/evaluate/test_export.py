"""``fastsfm export``: a distilled set as an image folder that ImageFolder and ``fastsfm eval`` read back."""

import json

import pytest
import torch
from torchvision import datasets

from fastsfm.cli.commands import main
from fastsfm.data.images import image_set_folder
from fastsfm.data.setfile import save_images
from fastsfm.evaluate.export import SET_JSON, export_image_folder

NAMES = ["n01440764", "n02102040", "cat"]


def _set(path, n_per_class=2, size=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(3 * n_per_class, 3, size, size, generator=gen)
    labels = torch.arange(3).repeat(n_per_class)  # interleaved classes
    meta = {"method": "sfm", "backbone": "toy", "class_names": json.dumps(NAMES), "num_classes": "3", "ipc": "2"}
    save_images(path, images, labels, meta)
    return images, labels


def test_export_round_trips_through_imagefolder_and_eval_within_8_bit_rounding(tmp_path):
    images, labels = _set(tmp_path / "run" / "synset.safetensors")
    out = export_image_folder(tmp_path / "run", tmp_path / "images")  # a run folder works as well as the file
    assert sorted(p.name for p in out.iterdir()) == sorted([*NAMES, SET_JSON])
    info = json.loads((out / SET_JSON).read_text())
    assert info["class_names"] == NAMES and info["method"] == "sfm" and info["images"] == 6 and info["resolution"] == 12
    folder = datasets.ImageFolder(str(out))
    assert sorted(folder.classes) == sorted(NAMES) and len(folder) == 6
    back, back_labels = image_set_folder(out, NAMES, 12)  # what `fastsfm eval --synset DIR` reads
    assert torch.equal(torch.bincount(back_labels), torch.bincount(labels))
    for c in range(3):  # each class folder lists its images in the set's order
        err = (back[back_labels == c] - images[labels == c]).abs().max().item()
        assert 0 < err <= 0.5 / 255 + 1e-6  # only the rounding to 8 bits


def test_export_errors_and_atomicity(tmp_path, capsys):
    _set(tmp_path / "s.safetensors")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_image_folder(tmp_path / "s.safetensors", tmp_path / "taken")
    with pytest.raises(ValueError, match="3 classes, but 2 class names"):
        export_image_folder(tmp_path / "s.safetensors", tmp_path / "a", ["x", "y"])
    with pytest.raises(ValueError, match="distinct folder names"):
        export_image_folder(tmp_path / "s.safetensors", tmp_path / "b", ["x", "x", "y"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written folder left
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "nothing.safetensors"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no synthetic set" in err and len(err.strip().splitlines()) == 1
    main(["export", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "d")])
    assert f"wrote {tmp_path / 'd'}: 6 PNG images in 3 class folders" in capsys.readouterr().out
