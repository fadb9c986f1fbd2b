"""The four paper backbones compute the authors' features, proven without downloading a weight.

For each paper alias a reference model -- the authors' model code -- gets random weights (every
parameter perturbed, so any structural mismatch shows), which are written in the **published
checkpoint's own format and key names**; fastsfm loads that file through its real loading path
(``load_backbone(alias, pretrained=PATH)``, what ``--weights PATH`` runs) and must give the
reference's features on the same 224 px images to 1e-4 (max abs, fp32):

* CLIP ViT-B/16: OpenAI's model code (``clip.model`` from the ``clip-anytorch`` package, a copy of
  ``openai/CLIP``), built by ``clip.model.build_model(state_dict)`` from an OpenAI-format state dict
  in fp16 (as released), used as the authors use it: ``.visual.float()``.  Its module is loaded by
  path: the package's ``__init__`` needs ``pkg_resources``, which current setuptools no longer ships.
* DINOv2 ViT-B/14: torch.hub's model code (``dinov2.models.vision_transformer`` from the
  ``dinov2`` package, installed without its pinned dependencies), built as the hub's
  ``dinov2_vitb14`` builds it (518 px, patch 14, layer scale, plain MLP, unchunked blocks), its state
  dict saved as the hub's ``dinov2_vitb14_pretrain.pth``.
* EVA-02 B/14: timm's own ``eva02_base_patch14_224.mim_in22k`` (the authors call timm), weights in
  timm's safetensors format.
* MoCo-v3 ViT-B/16: no package provides the authors' ``VisionTransformerMoCoV3``; :class:`MoCoV3`
  below is written from its definition, with these assumptions: (1) it is timm's
  ``VisionTransformer`` plus huggingface_hub's ``PyTorchModelHubMixin``; (2) its constructor
  replaces ``pos_embed`` with a fixed (non-trained) 2-D sin-cos table: a zero row for the class
  token, then for the patch grid (h = w = 224 / 16) built from ``meshgrid(arange(w), arange(h))``
  (``ij`` indexing, flattened), ``pos_dim = D / 4``, ``omega = 1 / 10000 ** (arange(pos_dim) / pos_dim)``,
  the concatenation ``[sin(w omega), cos(w omega), sin(h omega), cos(h omega)]``; (3) the published
  checkpoint is what the mixin's ``save_pretrained`` writes (``config.json`` of the init arguments,
  ``model.safetensors``), loaded by the authors with ``from_pretrained(..., num_classes=0)``.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from timm.models.vision_transformer import VisionTransformer

from fastsfm.models.backbones import IMAGENET_MEAN, IMAGENET_STD, load_backbone

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


def _images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """The authors' dataloaders: ImageNet mean/std for every backbone."""
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _assert_same_features(alias: str, weights: Path, reference) -> None:
    x = _images()
    ours = load_backbone(alias, pretrained=str(weights), precision="fp32")
    assert ours.input_size == 224
    with torch.no_grad():
        want = reference(_normalise(x)).float()
        got = ours(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOLERANCE, (got - want).abs().max().item()


def _openai_clip_module():
    spec = importlib.util.find_spec("clip")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_vitb16_equals_openai_clip_visual(tmp_path):
    clip = _openai_clip_module()
    torch.manual_seed(1)
    full = clip.CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)  # ViT-B/16's hyper-parameters
    _perturb(full, 1)
    clip.convert_weights(full)  # released checkpoints are fp16
    state = full.state_dict()
    torch.save(state, tmp_path / "ViT-B-16.pt")
    reference = clip.build_model(dict(state)).visual.float()  # the authors: clip.load(...)[0].visual.float()
    _assert_same_features("clip_vitb16", tmp_path / "ViT-B-16.pt", reference)
    import timm

    from fastsfm.models.weights import load_into, read_state_dict

    gelu = timm.create_model("vit_base_patch16_clip_224.openai").eval()  # timm's GELU variant of the same weights
    load_into(gelu, read_state_dict(tmp_path / "ViT-B-16.pt"), "test")
    with torch.no_grad():  # is measurably different: the test can fail
        assert (gelu(_normalise(_images())) - reference(_normalise(_images()))).abs().max() > 10 * TOLERANCE


def test_dinov2_vitb14_equals_torch_hub_dinov2(tmp_path):
    from dinov2.models import vision_transformer as hub_vit

    torch.manual_seed(2)
    reference = _perturb(hub_vit.vit_base(patch_size=14, img_size=518, init_values=1.0, block_chunks=0), 2)
    torch.save(reference.state_dict(), tmp_path / "dinov2_vitb14_pretrain.pth")
    _assert_same_features("dinov2_vitb14", tmp_path / "dinov2_vitb14_pretrain.pth", reference)


def test_dinov2_position_table_is_resampled_like_the_hub_not_like_timm(tmp_path):
    """timm's load-time antialiased resampling to 16x16 gives other features: the adaptation matters."""
    import timm
    from dinov2.models import vision_transformer as hub_vit

    from fastsfm.models.weights import load_into, read_state_dict

    torch.manual_seed(3)
    reference = _perturb(hub_vit.vit_base(patch_size=14, img_size=518, init_values=1.0, block_chunks=0), 3)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    timm_way = timm.create_model("vit_base_patch14_dinov2", num_classes=0, img_size=224)
    load_into(timm_way, read_state_dict(tmp_path / "w.pth"), "test")
    with torch.no_grad():
        gap = (timm_way(_normalise(_images())) - reference(_normalise(_images()))).abs().max().item()
    assert gap > 10 * TOLERANCE


def test_eva02_vitb14_equals_timm(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(4)
    reference = _perturb(timm.create_model("eva02_base_patch14_224.mim_in22k", pretrained=False), 4)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    _assert_same_features("eva02_vitb14", tmp_path / "model.safetensors", reference)


def _sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """Assumption (2) of the module docstring, written from the definition."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


class MoCoV3(VisionTransformer, PyTorchModelHubMixin):
    """The authors' ``VisionTransformerMoCoV3`` as the module docstring describes it (assumptions 1-3)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        grid = self.patch_embed.img_size[0] // self.patch_embed.patch_size[0]
        self.pos_embed = torch.nn.Parameter(_sincos_positions(grid, self.embed_dim), requires_grad=False)


def _mocov3_checkpoint(folder: Path) -> None:
    torch.manual_seed(5)
    model = _perturb(MoCoV3(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True), 5)
    model.save_pretrained(folder)


def test_mocov3_vitb16_equals_the_mixin_class_from_a_local_checkpoint(tmp_path):
    _mocov3_checkpoint(tmp_path / "moco-v3-vit-b")
    assert {p.name for p in (tmp_path / "moco-v3-vit-b").iterdir()} >= {"config.json", "model.safetensors"}
    reference = MoCoV3.from_pretrained(tmp_path / "moco-v3-vit-b", num_classes=0)  # the authors' call
    _assert_same_features("mocov3_vitb16", tmp_path / "moco-v3-vit-b", reference)


def test_mocov3_loads_from_the_hugging_face_cache_or_says_where_to_put_it(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--nyu-visionx--moco-v3-vit-b" / "snapshots" / "0123abc"
    _mocov3_checkpoint(snapshot)
    (cache / "models--nyu-visionx--moco-v3-vit-b" / "refs").mkdir()
    (cache / "models--nyu-visionx--moco-v3-vit-b" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    found = load_backbone("mocov3_vitb16", pretrained=True)
    assert found.weights.startswith("hf-cache:") and found.feature_dim == 768
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(
        FileNotFoundError, match="huggingface-cli download nyu-visionx/moco-v3-vit-b.*config.json and model.safetensors"
    ):
        load_backbone("mocov3_vitb16", pretrained=True)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        load_backbone("mocov3_vitb16", pretrained=str(tmp_path))


def test_a_checkpoint_of_another_backbone_is_a_clear_error(tmp_path):
    _mocov3_checkpoint(tmp_path / "moco")
    with pytest.raises(ValueError, match="does not fit VisionTransformer: missing keys"):
        load_backbone("dinov2_vitb14", pretrained=str(tmp_path / "moco" / "model.safetensors"))
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="not a readable weights file"):
        load_backbone("eva02_vitb14", pretrained=str(tmp_path / "junk.pth"))


def test_hub_interpolation_is_bicubic_with_the_offset_and_no_antialias():
    """The adapted forward on its own: at 224 px the 37x37 table is resampled with the hub's scale factor."""
    dino = load_backbone("dinov2_vits14", pretrained=False, precision="fp32")
    model = dino.model
    table = model.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    want = F.interpolate(table, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", align_corners=False)
    tokens = model._pos_embed(torch.zeros(1, 16, 16, model.embed_dim))
    torch.testing.assert_close(tokens[0, 1:], (want.permute(0, 2, 3, 1).reshape(256, -1)))
