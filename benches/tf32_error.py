"""The error of TF32 in a bf16 step's render and crop, beside the bf16 rounding the step already applies.

    python benches/tf32_error.py        # a few seconds on a CPU

A CPU has no TF32, so it is emulated: every matrix product of the render (every level of a 64 px
pyramid) and the crop (56 px), forward and backward, runs in float64 on operands reduced to TF32's
10 mantissa bits.  Both conversions are tried: rounding to nearest (what PyTorch's notes on TF32
describe) and truncation (the tensor cores' reading of raw float32 bits; twice the error, the
worst case).  Per conversion it prints the relative L2 error of

* the crops, beside bf16's own rounding of them (the backbone's first op rounds them to bf16);
* the levels' gradient, beside the error of the gradient a bf16 backbone hands the crops (a random
  ``vit_tiny`` under bf16 autocast against float32, carried back through the exact render and crop).

``tests/models/test_tf32.py`` asserts on these numbers; README's deviation table quotes them.  Never
touches tracked files.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastsfm import rng
from fastsfm.bench.benchmark import print_table
from fastsfm.data.augment import BatchAugment
from fastsfm.distill.synset import SyntheticSet
from fastsfm.models.backbones import load_backbone

aten = torch.ops.aten
PRODUCTS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default}
CONVERSIONS = {"to nearest": torch.round, "truncation": torch.trunc}


def to_tf32(x: torch.Tensor, reduce) -> torch.Tensor:
    """``x`` with its significand reduced to TF32's 11 bits (1 implicit + 10 stored) by ``reduce``
    (``torch.round``: to nearest, ties to even; ``torch.trunc``: toward zero)."""
    mantissa, exponent = torch.frexp(x)  # |mantissa| in [0.5, 1)
    return torch.ldexp(reduce(mantissa * 2**11) / 2**11, exponent)


class TF32Products(TorchDispatchMode):
    """Matrix products on TF32 operands, accumulated in the operands' (float64) precision; counts them."""

    def __init__(self, reduce):
        super().__init__()
        self.reduce, self.products = reduce, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            self.products += 1
            args = tuple(to_tf32(a, self.reduce) if isinstance(a, torch.Tensor) else a for a in args)
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


def measure() -> list[dict]:
    """One row per conversion: the errors and their bf16 floors (module docstring), the largest
    absolute errors of the crops, the levels and products the emulation saw."""
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
    _, grad = _render_and_crop(levels, synset, augment, keys, upstream)
    _, bf16_grad = _render_and_crop(levels, synset, augment, keys, _backbone_gradient(backbone, exact, weights, "bf16"))
    rows = []
    for name, reduce in CONVERSIONS.items():
        with TF32Products(reduce) as mode:
            tf32, tf32_grad = _render_and_crop(levels, synset, augment, keys, upstream)
        rows.append(
            {
                "TF32 conversion": name,
                "crops error": _relative(tf32 - exact, exact),
                "crops bf16 rounding": _relative(_bf16(exact) - exact, exact),
                "crops max abs error": float((tf32 - exact).abs().max()),
                "crops max abs bf16 rounding": float((_bf16(exact) - exact).abs().max()),
                "levels' gradient error": _relative(tf32_grad - grad, grad),
                "bf16 backbone's gradient error": _relative(bf16_grad - grad, grad),
                "levels": len(levels),
                "products": mode.products,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    rows = measure()
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
