"""The demo backbones' self-supervised pretraining and the weights fastsfm ships."""

import torch
from safetensors import safe_open

from fastsfm.cli.commands import main
from fastsfm.config import GCAOptions
from fastsfm.loss.gca_torch import gca_loss_torch
from fastsfm.models.backbones import ALIASES, load_backbone
from fastsfm.models.pretrain import WEIGHTS, SimCLRConfig, contrastive_loss, nt_xent, pretrain


def test_nt_xent_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / 0.5
    losses = []
    for i in range(10):
        j = (i + 5) % 10
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        losses.append(-sim[i, j] + torch.logsumexp(others, 0))
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), torch.stack(losses).mean())


def test_pretraining_runs_and_changes_the_weights():
    images = torch.rand(24, 3, 32, 32)
    before = load_backbone("digits_resnet", pretrained=False).model.state_dict()
    model, losses = pretrain("digits_resnet", SimCLRConfig(epochs=2, batch=12), images, progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shipped_weights_load_offline_and_record_their_training():
    for name in ("digits_vit", "digits_resnet"):
        backbone = load_backbone(name)  # pretrained=True: the file inside the package, no download
        assert backbone.weights.startswith("fastsfm:") and backbone.input_size == 32
        assert backbone(torch.rand(2, 3, 32, 32)).shape == (2, backbone.feature_dim)
        path = WEIGHTS / f"{name}.safetensors"
        assert path.stat().st_size < 3 * 2**20  # a few MB at most
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        assert meta["method"].startswith("SimCLR") and "labels unused" in meta["method"]
        assert float(meta["linear_probe_test_accuracy"]) > 85 and '"seed": 0' in meta["config"]
        assert meta["architecture"] == ALIASES[name].timm_name


def test_contrastive_loss_picks_the_configured_loss_with_the_views_as_blocks():
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    assert torch.equal(contrastive_loss(z1, z2, SimCLRConfig()), nt_xent(z1, z2, 0.2))
    for kind in ("ince", "rince", "uot"):
        got = contrastive_loss(z1, z2, SimCLRConfig(loss=f"gca-{kind}", epsilon=0.4))
        want = gca_loss_torch(torch.cat([z1, z2]), GCAOptions(kind=kind, epsilon=0.4, pairing="blocks"))
        assert torch.equal(got, want), kind


def test_cli_pretrain_with_a_gca_loss_writes_weights_that_load(tmp_path, capsys):
    main(["pretrain", "--names", "digits_resnet", "--loss", "gca-rince", "--epochs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "digits_resnet: gca-rince loss" in out and "linear probe" in out
    path = tmp_path / "digits_resnet.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert "gca-rince" in meta["method"] and '"loss": "gca-rince"' in meta["config"]
    backbone = load_backbone("digits_resnet", pretrained=str(path))
    assert backbone(torch.rand(1, 3, 32, 32)).shape == (1, backbone.feature_dim)
