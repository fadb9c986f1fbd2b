"""Evaluation modes, classifier inheritance across backbones, KD, baselines, external folders, bad input."""

from dataclasses import replace

import pytest
import torch
from helpers import class_folders, tiny_backbone, toy_data, toy_stats

from fastsfm.config import EvalConfig
from fastsfm.data.images import image_set_folder
from fastsfm.data.setfile import save_images
from fastsfm.evaluate.evaluator import (
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

CFG = EvalConfig(mode=("probe", "inherit", "kd"), epochs=3, seeds=2)


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
    scores = compare([same, cross], [ImageSet("set", x[::6], y[::6])], seeds=2)
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


def test_external_folder_loader_and_its_errors(tmp_path):
    images, labels = image_set_folder(class_folders(tmp_path / "ok", ["c2", "c0"], 2), ["c0", "c1", "c2"], 8)
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 2, 2]  # folder names -> class indices
    with pytest.raises(ValueError, match="one folder per class.*found.*'dog'"):
        image_set_folder(class_folders(tmp_path / "bad", ["c0", "dog"]), ["c0", "c1", "c2"], 8)
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


def test_an_interrupted_evaluation_resumes_bit_for_bit(setup, tmp_path, monkeypatch):
    """A journal records finished evaluations and checkpoints the running one; SIGTERM during the second
    evaluation saves it and exits 143; the rerun skips the first, continues the second, and gives the
    numbers of an uninterrupted run (also journalled: the same blocks of epochs)."""
    import os
    import signal
    from dataclasses import asdict

    from fastsfm.evaluate.probe import HeadCheckpoint

    bb, data, stats = setup
    cfg = replace(CFG, epochs=6, checkpoint_every=2)
    x, y = data.tensors
    sets = [ImageSet("a", x[::3], y[::3]), lambda seed: ImageSet("b", x[seed::4], y[seed::4])]
    cache = FeatureCache(toy_data(seed=1))
    want = compare(Evaluator(bb, stats, cache, cfg), sets, 2, full_data=False, journal=tmp_path / "whole")
    saves, real_save = [], HeadCheckpoint.save

    def save_then_signal(self, heads, opts, epoch):
        real_save(self, heads, opts, epoch)
        saves.append(epoch)
        if len(saves) == 4:  # epochs 2 and 4 of "a", then 2 and 4 of "b": stop at "b"'s second save
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(HeadCheckpoint, "save", save_then_signal)
    with pytest.raises(SystemExit) as exc:
        compare(Evaluator(bb, stats, cache, cfg), sets, 2, full_data=False, journal=tmp_path / "cut")
    assert exc.value.code == 143 and saves == [2, 4, 2, 4]
    assert len((tmp_path / "cut" / "scores.jsonl").read_text().splitlines()) == 1  # "a" of seed 0 is done
    monkeypatch.undo()
    evaluated = []
    real_evaluate = Evaluator.evaluate
    monkeypatch.setattr(
        Evaluator,
        "evaluate",
        lambda self, s, seed, c=None: evaluated.append((s.name, seed)) or real_evaluate(self, s, seed, c),
    )
    got = compare(Evaluator(bb, stats, cache, cfg), sets, 2, full_data=False, journal=tmp_path / "cut")
    assert evaluated == [("b", 0), ("a", 1), ("b", 1)]  # "a" of seed 0 came from the journal
    assert [asdict(s) for s in got] == [asdict(s) for s in want]


def test_single_seed_cells_show_the_mean_alone():
    """One seed: "48.1", never "48.1 ± 0.0" (which reads as zero variance); several: mean ± std."""
    from fastsfm.evaluate.evaluator import Score, format_markdown, summarise

    one = [Score("A", "probe", "vit", 0, 48.125, None)]
    two = one + [Score("A", "probe", "vit", 1, 50.0, None)]
    assert "| A | 48.1 |" in format_markdown(summarise(one))
    assert "| A | 49.1 ± 0.9 |" in format_markdown(summarise(two))


def test_journal_key_holds_only_what_changes_a_result(setup, tmp_path):
    """More seeds or another checkpoint cadence reuse every finished evaluation of a journal; other
    epochs, modes, sets or seeds do not."""
    bb, data, stats = setup
    cache = FeatureCache(toy_data(seed=1))
    x, y = data.tensors
    a = ImageSet("a", x[::3], y[::3])
    key = Evaluator(bb, stats, cache, CFG).key(a, 0)
    for same in (replace(CFG, seeds=5), replace(CFG, checkpoint_every=7)):
        assert Evaluator(bb, stats, cache, same).key(a, 0) == key
    for other in (replace(CFG, epochs=4), replace(CFG, mode=("probe",)), replace(CFG, probe_lr=0.5)):
        assert Evaluator(bb, stats, cache, other).key(a, 0) != key
    assert Evaluator(bb, stats, cache, CFG).key(a, 1) != key
    assert Evaluator(bb, stats, cache, CFG).key(ImageSet("b", x[::3], y[::3]), 0) != key
    first = compare(Evaluator(bb, stats, cache, CFG), [a], 1, full_data=False, journal=tmp_path / "j")
    evaluated = []
    more = Evaluator(bb, stats, cache, replace(CFG, seeds=2, checkpoint_every=1))
    real = more.evaluate
    more.evaluate = lambda s, seed, c=None: evaluated.append(seed) or real(s, seed, c)
    again = compare(more, [a], 2, full_data=False, journal=tmp_path / "j")
    assert evaluated == [1] and again[: len(first)] == first  # seed 0 from the journal
