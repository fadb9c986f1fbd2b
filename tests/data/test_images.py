"""Datasets and data loading: the embedded digits, image folders, fingerprints, loader sizing."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastsfm.data.datasets import digits, image_folder
from fastsfm.data.images import default_workers, fingerprint, labels_of, loader_kwargs, shm_items


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


def test_loader_defaults_keep_a_gpu_fed(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 4  # the node's CPUs shared among its ranks
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_workers() == 1
    assert loader_kwargs("cuda", 3) == {"num_workers": 3, "pin_memory": True, "persistent_workers": True}
    assert loader_kwargs("cpu", 0) == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}


def test_batches_in_flight_fit_in_shared_memory():
    """A 256 px float image is 786,432 bytes; a container's default /dev/shm is 64 MiB."""
    image = 3 * 256 * 256 * 4
    assert shm_items(image, workers=8, prefetch=2, free=64 * 2**20) == 2  # 32 MiB / (16 batches x 0.75 MiB)
    assert shm_items(image, workers=8, free=16 * 2**30) == 682
    assert shm_items(image, workers=64, free=64 * 2**20) == 0  # not one image per batch: load in the main process
