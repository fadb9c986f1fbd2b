"""The one builder of baseline sets: selections, their names, their files (the grid's indices.json)."""

import json

import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats

from fastsfm.data.images import ImageData
from fastsfm.evaluate.baselines import Selection, baseline_sources, select
from fastsfm.evaluate.evaluator import ImageSet


@pytest.fixture(scope="module")
def setup():
    bb, train = tiny_backbone(), toy_data()
    data = ImageData(train, train, toy_data(seed=1), ["c0", "c1", "c2"], "toy")
    return bb, data, toy_stats(bb, train)


def test_each_baseline_selects_per_class_and_names_its_set(setup):
    bb, data, stats = setup
    labels = data.train.tensors[1]
    feats = bb(data.train.tensors[0])
    random = select("random", labels, 3, 2, seeds=2)
    assert set(random.indices) == {"0", "1"} and random.name == "random reals (IPC=2)"
    assert random.picks(0).tolist() != random.picks(1).tolist()  # a new draw per seed
    centroid = select("centroid", labels, 3, 2, features=feats, means=stats.means)
    kmeans = select("kmeans", labels, 3, 2, features=feats, means=stats.means)
    for chosen in (centroid, kmeans):
        assert labels[chosen.picks(0)].tolist() == [0, 0, 1, 1, 2, 2]
    synthetic = ImageSet("SFM", torch.rand(3, 3, 16, 16), torch.arange(3))
    neighbors = select("neighbors", labels, 3, 1, features=feats, synthetic=synthetic, backbone=bb)
    assert neighbors.name == "neighbors of SFM (IPC=1)" and labels[neighbors.picks(0)].tolist() == [0, 1, 2]
    image_set = kmeans.image_set(data)
    assert image_set.name == "k-means reals (IPC=2)" and image_set.images.shape == (6, 3, 16, 16)
    with pytest.raises(ValueError, match="needs the train features"):
        select("centroid", labels, 3, 1)
    with pytest.raises(ValueError, match="unknown baseline 'herding'"):
        select("herding", labels, 3, 1)


def test_selections_round_trip_and_read_the_grids_earlier_files(tmp_path):
    chosen = Selection("random", 1, {"0": [1, 2], "1": [0, 3]})
    chosen.save(tmp_path / "indices.json")
    assert Selection.load(tmp_path / "indices.json") == chosen
    (tmp_path / "old.json").write_text(json.dumps({"method": "centroid", "ipc": 1, "indices": {"all": [4, 5]}}))
    assert Selection.load(tmp_path / "old.json").picks(7).tolist() == [4, 5]  # written before this module
    (tmp_path / "bad.json").write_text('{"ipc": 1}')
    with pytest.raises(ValueError, match="not a baseline selection"):
        Selection.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="not a readable baseline selection"):
        Selection.load(tmp_path / "junk.json")


def test_sources_encode_the_train_split_once_and_neighbor_every_synthetic_set(setup):
    bb, data, stats = setup
    calls = []

    def features():
        calls.append(1)
        return bb(data.train.tensors[0])

    synthetic = [ImageSet(name, torch.rand(3, 3, 16, 16), torch.arange(3)) for name in ("A", "B")]
    sources = baseline_sources(
        data, ["random", "centroid", "kmeans", "neighbors"], 1, 2, features, stats.means, synthetic, bb
    )
    names = [(s(0) if callable(s) else s).name for s in sources]
    assert names == [
        "random reals (IPC=1)",
        "centroid reals (IPC=1)",
        "k-means reals (IPC=1)",
        "neighbors of A (IPC=1)",
        "neighbors of B (IPC=1)",
    ]
    assert calls == [1]
    assert baseline_sources(data, ["random"], 1, 2, features, stats.means) and calls == [1]  # random needs none
