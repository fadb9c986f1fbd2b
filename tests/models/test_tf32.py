"""TF32 for the float32 matrix products of a bf16 step (:func:`fastsfm.models.precision.tf32_matmuls`).

A CPU has no TF32, so the error is measured by emulation (``benches/tf32_error.py``): every matrix
product of the render and the crop (forward and backward) runs in float64 on operands reduced to
TF32's 10 mantissa bits, rounded to nearest or truncated, and the error is set beside the bf16
rounding the step already applies.
"""

import pytest
import torch
from helpers import bench, tiny_backbone

from fastsfm.bench.timing import distill_setup
from fastsfm.config import DistillConfig
from fastsfm.models.precision import tf32_matmuls


@pytest.fixture(scope="module")
def errors():
    return {row["TF32 conversion"]: row for row in bench("tf32_error").measure()}


@pytest.mark.parametrize(("conversion", "share"), [("to nearest", 0.5), ("truncation", 1.0)])
def test_tf32_render_and_crop_err_less_than_the_bf16_rounding_the_step_applies(errors, conversion, share):
    """Render (every pyramid level) then crop, in float64, with TF32 operands in every matrix product:

    * the crops are closer to the exact ones than bf16 rounding (the backbone's first op) puts them;
    * the levels' gradient is closer to the exact one than the bf16 backbone's own error makes it
      (its gradient under bf16 autocast against float32, carried back through the exact render and crop),

    by half when rounding to nearest, and still when truncating."""
    row = errors[conversion]
    assert row["products"] >= 6 and row["levels"] == 7  # the render's, the crop's and their backwards
    assert 0 < row["crops error"] < share * row["crops bf16 rounding"], row
    assert row["crops max abs error"] < row["crops max abs bf16 rounding"], row
    assert 0 < row["levels' gradient error"] < share * row["bf16 backbone's gradient error"], row


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
