"""Evaluation modes, classifier inheritance across backbones, KD, baselines, external folders, bad input."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats
from PIL import Image

from fastsfm.baselines.reals import centroid_reals, neighbor_reals, random_reals
from fastsfm.config import ClassifierConfig, EvalConfig
from fastsfm.data import image_set_folder
from fastsfm.evaluate import (
    Evaluator,
    FeatureCache,
    ImageSet,
    Score,
    compare,
    format_markdown,
    load_image_set,
    summarise,
    write_results,
)
from fastsfm.inherit import InheritedClassifier, kd_loss
from fastsfm.probe import Head, fit_linear_classifier, topk_accuracy, train_heads
from fastsfm.synset import save_images

CFG = EvalConfig(mode=("probe", "inherit", "kd"), epochs=3, seeds=2)


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


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(logits, torch.tensor([1, 2, 0]), ks=(1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3) and acc[5] is None


@pytest.fixture(scope="module")
def setup():
    bb, data = tiny_backbone(), toy_data()
    return bb, data, toy_stats(bb, data)


def test_every_mode_same_and_cross_backbone_with_different_dims(setup):
    bb, data, stats = setup
    other = tiny_backbone(seed=4)
    other.model.head = torch.nn.Linear(192, 50)  # a different feature dimension: D_eval = 50 != D_distill = 192
    other.feature_dim, other.name = 50, "other"
    cache = FeatureCache(toy_data(seed=1))
    same = Evaluator(bb, stats, cache, CFG)
    cross = Evaluator(bb, stats, cache, replace(CFG, mode=("inherit", "kd")), eval_backbones=[other])
    x, y = data.tensors
    scores = compare([same, cross], {"set": ImageSet("", x[::6], y[::6])}, seeds=2)
    assert {(s.mode, s.backbone) for s in scores} == {
        ("probe", bb.name),
        ("inherit", bb.name),
        ("kd", bb.name),
        ("inherit", other.name),
        ("kd", other.name),
        ("classifier", bb.name),
    }
    assert all(0 <= s.top1 <= 100 for s in scores) and len(scores) == 2 * 5 + 1
    assert len(cache.features) == 2  # test features encoded once per evaluation backbone
    rows = summarise(scores)
    assert all(r["seeds"] == 2 for r in rows if r["set"] == "set")
    table = format_markdown(rows)
    assert "| set | probe (vit_tiny_patch16_224)" in table and "full data" in table
    # several evaluation backbones in one evaluator: one pass over the views, the same scores
    both = Evaluator(bb, stats, cache, replace(CFG, mode=("inherit", "kd", "inherit_ce")), eval_backbones=[bb, other])
    joint = both.evaluate(ImageSet("set", x[::6], y[::6]), seed=1)
    alone = cross.evaluate(ImageSet("set", x[::6], y[::6]), seed=1)
    assert [s.top1 for s in joint if s.backbone == "other"] == [s.top1 for s in alone]
    assert {s.backbone for s in joint if s.mode == "inherit_ce"} == {bb.name}  # distillation backbone only


def test_seeded_evaluation_is_reproducible(setup):
    bb, data, stats = setup
    evaluator = Evaluator(bb, stats, FeatureCache(toy_data(seed=1)), CFG)
    x, y = data.tensors
    a = evaluator.evaluate(ImageSet("a", x[::3], y[::3]), seed=3)
    b = evaluator.evaluate(ImageSet("a", x[::3], y[::3]), seed=3)
    assert [s.top1 for s in a] == [s.top1 for s in b]


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


def _folder(root, classes, per_class=2, size=12):
    rng = np.random.default_rng(0)
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(np.clip(rng.normal(60 * i + 40, 20, (size, size, 3)), 0, 255).astype(np.uint8)).save(
                root / name / f"{j}.png"
            )
    return root


def test_external_folder_loader_and_its_errors(tmp_path):
    images, labels = image_set_folder(_folder(tmp_path / "ok", ["c2", "c0"]), ["c0", "c1", "c2"], 8)
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 2, 2]  # folder names -> class indices
    with pytest.raises(ValueError, match="one folder per class.*found.*'dog'"):
        image_set_folder(_folder(tmp_path / "bad", ["c0", "dog"]), ["c0", "c1", "c2"], 8)
    (tmp_path / "empty" / "c0").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        image_set_folder(tmp_path / "empty", ["c0", "c1"], 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_set_folder(tmp_path / "none", ["c0"], 8)


def test_bad_inputs_are_clear_errors(setup, tmp_path):
    bb, data, stats = setup
    cache = FeatureCache(toy_data(seed=1))
    with pytest.raises(ValueError, match="computed with backbone"):
        Evaluator(tiny_backbone(seed=7), stats, cache, CFG)  # statistics of another backbone
    four = FeatureCache(toy_data(classes=4))
    with pytest.raises(ValueError, match="labels up to 3, the statistics only 3 classes"):
        Evaluator(bb, stats, four, CFG)
    evaluator = Evaluator(bb, stats, cache, CFG)
    with pytest.raises(ValueError, match="labels in \\[0, 5\\], the statistics 3 classes"):
        evaluator.evaluate(ImageSet("x", torch.rand(2, 3, 16, 16), torch.tensor([0, 5])), 0)
    x, y = data.tensors
    save_images(tmp_path / "s.safetensors", x[:3], y[:3], {"backbone": "other|w|16px|authors", "num_classes": "3"})
    with pytest.raises(ValueError, match="distilled with backbone 'other"):
        load_image_set(tmp_path / "s.safetensors", stats, 16)
    with pytest.raises(ValueError, match="mode must be a non-empty subset"):
        EvalConfig(mode=("probe", "linear"))


def test_write_results(tmp_path):
    scores = [Score("a", "probe", "vit", s, 50.0 + s, 90.0) for s in range(3)]
    rows = write_results(scores, tmp_path, {"note": "x"})
    assert rows[0]["top1 mean"] == 51.0 and rows[0]["top1 std"] == pytest.approx((2 / 3) ** 0.5)
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("Top-1 accuracy (%)\n\n| set | probe (vit) |") and "| a | 51.0 ± 0.8 |" in text
    assert "Top-5 accuracy (%)" in text and "| a | 90.0 ± 0.0 |" in text


def test_real_classifier_follows_the_config():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 5, generator=gen) + 3 * torch.eye(3, 5)[torch.arange(300) % 3]
    labels = torch.arange(300) % 3
    head = fit_linear_classifier(feats, labels, 3, ClassifierConfig(classifier_epochs=20, classifier_lr=0.05))
    assert (head(feats).argmax(1) == labels).float().mean() > 0.9
