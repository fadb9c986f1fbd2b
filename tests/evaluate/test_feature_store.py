"""Encoded real features on disk: reused by later calls, keyed by what determines them, re-encoded when damaged."""

import torch
from helpers import tiny_backbone, toy_data

from fastsfm.evaluate.evaluator import FeatureCache
from fastsfm.evaluate.feature_store import stored_features


def test_features_are_stored_reused_and_keyed(tmp_path):
    bb, data = tiny_backbone(), toy_data()
    calls = []

    def encode():
        calls.append(1)
        return torch.randn(len(data), 4)

    first = stored_features(tmp_path, data, "train", bb, 32, "fp32", encode)
    again = stored_features(tmp_path, data, "train", bb, 32, "fp32", encode)
    assert len(calls) == 1 and torch.equal(first, again)
    for other in (("test", 32, "fp32", data), ("train", 64, "fp32", data), ("train", 32, "bf16", data)) + (
        ("train", 32, "fp32", toy_data(seed=3)),
    ):
        split, resolution, precision, dataset = other
        stored_features(tmp_path, dataset, split, bb, resolution, precision, encode)
    assert len(calls) == 5 and len(list(tmp_path.glob("*.safetensors"))) == 5
    stored_features(tmp_path, data, "train", tiny_backbone(seed=9), 32, "fp32", encode)  # other weights
    assert len(calls) == 6
    stored_features(None, data, "train", bb, 32, "fp32", encode)  # no folder: always encoded
    assert len(calls) == 7


def test_a_damaged_file_is_encoded_again(tmp_path, caplog):
    bb, data = tiny_backbone(), toy_data()
    stored_features(tmp_path, data, "train", bb, 32, "fp32", lambda: torch.zeros(len(data), 4))
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    got = stored_features(tmp_path, data, "train", bb, 32, "fp32", lambda: torch.ones(len(data), 4))
    assert torch.equal(got, torch.ones(len(data), 4)) and "damaged" in caplog.text


def test_the_test_split_cache_reads_what_an_earlier_evaluation_encoded(tmp_path):
    bb, test = tiny_backbone(), toy_data(seed=1)
    want = FeatureCache(test, disk=tmp_path, resolution=32)(bb)
    later = FeatureCache(test, disk=tmp_path, resolution=32)
    later.workers = "not used: nothing is encoded"
    assert torch.equal(later(bb), want)
