"""The command line end to end on tiny data: stats, distill, eval, demo, help and errors."""

import pytest
from helpers import class_folders

from fastsfm.cli import main

BACKBONE = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--image-size", "16", "--device", "cpu"]


def _stats(train, out, bb, epochs: int, resolution: int = 16) -> None:
    main(
        [
            "stats",
            "--data",
            str(train),
            "--out",
            str(out),
            "--workers",
            "0",
            "--classifier-epochs",
            str(epochs),
            "--resolution",
            str(resolution),
            *bb,
        ]
    )


def test_cli_stats_distill_eval_on_an_imageclass_folders(tmp_path, capsys):
    train, test = class_folders(tmp_path / "train"), class_folders(tmp_path / "test", per_class=2)
    bb = BACKBONE
    _stats(train, tmp_path / "s.safetensors", bb, epochs=2)
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
    other = tmp_path / "other_method"  # images of another method: one folder per class
    class_folders(other, per_class=1, size=16)
    main(
        [
            "eval",
            "--data",
            str(train),
            "--test-data",
            str(test),
            "--synset",
            str(run / "synset.safetensors"),
            str(other),
            "--stats",
            str(tmp_path / "s.safetensors"),
            "--baselines",
            "random",
            "centroid",
            "kmeans",
            "neighbors",
            "full",
            "--mode",
            "probe",
            "inherit",
            "kd",
            "--epochs",
            "2",
            "--seeds",
            "1",
            "--resolution",
            "16",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "eval"),
            "--eval-backbone",
            "vit_tiny_patch16_224",
            *bb,
        ]
    )
    out = capsys.readouterr().out
    for row in (
        "| run |",
        "| other_method |",
        "| random reals (IPC=1) |",
        "| centroid reals (IPC=1) |",
        "| k-means reals (IPC=1) |",
        "| neighbors of run (IPC=1) |",
        "| neighbors of other_method (IPC=1) |",
        "| full data |",
    ):
        assert row in out, row
    assert (tmp_path / "eval" / "journal" / "scores.jsonl").exists()  # finished evaluations, as they ended
    assert "probe (vit_tiny_patch16_224) | inherit (vit_tiny_patch16_224) | kd (vit_tiny_patch16_224)" in out
    assert (tmp_path / "eval" / "results.json").exists() and (tmp_path / "eval" / "results.md").exists()
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--stats", str(tmp_path / "s.safetensors"), "--out", str(run), "--steps", "3", *bb])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err


def test_cli_eval_bad_inputs_write_nothing(tmp_path, capsys):
    train, test = class_folders(tmp_path / "train"), class_folders(tmp_path / "test", per_class=2)
    bb = BACKBONE
    _stats(train, tmp_path / "s.safetensors", bb, epochs=1)
    common = [
        "eval",
        "--data",
        str(train),
        "--test-data",
        str(test),
        "--stats",
        str(tmp_path / "s.safetensors"),
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--resolution",
        "16",
        "--out",
        str(tmp_path / "eval"),
    ]
    (tmp_path / "empty").mkdir()
    cases = [
        (["--synset", str(tmp_path / "empty"), *bb], "one folder per class"),
        (
            [
                "--baselines",
                "random",
                "--backbone",
                "vit_tiny_patch16_224",
                "--random-init",
                "--image-size",
                "16",
                "--device",
                "cpu",
                "--preprocess",
                "model",
            ],
            "computed with backbone",
        ),  # statistics of another backbone
        (["--synset", str(tmp_path / "missing.safetensors"), *bb], "does not exist"),
        ([*bb], "nothing to evaluate"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(common + extra)
        assert exc.value.code == 2 and message in capsys.readouterr().err, message
    assert not (tmp_path / "eval").exists()


def test_cli_demo_tiny(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path / "demo"), "--seeds", "1", "--steps", "2", "--eval-epochs", "1"])
    out = capsys.readouterr().out
    assert "pre-trained self-supervised" in out and "| SFM |" in out and "| centroid real |" in out
    assert "| nearest reals of SFM |" in out and "inherit (digits_resnet)" in out and "| full data |" in out
    for name in ("comparison.png", "results.json", "results.md", "sfm-seed0/synset.png"):
        assert (tmp_path / "demo" / name).exists(), name
    main(
        [
            "demo",
            "--out",
            str(tmp_path / "random"),
            "--seeds",
            "1",
            "--steps",
            "1",
            "--eval-epochs",
            "1",
            "--random-init",
        ]
    )
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["stats", "distill", "eval", "reproduce", "demo"])
def test_cli_help_lists_options(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and (command in ("demo", "reproduce") or "--backbone" in out)


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
    train = class_folders(tmp_path / "train")
    bb = BACKBONE
    _stats(train, tmp_path / "s.safetensors", bb, epochs=1, resolution=20)
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
