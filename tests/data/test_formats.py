"""The formats where labs keep image datasets, written here from one ImageFolder: a Hugging Face
``save_to_disk`` folder, parquet files, webdataset tar shards and the flat ILSVRC validation folder
each read the same images, labels and classes as the ImageFolder copy; bad inputs are clear errors."""

import csv
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import IMAGENETTE, class_folders, imagenet_folder

from fastsfm.data.datasets import load_data
from fastsfm.data.images import BadImageError, labels_of, stack_images

RES = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    class_folders(root / "train", per_class=4, size=RES)
    class_folders(root / "val", per_class=2, size=RES)
    return root


def _same(got, want) -> None:
    assert got.class_names == want.class_names
    for split in ("train", "train_eval", "test"):
        a, b = getattr(got, split), getattr(want, split)
        assert torch.equal(labels_of(a), labels_of(b)), split
        order = range(len(b))
        torch.testing.assert_close(stack_images(a, order), stack_images(b, order), rtol=0, atol=0)


def _samples(folder, split):
    data = load_data(str(folder / split), RES, RES)
    return [(path, data.train.classes[y]) for path, y in data.train.samples]


def test_a_hugging_face_folder_and_parquet_files_read_as_the_image_folder(folder, tmp_path):
    datasets = pytest.importorskip("datasets")
    want = load_data(f"folder:{folder}", RES, RES)
    names = want.class_names
    parts = {}
    for split, hf_split in (("train", "train"), ("val", "validation")):
        rows = _samples(folder, split)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        parts[hf_split] = datasets.Dataset.from_dict(
            {"image": [str(p) for p, _ in rows], "label": [names.index(c) for _, c in rows]}, features=features
        )
    saved = tmp_path / "hf"
    datasets.DatasetDict(parts).save_to_disk(str(saved))
    _same(load_data(f"hf:{saved}", RES, RES), want)
    parquet = tmp_path / "parquet" / "data"
    parquet.mkdir(parents=True)
    for split, part in parts.items():
        part.to_parquet(str(parquet / f"{split}-00000-of-00001.parquet"))
    _same(load_data(f"hf:{parquet.parent}", RES, RES), want)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a `save_to_disk` dataset"):
        load_data(f"hf:{tmp_path / 'empty'}", RES, RES)


def _write_shards(folder, split, out, per_shard=5):
    rows = _samples(folder, split)
    names = sorted({c for _, c in rows})
    shards = []
    for s in range(0, len(rows), per_shard):
        path = out / f"{split}-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for k, (image, cls) in enumerate(rows[s : s + per_shard], start=s):
                members = {f"s{k:05d}.png": Path(image).read_bytes(), f"s{k:05d}.cls": str(names.index(cls)).encode()}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return f"{out}/{split}-{{000..{len(shards) - 1:03d}}}.tar"


def test_webdataset_shards_read_as_the_image_folder(folder, tmp_path):
    pytest.importorskip("webdataset")
    train, val = _write_shards(folder, "train", tmp_path), _write_shards(folder, "val", tmp_path)
    got = load_data(f"wds:{train}", RES, RES, f"wds:{val}")
    want = load_data(f"folder:{folder}", RES, RES)
    assert got.class_names == ["0", "1", "2"]  # the label numbers
    want.class_names = got.class_names
    _same(got, want)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_data(f"wds:{tmp_path}/missing-{{000..001}}.tar", RES, RES)
    broken = tmp_path / "broken-000.tar"
    shutil.copy(tmp_path / "train-000.tar", broken)
    with tarfile.open(broken, "a") as tar:
        info = tarfile.TarInfo("zzz.png")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x89PNG"))
    with pytest.raises(ValueError, match="lacks an image .* or a .cls label"):
        load_data(f"wds:{broken}", RES, RES)


def test_the_flat_ilsvrc_validation_folder_reads_as_the_class_folders(tmp_path):
    root = imagenet_folder(tmp_path / "tree")
    want = load_data(f"imagenette:{root}", RES, RES)
    flat = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(root / "train", flat / "train")
    (flat / "val").mkdir()
    with open(tmp_path / "LOC_val_solution.csv", "w", newline="") as f:  # three folders up, as Kaggle's copy
        out = csv.writer(f)
        out.writerow(["ImageId", "PredictionString"])
        for k, (path, y) in enumerate(want.test.samples):
            image_id = f"ILSVRC2012_val_{k:08d}"
            shutil.copy(path, flat / "val" / f"{image_id}.JPEG")
            out.writerow([image_id, f"{IMAGENETTE[y]} 1 2 3 4"])
    got = load_data(f"imagenette:{flat}", RES, RES)
    _same(got, want)
    (flat / "val" / "ILSVRC2012_val_00000003.JPEG").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="ILSVRC2012_val_00000003.JPEG"):
        got.test[3]
