"""Classifier inheritance and KD as the authors define them."""

import pytest
import torch

from fastsfm.evaluate.inherit import InheritedClassifier, kd_loss
from fastsfm.evaluate.probe import Head, train_heads


class _Linear(torch.nn.Module):
    """A 'backbone' that is a fixed linear map of the pixel means: features known in closed form."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix, self.input_size = matrix, 8

    def forward(self, x):
        return x.mean((2, 3)) @ self.matrix.T


def test_projector_recovers_an_exact_linear_map_between_feature_spaces():
    """Distillation features are an exact linear map of evaluation features (different D): MSE -> 0."""
    gen = torch.Generator().manual_seed(0)
    eval_bb = _Linear(torch.randn(5, 3, generator=gen))
    distill_bb = _Linear(torch.randn(7, 5, generator=gen) @ eval_bb.matrix)
    inherited = InheritedClassifier(torch.randn(4, 7), torch.zeros(4), eval_dim=5)
    images = torch.rand(40, 3, 1, 1, generator=gen).expand(-1, -1, 8, 8)  # well-spread pixel means
    head = Head(inherited, lambda f, y: inherited.regression_loss(f["eval"], f["distill"]), lr=0.05)
    train_heads(
        {"inherit": head},
        images,
        torch.zeros(40, dtype=torch.long),
        {"eval": eval_bb, "distill": distill_bb},
        lambda x, k: x,
        epochs=1500,
        batch=40,
        seed=0,
    )
    with torch.no_grad():
        f_eval, f_distill = eval_bb(images), distill_bb(images)
        assert torch.nn.functional.mse_loss(inherited.project(f_eval), f_distill) < 1e-6


def test_identity_projector_starts_as_the_real_classifier():
    w, b = torch.randn(4, 6), torch.randn(4)
    f = torch.randn(3, 6)
    torch.testing.assert_close(InheritedClassifier(w, b, 6, identity=True)(f), f @ w.T + b)
    with pytest.raises(ValueError, match="identity projector needs D_eval = D_distill"):
        InheritedClassifier(w, b, 5, identity=True)


def test_kd_loss_is_the_authors():
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    p = torch.softmax(t / 4, 1)
    kl = (p * (p.log() - torch.log_softmax(s / 4, 1))).sum(1).mean()
    want = 0.5 * 16 * kl + 0.5 * torch.nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(kd_loss(s, t, y), want)
