"""Real-image selections: random, centroid, k-means and neighbors, per class."""

import pytest
import torch

from fastsfm.data.reals import centroid_reals, kmeans_reals, neighbor_reals, random_reals


def test_baselines_pick_per_class():
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    idx = random_reals(labels, 3, 2, seed=0)
    assert labels[idx].tolist() == [0, 0, 1, 1, 2, 2]
    feats = torch.tensor([[0.0, 1.0], [5.0, 1.0], [1.0, 1.0], [9.0, 1.0], [3.0, 1.0], [4.0, 1.0], [2.0, 1.0]])
    means = torch.tensor([[1.1, 1.0], [8.0, 1.0], [3.4, 1.0]])
    assert centroid_reals(feats, labels, means, 1).tolist() == [2, 3, 4]
    syn = torch.tensor([[2.0, 1.0], [9.0, 0.9], [0.5, 1.0]])
    # cosine, same class only: the second image (class 1) picks index 3, the third (class 2) index 4
    assert neighbor_reals(syn, torch.tensor([0, 1, 2]), feats, labels).tolist() == [6, 3, 4]
    with pytest.raises(ValueError, match="fewer than ipc=4"):
        random_reals(labels, 3, 4)


def _clusters(seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(30)
    feats = torch.randn(90, 4, generator=gen) + 5 * torch.randn(3, 4, generator=gen)[labels]
    return feats, labels


def test_kmeans_at_ipc_1_is_the_authors_centroid_selection():
    feats, labels = _clusters()
    means = torch.stack([feats[labels == c].mean(0) for c in range(3)])
    assert torch.equal(kmeans_reals(feats, labels, 3, 1), centroid_reals(feats, labels, means, 1))


def test_kmeans_picks_one_distinct_image_per_cluster_deterministically():
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(2).repeat_interleave(40)
    modes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    feats = modes[torch.arange(80) % 4] + 0.1 * torch.randn(80, 2, generator=gen)  # four modes in each class
    picks = kmeans_reals(feats, labels, 2, 4, seed=0)
    assert picks.tolist() == kmeans_reals(feats, labels, 2, 4, seed=0).tolist()  # a function of the seed
    assert labels[picks].tolist() == [0] * 4 + [1] * 4 and len(set(picks.tolist())) == 8
    for c in range(2):  # one image from each of the class's four modes
        assert sorted((picks[4 * c : 4 * c + 4] % 4).tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="fewer than ipc=50"):
        kmeans_reals(feats, labels, 2, 50)
