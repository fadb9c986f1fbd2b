"""TF32 for the float32 matrix products of a bf16 step (:func:`fastsfm.precision.tf32_matmuls`).

A CPU has no TF32, so the error is measured by emulation: every matrix product of the render and
the crop (forward and backward) runs in float64 on operands reduced to TF32's 10 mantissa bits,
and the error is set beside the bf16 rounding the step already applies.  Both conversions are
tried: rounding to nearest (what PyTorch's notes on TF32 describe) and truncation (the tensor
cores' reading of raw float32 bits; twice the error, the worst case).
"""

import pytest
import torch
from helpers import tiny_backbone
from torch.utils._python_dispatch import TorchDispatchMode

from fastsfm import rng
from fastsfm.augment import BatchAugment
from fastsfm.backbones import load_backbone
from fastsfm.config import DistillConfig
from fastsfm.precision import tf32_matmuls
from fastsfm.synset import SyntheticSet
from fastsfm.timing import distill_setup

aten = torch.ops.aten
PRODUCTS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default}


def _to_tf32(x: torch.Tensor, reduce) -> torch.Tensor:
    """``x`` with its significand reduced to TF32's 11 bits (1 implicit + 10 stored) by ``reduce``
    (``torch.round``: to nearest, ties to even; ``torch.trunc``: toward zero)."""
    mantissa, exponent = torch.frexp(x)  # |mantissa| in [0.5, 1)
    return torch.ldexp(reduce(mantissa * 2**11) / 2**11, exponent)


class TF32Products(TorchDispatchMode):
    """Matrix products on TF32 operands, accumulated in the operands' (float64) precision."""

    def __init__(self, reduce):
        super().__init__()
        self.reduce, self.products = reduce, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            self.products += 1
            args = tuple(_to_tf32(a, self.reduce) if isinstance(a, torch.Tensor) else a for a in args)
        return func(*args, **(kwargs or {}))


def _relative(error: torch.Tensor, exact: torch.Tensor) -> float:
    return float(error.norm() / exact.norm())


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def _render_and_crop(levels, synset, augment, keys, upstream=None):
    levels = [q.detach().clone().requires_grad_() for q in levels]
    crops = augment(synset.render_levels(levels), keys)
    if upstream is None:
        return crops.detach(), None
    crops.backward(upstream)
    return crops.detach(), torch.cat([q.grad.flatten() for q in levels])


def _backbone_gradient(backbone, crops: torch.Tensor, weights: torch.Tensor, precision: str) -> torch.Tensor:
    """The gradient the backbone hands the crops, ``d sum(features * weights) / d crops``, in float64."""
    crops = crops.float().requires_grad_()
    with backbone.using_precision(precision):
        (backbone(crops) * weights).sum().backward()
    return crops.grad.double()


@pytest.mark.parametrize(("reduce", "share"), [(torch.round, 0.5), (torch.trunc, 1.0)])
def test_tf32_render_and_crop_err_less_than_the_bf16_rounding_the_step_applies(reduce, share):
    """Render (every pyramid level) then crop, in float64, with TF32 operands in every matrix product:

    * the crops are closer to the exact ones than bf16 rounding (the backbone's first op) puts them;
    * the levels' gradient is closer to the exact one than the bf16 backbone's own error makes it
      (its gradient under bf16 autocast against float32, carried back through the exact render and crop),

    by half when rounding to nearest, and still when truncating."""
    synset = SyntheticSet(4, 2, 64, extent=1, seed=3)
    while synset.grow(len(synset.levels) + 1):
        pass
    levels = [q.double() for q in synset.chunk(0, synset.num_images, "cpu")]
    augment = BatchAugment(56, noise_std=0.0)
    keys = rng.augment_keys(0, 7, 1, torch.arange(synset.num_images))
    exact, _ = _render_and_crop(levels, synset, augment, keys)
    backbone = load_backbone("vit_tiny_patch16_224", pretrained=False, image_size=56)
    weights = torch.randn(synset.num_images, backbone.feature_dim, generator=torch.Generator().manual_seed(5))
    upstream = _backbone_gradient(backbone, exact, weights, "fp32")
    bf16_upstream = _backbone_gradient(backbone, exact, weights, "bf16")
    _, grad = _render_and_crop(levels, synset, augment, keys, upstream)
    _, bf16_grad = _render_and_crop(levels, synset, augment, keys, bf16_upstream)
    with TF32Products(reduce) as mode:
        tf32, tf32_grad = _render_and_crop(levels, synset, augment, keys, upstream)
    assert mode.products >= 6 and len(levels) == 7  # the render's, the crop's and their backwards
    value_error, value_floor = _relative(tf32 - exact, exact), _relative(_bf16(exact) - exact, exact)
    assert 0 < value_error < share * value_floor, (value_error, value_floor)
    assert float((tf32 - exact).abs().max()) < float((_bf16(exact) - exact).abs().max())
    grad_error, grad_floor = _relative(tf32_grad - grad, grad), _relative(bf16_grad - grad, grad)
    assert 0 < grad_error < share * grad_floor, (grad_error, grad_floor)


@pytest.mark.parametrize(("precision", "inside"), [("bf16", True), ("fp32", False)])
def test_a_step_runs_render_and_crop_with_tf32_in_bf16_only_and_restores_the_flag(precision, inside):
    """The flag is on through a bf16 step's render (forward) and its backward (seen from a gradient
    hook, where autograd's thread runs), off in a float32 step, and as before after either."""
    flags = torch.backends.cuda.matmul
    flags.allow_tf32 = False
    backbone = tiny_backbone()
    with backbone.using_precision(precision):
        synset, optim, objective = distill_setup(backbone, DistillConfig(ipc=1, resolution=16), 3, torch.device("cpu"))
    seen = []
    render = synset.render_levels

    def spy(levels):
        seen.append(("forward", flags.allow_tf32))
        images = render(levels)
        if images.requires_grad:
            images.register_hook(lambda g: seen.append(("backward", flags.allow_tf32)))
        return images

    synset.render_levels = spy
    with backbone.using_precision(precision):
        assert torch.isfinite(objective.step(synset, optim, 1))
    assert ("forward", inside) in seen and ("backward", inside) in seen
    assert all(flag == inside for _, flag in seen)
    assert flags.allow_tf32 is False
    with tf32_matmuls(torch.float16):
        assert flags.allow_tf32 is False
