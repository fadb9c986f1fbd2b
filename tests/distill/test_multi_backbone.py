"""SFM against several backbones: one-pass statistics, the ensemble loss, chunks, resume, the CLI, the grid."""

import json
from dataclasses import replace

import pytest
import torch
from helpers import TOY_CLASSIFIER, class_folders, imagenet_folder, tiny_backbone, toy_data, toy_stats

from fastsfm.cli.commands import main
from fastsfm.config import DistillConfig
from fastsfm.data.datasets import digits, load_data
from fastsfm.data.setfile import load_images
from fastsfm.distill.loop import distill
from fastsfm.distill.objectives import SFMObjective
from fastsfm.distill.synset import SyntheticSet
from fastsfm.models.backbones import load_backbone
from fastsfm.models.ensemble import BackboneEnsemble
from fastsfm.stats import ClassStats, dataset_stats, dataset_stats_many, input_crops

CFG = DistillConfig(ipc=2, steps=4, lr=0.05, resolution=16, pyramid_extent=2, checkpoint_every=2)


def _other_backbone(image_size: int = 16):
    """A second backbone of another width (D = 64 against the tiny ViT's 192)."""
    return load_backbone("test_vit", pretrained=False, image_size=image_size, seed=1)


@pytest.fixture(scope="module")
def pair():
    a, b = tiny_backbone(), _other_backbone()
    data = toy_data()
    return [a, b], [toy_stats(a, data), toy_stats(b, data)]


def _assert_stats_equal(many: ClassStats, one: ClassStats) -> None:
    assert torch.equal(many.means, one.means) and torch.equal(many.counts, one.counts)
    torch.testing.assert_close(many.classifier_weight, one.classifier_weight, rtol=0, atol=0)
    assert many.meta == one.meta


def test_multi_backbone_one_pass_statistics_equal_one_pass_per_backbone(tmp_path):
    """Backbones of different input sizes (16 and 32 px) in one pass over an ImageFolder: each image
    decoded once, each backbone's statistics (centres, counts, real classifier, metadata) equal its own pass's."""
    backbones = [tiny_backbone(), _other_backbone(32)]
    assert input_crops(backbones) == (16, 32) and input_crops(backbones[:1]) == 16
    spec = str(class_folders(tmp_path / "f", size=40))
    options = {"classifier": TOY_CLASSIFIER, "workers": 0, "progress": False, "batch_size": 5}
    data = load_data(spec, 36, input_crops(backbones))
    images, _ = data.train_eval[0]
    assert [tuple(v.shape) for v in images] == [(3, 16, 16), (3, 32, 32)]
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    many = dataset_stats_many(backbones, data, features_path=paths, **options)
    for backbone, stats, path in zip(backbones, many, paths, strict=True):
        one = dataset_stats(backbone, load_data(spec, 36, backbone.input_size), **options)
        _assert_stats_equal(stats, one)
        assert path.exists()


def test_multi_backbone_views_of_in_memory_data_equal_their_one_crop_views():
    """The digits (held as tensors) give a tuple of centre crops per image, each its one-crop view."""
    both, small, whole = digits(32, (16, 32)), digits(32, 16), digits(32, 32)
    for i in (0, 7, len(both.train_eval) - 1):
        (a, b), label = both.train_eval[i]
        assert torch.equal(a, small.train_eval[i][0]) and torch.equal(b, whole.train_eval[i][0])
        assert label == small.train_eval[i][1]
    assert len(both.test) == len(small.test) and torch.equal(both.test[3][0][0], small.test[3][0])


def _grads(objective, synset):
    """The loss of one pass over the whole set, and the gradient of the set's pyramid levels."""
    feats, params = objective.features(synset, 0, synset.num_images, 1, grad=True)
    plans = objective.rows(synset, 0, synset.num_images)
    loss, grad = objective.finish(objective.accumulate(feats.detach(), plans, None))
    objective.backward(feats, plans, grad)
    return loss, [p.grad.clone() for p in params]


@pytest.mark.parametrize("weights", [None, (3.0, 1.0)])
def test_multi_backbone_loss_and_gradient_are_the_weighted_mean_of_single_backbone_ones(pair, weights):
    backbones, stats = pair
    config = replace(CFG, backbone_weights=weights)
    synset = SyntheticSet(3, 2, 16, extent=1, seed=0)
    for step in range(1, 4):
        synset.grow(step, torch.device("cpu"))
    cpu = torch.device("cpu")
    both = SFMObjective(BackboneEnsemble(backbones), stats, config, cpu)
    loss, grads = _grads(both, synset)
    singles = [_grads(SFMObjective(b, s, CFG, cpu), synset) for b, s in zip(backbones, stats, strict=True)]
    w = (0.5, 0.5) if weights is None else (0.75, 0.25)
    torch.testing.assert_close(loss, w[0] * singles[0][0] + w[1] * singles[1][0], rtol=1e-6, atol=0)
    assert not torch.allclose(singles[0][0], singles[1][0])  # the two losses differ: the mean is not either
    for g, ga, gb in zip(grads, singles[0][1], singles[1][1], strict=True):  # float32 backbones: relative to the scale
        torch.testing.assert_close(g, w[0] * ga + w[1] * gb, rtol=1e-5, atol=1e-5 * float(g.abs().max()))


def test_multi_backbone_chunked_equals_whole_and_resume_is_exact(pair, tmp_path):
    backbones, stats = pair
    whole = distill(backbones, stats, CFG, tmp_path / "whole", progress=False)
    chunked = distill(backbones, stats, replace(CFG, chunk_size=2), tmp_path / "chunked", progress=False)
    for x, y in zip(whole.levels, chunked.levels, strict=True):  # float32 rounding of batched products only
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    distill(backbones, stats, replace(CFG, steps=2), tmp_path / "cut", progress=False)
    resumed = distill(backbones, stats, CFG, tmp_path / "cut", resume=True, progress=False)
    for x, y in zip(whole.levels, resumed.levels, strict=True):
        assert torch.equal(x, y)
    meta = load_images(tmp_path / "whole" / "synset.safetensors")[2]
    assert (
        json.loads(meta["backbones"]) == [b.identity for b in backbones] and meta["backbone"] == backbones[0].identity
    )
    single = distill(backbones[0], stats[0], replace(CFG, steps=2), tmp_path / "single", progress=False)
    assert not torch.equal(single.levels[0], resumed.levels[0])


def test_multi_backbone_refusals(pair, tmp_path):
    backbones, stats = pair
    with pytest.raises(ValueError, match="LGM distils with one backbone"):
        distill(backbones, stats, replace(CFG, method="lgm"), tmp_path / "lgm", real=toy_data(), progress=False)
    with pytest.raises(ValueError, match="2 statistics for 1 backbones"):
        distill(backbones[:1], stats, CFG, tmp_path / "n", progress=False)
    with pytest.raises(ValueError, match="computed with backbone"):
        distill(backbones, stats[::-1], CFG, tmp_path / "swapped", progress=False)
    with pytest.raises(ValueError, match="backbone_weights has 3 weights for 2 backbones"):
        distill(backbones, stats, replace(CFG, backbone_weights=(1, 1, 1)), tmp_path / "w", progress=False)
    with pytest.raises(ValueError, match="input sizes"):
        BackboneEnsemble([backbones[0], _other_backbone(32)])
    with pytest.raises(ValueError, match="backbone_weights must not all be 0"):
        DistillConfig(backbone_weights=(0.0, 0.0))
    assert not any((tmp_path / name).exists() for name in ("lgm", "n", "swapped", "w"))


def test_multi_backbone_command_line_stats_distill_and_held_out_eval(tmp_path, capsys):
    """One statistics pass for two backbones, SFM against both, evaluation on a third (held out)."""
    out = tmp_path / "stats"
    quick = ["--device", "cpu", "--classifier-epochs", "2"]
    main(["stats", "--data", "digits", "--backbone", "digits_vit", "digits_resnet", "--out", str(out), *quick])
    written = capsys.readouterr().out
    assert (
        f"wrote {out / 'digits_vit.safetensors'}" in written and f"wrote {out / 'digits_resnet.safetensors'}" in written
    )
    pair = [str(out / "digits_vit.safetensors"), str(out / "digits_resnet.safetensors")]
    run = tmp_path / "run"
    main(["distill", "--data", "digits", "--backbone", "digits_vit", "digits_resnet", "--stats", *pair]
         + ["--out", str(run), "--steps", "3", "--backbone-weights", "2", "1", "--device", "cpu"])  # fmt: skip
    config = json.loads(load_images(run / "synset.safetensors")[2]["config"])
    assert config["backbone_weights"] == [2.0, 1.0]
    capsys.readouterr()
    main(["eval", "--data", "digits", "--backbone", "digits_resnet", "--stats", pair[1], "--synset", str(run)]
         + ["--eval-backbone", "digits_vit8", "--seeds", "1", "--epochs", "2", "--mode", "probe", "inherit"]
         + ["--device", "cpu"])  # fmt: skip
    assert "| run |" in capsys.readouterr().out  # a set of two backbones, evaluated with the second's classifier
    errors = {
        "lgm": ["distill", "--data", "digits", "--method", "lgm", "--backbone", "digits_vit", "digits_resnet"]
        + ["--stats", *pair, "--out", str(tmp_path / "lgm")],
        "pairs": ["distill", "--data", "digits", "--backbone", "digits_vit", "digits_resnet", "--stats", pair[0]]
        + ["--out", str(tmp_path / "pairs")],
        "file": ["stats", "--data", "digits", "--backbone", "digits_vit", "digits_resnet"]
        + ["--out", str(tmp_path / "x.safetensors")],
        "weights": ["stats", "--data", "digits", "--backbone", "digits_vit", "digits_resnet", "--weights", "w.pt"]
        + ["--out", str(tmp_path / "w")],
    }
    for name, argv in errors.items():
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--device", "cpu"])
        assert exc.value.code == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fastsfm {argv[0]}: error:"), (name, err)
    assert not any((tmp_path / name).exists() for name in ("lgm", "pairs", "x.safetensors", "w"))


def test_multi_backbone_grid_cells_and_one_statistics_pass(tmp_path, monkeypatch):
    from fastsfm.config import BackboneConfig, ClassifierConfig, EvalConfig
    from fastsfm.reproduce import GridConfig, plan_grid, run_grid
    from fastsfm.reproduce import cells as cells_mod

    grid = GridConfig(
        out=str(tmp_path / "grid"),
        datasets=["imagenette"],
        root=str(imagenet_folder(tmp_path / "imagenet")),
        backbones=["vit_tiny_patch16_224", "test_vit"],
        ensembles=[["vit_tiny_patch16_224", "test_vit"]],
        methods=["sfm"],
        eval_backbones="same",
        full_data=False,
        resolution=16,
        backbone=BackboneConfig(image_size=16, random_init=True),
        device="cpu",
        workers=0,
        distill=DistillConfig(steps=2, pyramid_extent=1),
        eval=EvalConfig(mode=("probe",), epochs=2, seeds=1),
        classifier=ClassifierConfig(classifier_epochs=1),
    )
    labels = [c.label() for c in plan_grid(grid)]
    assert "distill imagenette vit_tiny_patch16_224+test_vit IPC=1 sfm" in labels
    passes = []
    original = cells_mod.dataset_stats_many
    monkeypatch.setattr(
        cells_mod, "dataset_stats_many", lambda bbs, *a, **k: passes.append(len(bbs)) or original(bbs, *a, **k)
    )
    run_grid(grid, progress=False)
    assert passes == [2]  # one pass over the images for both backbones
    base = tmp_path / "grid" / "imagenette"
    made = load_images(base / "vit_tiny_patch16_224+test_vit" / "ipc1" / "sfm" / "synset.safetensors")[2]
    assert len(json.loads(made["backbones"])) == 2
    md = (base / "results_ipc1.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| vit_tiny_patch16_224+test_vit |"))
    assert row.count("|") == 5 and "|  |" not in row  # evaluated on both members ("same")
    with pytest.raises(ValueError, match="not in `backbones`"):
        run_grid(replace(grid, ensembles=[["vit_tiny_patch16_224", "vit_small_patch16_224"]]), progress=False)
    with pytest.raises(ValueError, match="backbone_weights has 3 weights"):
        run_grid(replace(grid, distill=DistillConfig(backbone_weights=(1, 2, 3))), progress=False)
    weighted = replace(grid, distill=DistillConfig(backbone_weights=(1, 2)))  # for the ensembles' cells only
    assert weighted.distill_config("sfm", 1).backbone_weights is None
    assert weighted.distill_config("sfm", 1, backbones=2).backbone_weights == (1, 2)
