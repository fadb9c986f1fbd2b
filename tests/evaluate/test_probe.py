"""Linear heads: accuracy, the real-data classifier, and training that resumes exactly from checkpoints."""

import pytest
import torch

from fastsfm.config import ClassifierConfig
from fastsfm.evaluate.probe import Head, HeadCheckpoint, topk_accuracy, train_heads
from fastsfm.models.classifier import fit_linear_classifier, new_head


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(logits, torch.tensor([1, 2, 0]), ks=(1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3) and acc[5] is None


def test_real_classifier_follows_the_config():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 5, generator=gen) + 3 * torch.eye(3, 5)[torch.arange(300) % 3]
    labels = torch.arange(300) % 3
    head = fit_linear_classifier(feats, labels, 3, ClassifierConfig(classifier_epochs=20, classifier_lr=0.05))
    assert (head(feats).argmax(1) == labels).float().mean() > 0.9


class _Stop:
    """Stands in for StopSignals: asks to stop once ``after`` checkpoints were written."""

    def __init__(self, after):
        self.after, self.saves, self.code = after, 0, 143

    def requested(self):
        self.saves += 1
        return self.saves >= self.after


def _train(checkpoint=None):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 8, 8, generator=gen)
    labels = torch.arange(12) % 3
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 6)).requires_grad_(False)
    head = new_head(6, 3, seed=1)
    heads = {("enc", "probe"): Head(head, lambda f, y: torch.nn.functional.cross_entropy(head(f["enc"]), y), 0.05)}
    noise = lambda x, keys: x + 0.01 * keys.float()[:, None, None, None]  # noqa: E731 - a keyed "augmentation"
    train_heads(heads, images, labels, {"enc": encoder}, noise, epochs=7, batch=5, seed=3, checkpoint=checkpoint)
    return head.weight.detach().clone(), head.bias.detach().clone()


def test_training_interrupted_at_a_checkpoint_resumes_bit_for_bit(tmp_path):
    """Checkpoints every 2 epochs; a stop after the second one (epoch 4) exits with the signal's code;
    the rerun restores heads, Adam moments and the schedule and ends with the uninterrupted weights."""
    whole = _train(HeadCheckpoint(tmp_path / "whole.safetensors", "k", every=2))
    path = tmp_path / "cut.safetensors"
    with pytest.raises(SystemExit) as exc:
        _train(HeadCheckpoint(path, "k", every=2, stop=_Stop(after=2)))
    assert exc.value.code == 143 and path.exists()
    resumed = _train(HeadCheckpoint(path, "k", every=2))
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))
    other = _train(HeadCheckpoint(path, "another evaluation", every=2))  # a foreign checkpoint is ignored
    assert all(torch.equal(a, b) for a, b in zip(whole, other, strict=True))
