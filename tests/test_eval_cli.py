"""Evaluation, classifier inheritance, baselines and the command line on tiny data."""

import numpy as np
import pytest
import torch
from helpers import tiny_backbone, toy_data, toy_stats
from PIL import Image

from fastsfm.baselines.reals import centroid_reals, random_reals
from fastsfm.cli import main
from fastsfm.evaluate import evaluate_images, summarise
from fastsfm.inherit import InheritedClassifier


def test_inherited_classifier_starts_as_the_real_classifier():
    bb = tiny_backbone()
    stats = toy_stats(bb, toy_data())
    f = torch.randn(4, 192)
    torch.testing.assert_close(InheritedClassifier(stats)(f), f @ stats.classifier_weight.T + stats.classifier_bias)
    torch.testing.assert_close(InheritedClassifier(stats, diagonal=True)(f), InheritedClassifier(stats)(f))


def test_baselines_pick_per_class():
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    idx = random_reals(labels, 3, 2, seed=0)
    assert labels[idx].tolist() == [0, 0, 1, 1, 2, 2]
    feats = torch.tensor([[0.0], [5.0], [1.0], [9.0], [3.0], [4.0], [2.0]])
    means = torch.tensor([[1.1], [8.0], [3.4]])
    assert centroid_reals(feats, labels, means, 1).tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="fewer than ipc=4"):
        random_reals(labels, 3, 4)


def test_evaluate_and_summarise():
    bb = tiny_backbone()
    data = toy_data()
    stats = toy_stats(bb, data)
    x, y = data.tensors
    scores = [evaluate_images(bb, x[::6], y[::6], bb(x), y, stats, epochs=2, seed=s, method="m") for s in range(2)]
    assert all(0 <= s.probe <= 100 and 0 <= s.inherit <= 100 for s in scores)
    (row,) = summarise(scores)
    assert row["seeds"] == 2 and "inherit std" in row


def _folder(root, classes=("a", "b", "c"), per_class=4):
    rng = np.random.default_rng(0)
    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            arr = np.clip(rng.normal(60 * i + 40, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{j}.png")
    return root


def test_cli_stats_distill_eval_on_an_image_folder(tmp_path, capsys):
    train, test = _folder(tmp_path / "train"), _folder(tmp_path / "test", per_class=2)
    bb = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--image-size", "16", "--device", "cpu"]
    main(
        [
            "stats",
            "--data",
            str(train),
            "--out",
            str(tmp_path / "s.safetensors"),
            "--workers",
            "0",
            "--classifier-epochs",
            "2",
            *bb,
        ]
    )
    run = tmp_path / "run"
    main(
        [
            "distill",
            "--data",
            str(train),
            "--stats",
            str(tmp_path / "s.safetensors"),
            "--out",
            str(run),
            "--steps",
            "3",
            "--resolution",
            "16",
            "--init",
            "real",
            "--param",
            "pixels",
            *bb,
        ]
    )
    assert (run / "synset.png").exists()
    main(
        [
            "eval",
            "--data",
            str(train),
            "--test-data",
            str(test),
            "--synset",
            str(run / "synset.safetensors"),
            "--stats",
            str(tmp_path / "s.safetensors"),
            "--baselines",
            "--epochs",
            "2",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "table.json"),
            *bb,
        ]
    )
    out = capsys.readouterr().out
    assert "centroid real (IPC=1)" in out and "inherit mean" in out
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--stats", str(tmp_path / "s.safetensors"), "--out", str(run), "--steps", "3", *bb])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err


def test_cli_demo_tiny(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path / "demo"), "--seeds", "1", "--steps", "2", "--probe-epochs", "1"])
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in out and "SFM" in out and "centroid real" in out
    assert (tmp_path / "demo" / "comparison.png").exists() and (tmp_path / "demo" / "results.json").exists()


@pytest.mark.parametrize("command", ["stats", "distill", "eval", "demo"])
def test_cli_help_lists_options(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and (command == "demo" or "--backbone" in out)


def test_distill_flags_are_derived_from_the_config(capsys):
    from fastsfm.config import DistillConfig, cli_fields

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    for name, *_ in cli_fields(DistillConfig):
        assert "--" + name.replace("_", "-") in out, name
    assert "{sfm,lgm}" in out and "{auto,bf16,fp16,fp32}" in out and "--no-offload" in out
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--stats", "s", "--out", "o", "--objective", "pairwise"])
    assert exc.value.code == 2 and "invalid choice: 'pairwise'" in capsys.readouterr().err


def test_cli_distill_chunked_offloaded_views(tmp_path, capsys):
    train = _folder(tmp_path / "train")
    bb = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--image-size", "16", "--device", "cpu"]
    main(
        [
            "stats",
            "--data",
            str(train),
            "--out",
            str(tmp_path / "s.safetensors"),
            "--workers",
            "0",
            "--classifier-epochs",
            "1",
            "--resolution",
            "20",
            *bb,
        ]
    )
    run = tmp_path / "run"
    main(
        [
            "distill",
            "--stats",
            str(tmp_path / "s.safetensors"),
            "--out",
            str(run),
            "--steps",
            "2",
            "--resolution",
            "20",
            "--views",
            "2",
            "--chunk-size",
            "2",
            "--offload",
            "--precision",
            "bf16",
            "--objective",
            "decouple",
            "--alpha",
            "0.5",
            *bb,
        ]
    )
    assert (run / "synset.safetensors").exists() and (run / "loss.png").exists()
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--stats", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "r2"), "--ipc", "0", *bb])
    assert exc.value.code == 2 and "ipc must be at least 1" in capsys.readouterr().err
