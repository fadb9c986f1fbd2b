"""Backbones: seeded random initialisation, the paper aliases and their preprocessing, precision, weights."""

import pytest
import torch
from helpers import tiny_backbone
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from fastsfm.models.backbones import load_backbone


def test_random_init_backbone_is_seeded_and_frozen():
    a, b, c = tiny_backbone(0), tiny_backbone(0), tiny_backbone(1)
    x = torch.rand(2, 3, 20, 20)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert a.identity == "vit_tiny_patch16_224|random-init(seed=0)|16px|authors"
    assert not any(p.requires_grad for p in a.parameters()) and not a.train().training
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        a(torch.rand(3, 16, 16))


def test_paper_aliases_run_at_224_with_the_authors_preprocessing():
    from fastsfm.models.backbones import ALIASES, AUTHOR_NAMES, IMAGENET_MEAN, IMAGENET_STD

    assert {
        "dinov2_vitb14",
        "clip_vitb16",
        "eva02_vitb14",
        "mocov3_vitb16",
        "dino_vitb16",
        "dinov2_vits14",
        "dinov2_vitl14",
        "clip_vitb32",
        "clip_vitl14",
        "eva02_vitt14",
        "eva02_vits14",
        "eva02_vitl14",
        "mocov3_vitl16",
    } <= set(ALIASES)
    assert all(alias in ALIASES for alias in AUTHOR_NAMES.values())
    clip = load_backbone("clip_vitb", pretrained=False)  # the authors' name of CLIP ViT-B/16
    assert clip.name == "clip_vitb16" and clip.input_size == 224 and clip.feature_dim == 512  # projected embedding
    assert (clip.mean, clip.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert clip(torch.rand(1, 3, 224, 224)).shape == (1, 512)
    own = load_backbone("eva02_vitt14", pretrained=False, preprocess="model")
    assert own.input_size == 224 and own.mean != IMAGENET_MEAN and own.identity.endswith("|224px|model")
    dino = load_backbone("dinov2_vits14", pretrained=False)  # timm's default input would be 518 px
    assert dino.input_size == 224 and dino.model.patch_embed.img_size == (518, 518)  # the native 37x37 table
    assert dino(torch.rand(1, 3, 224, 224)).shape == (1, 384)  # interpolated to 16x16 at the forward
    with pytest.raises(ValueError, match="preprocess must be"):
        load_backbone("eva02_vitt14", pretrained=False, preprocess="clip")


def test_backbone_precision_runs_under_autocast():
    bb = tiny_backbone()
    x = torch.rand(3, 3, 16, 16)
    bb.precision = "bf16"
    low = bb(x)
    bb.precision = "fp32"
    assert low.dtype == torch.float32 and not torch.equal(low, bb(x))
    torch.testing.assert_close(low, bb(x), rtol=0.05, atol=0.05)


def test_backbone_local_weight_file_and_missing_weights(tmp_path):
    src = tiny_backbone(3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    loaded = load_backbone("vit_tiny_patch16_224", pretrained=str(path), image_size=16)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), src(x))
    assert loaded.identity.startswith("vit_tiny_patch16_224|file:")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone("vit_tiny_patch16_224", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_backbone("vit_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "dinov2_vits14", "clip_vitb16"])
def test_cls_only_last_block_equals_the_full_block_in_float64(name):
    """The last block computed for the class token only gives the full model's features to float64
    rounding (values and input gradients), and leaves the state dict's keys alone."""
    import types

    bb = load_backbone(name, pretrained=False, image_size=28 if "dinov2" in name else 32, precision="fp32")
    assert bb.cls_only
    model = bb.model.double()
    images = torch.rand(3, 3, bb.input_size, bb.input_size, dtype=torch.float64, requires_grad=True)
    x = bb.normalize(images)
    got = model(x)
    last = model.blocks[-1]
    last.forward = types.MethodType(type(last).forward, last)  # the full block again
    reference = images.detach().clone().requires_grad_()
    want = model(bb.normalize(reference))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    upstream = torch.randn_like(got)
    got.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(images.grad, reference.grad, rtol=0, atol=1e-12)
    assert all(".forward" not in k for k in model.state_dict())


def test_cls_only_is_not_used_where_features_are_not_the_class_token():
    """EVA-02's features are its average-pooled tokens (timm's Eva): every token of the last block counts."""
    assert not load_backbone("eva02_vitt14", pretrained=False, image_size=28).cls_only


class _Casts(TorchDispatchMode):
    """Counts ``aten._to_copy`` calls (autocast's casts among them)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,size", [("dinov2_vits14", 28), ("digits_resnet", 32)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_precast_weights_equal_autocast_bitwise_and_cast_nothing_per_forward(name, size, dtype):
    """Linear/conv weights cast once (fastsfm.models.cast_weights) give autocast's features and input
    gradients bit for bit, and a forward no longer casts any of them (one ``_to_copy`` fewer each)."""
    bb = load_backbone(name, pretrained=False, image_size=size, precision=dtype)
    x = torch.rand(2, 3, size, size, requires_grad=True)
    bb(x)  # the first forward makes the copies
    with _Casts() as ours:
        feats = bb(x)
    (grad,) = torch.autograd.grad(feats.square().sum(), x)
    with torch.autocast("cpu", dtype=bb.autocast_dtype()), _Casts() as autocast:
        want = bb.model(bb.normalize(x)).float()
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    assert torch.equal(feats, want) and torch.equal(grad, want_grad)
    assert autocast.count - ours.count == len(bb._cast.names()) > 0
    assert all(p.dtype == torch.float32 for p in bb.parameters())  # the real side still runs in float32


def test_compiled_backbone_traces_whole_and_equals_eager():
    """``compile=True``: one graph (fullgraph: a break would raise) through the class-token-only last
    block and the pre-cast weights; features and input gradients equal eager's.  (DINOv2, CLIP, EVA-02
    and MoCo-v3 trace whole too -- the hub position table included --, 15-55 s each on this CPU: checked
    once, benches/RESULTS.md, not in the suite.)"""
    from fastsfm.config import BackboneConfig
    from fastsfm.models.backbones import from_config

    config = BackboneConfig(backbone="digits_vit", random_init=True, precision="bf16")
    eager, compiled = from_config(config), load_backbone("digits_vit", pretrained=False)
    compiled.precision = "bf16"
    compiled.compile(backend="aot_eager", fullgraph=True)  # from_config(compile=True) uses inductor
    assert compiled.compiled and not eager.compiled and compiled.cls_only
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    grads = []
    for bb in (eager, compiled):
        feats = bb(x)
        grads.append((feats, *torch.autograd.grad(feats.square().sum(), x)))
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert from_config(BackboneConfig(backbone="digits_resnet", random_init=True, compile=True)).compiled


def test_attention_backend_choice_equals_pytorchs_own_within_rounding():
    """``attention``: PyTorch's choice (auto) or one SDPA backend -- the same features within float32
    rounding; a backend this device lacks is PyTorch's "no viable backend" error; a bad name a config error."""
    from fastsfm.config import BackboneConfig
    from fastsfm.models.backbones import from_config

    x = torch.rand(3, 3, 32, 32)
    feats = {}
    for choice in ("auto", "math", "flash"):
        bb = from_config(BackboneConfig(backbone="digits_vit", random_init=True, attention=choice))
        assert bb.attention == choice
        feats[choice] = bb(x)
    torch.testing.assert_close(feats["math"], feats["auto"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["flash"], feats["auto"], rtol=1e-5, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="No viable backend"):
            from_config(BackboneConfig(backbone="digits_vit", random_init=True, attention="cudnn"))(x)
    with pytest.raises(ValueError, match="attention must be one of"):
        BackboneConfig(attention="fast")
