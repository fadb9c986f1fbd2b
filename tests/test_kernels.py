"""Fused Triton kernels vs the literal reference: values and gradients, odd shapes, dtypes.

On a CPU machine the kernels run in Triton's interpreter (see conftest.py); on a GPU
machine the same tests run the compiled kernels on CUDA.
"""

import pytest
import torch
from conftest import make_problem

from fastsfm import SFMLoss
from fastsfm.functional import flow_geometry, sfm_loss, sfm_loss_from_geometry, sfm_loss_literal

# (loss rtol, loss atol, gradient tolerance relative to the largest gradient entry)
TOL = {torch.float32: (1e-4, 1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-3, 3e-2), torch.float16: (5e-3, 5e-4, 5e-3)}


def _check(n, c, d, dtype, device, weight=False, reduction="none", seed=0, strategy="store"):
    f, y, m = make_problem(n, c, d, dtype, device, seed)
    w = torch.rand(c, c, device=device) if weight else None
    x = f.clone().requires_grad_()
    geo = flow_geometry(m, w)
    got = sfm_loss_from_geometry(x, y, geo, reduction=reduction, backend="triton", fused_backward=strategy)
    # Oracle in float64 on the same (rounded) inputs.
    xr = f.double().clone().requires_grad_()
    want = sfm_loss(xr, y, m.double(), None if w is None else w.double(), backend="literal", reduction=reduction)
    rtol, atol, gtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    upstream = torch.linspace(0.5, 1.5, got.numel(), device=device, dtype=torch.float64).view_as(want)
    (got.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == f.shape
    scale = xr.grad.abs().max().item() + 1e-12
    err = (x.grad.double() - xr.grad).abs().max().item() / scale
    assert err < gtol, f"relative gradient error {err:.2e} >= {gtol:.0e}"


@pytest.mark.parametrize("n", [1, 7, 130])
@pytest.mark.parametrize("c", [2, 10, 33])
@pytest.mark.parametrize("d", [3, 64, 200])
def test_kernel_matches_literal_float32(n, c, d, device):
    _check(n, c, d, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c,d", [(7, 10, 64), (130, 33, 200), (1, 2, 3)])
def test_kernel_matches_literal_half(n, c, d, dtype, device):
    _check(n, c, d, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,d", [(1, 2, 3), (37, 17, 70), (130, 33, 200)])
def test_recompute_backward_matches_literal(n, c, d, dtype, device):
    _check(n, c, d, dtype, device, strategy="recompute")


def test_unknown_backward_strategy_is_an_error(device):
    f, y, m = make_problem(3, 2, 4, torch.float32, device)
    with pytest.raises(ValueError, match="fused_backward must be"):
        sfm_loss_from_geometry(f, y, flow_geometry(m), backend="triton", fused_backward="cache")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kernel_reductions_and_weight(reduction, device):
    _check(37, 11, 40, torch.float32, device, weight=True, reduction=reduction, seed=3)


def test_kernel_class_mean_mode(device):
    f, y, m = make_problem(40, 9, 24, torch.float32, device)
    x1, x2 = f.clone().requires_grad_(), f.clone().requires_grad_()
    a = sfm_loss(x1, y, m, mode="class_mean", backend="triton")
    b = sfm_loss(x2, y, m, mode="class_mean", backend="lean")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-3, atol=1e-6)


def test_kernel_feature_on_non_target_centre(device):
    f, y, m = make_problem(5, 4, 16, torch.float32, device)
    y = torch.tensor([0, 1, 2, 3, 0], device=device)
    f[0] = m[2]
    x = f.clone().requires_grad_()
    loss = sfm_loss(x, y, m, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # That one term (a 0/0 flow guarded by eps) is where the expansion loses precision; the
    # rest of the loss is still exact, so the mean stays within a small fraction of one term.
    want = sfm_loss_literal(f.double(), y, m.double()).mean()
    torch.testing.assert_close(loss.double(), want, rtol=0, atol=0.1 / (5 * 3))


def test_kernel_non_contiguous_features(device):
    f, y, m = make_problem(19, 6, 33, torch.float32, device)
    wide = torch.zeros(33, 19, device=device)
    wide.copy_(f.T)
    x = wide.T  # non-contiguous view of the same values
    assert not x.is_contiguous()
    torch.testing.assert_close(sfm_loss(x, y, m, backend="triton"), sfm_loss(f, y, m, backend="lean"),
                               rtol=1e-4, atol=1e-5)


def test_sfmloss_module_auto_dispatch_and_buffers(device):
    f, y, m = make_problem(21, 7, 30, torch.float32)
    module = SFMLoss(m).to(device)
    assert module.geo_inv.device.type == device.type
    x = f.to(device).requires_grad_()
    out = module(x, y.to(device))
    out.backward()
    want = sfm_loss_literal(f.double(), y, m.double()).mean()
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-4, atol=1e-5)
    fused = SFMLoss(m, backend="triton").to(device)(f.to(device), y.to(device))
    torch.testing.assert_close(fused.double().cpu(), want, rtol=1e-4, atol=1e-5)


def test_sfmloss_accepts_stats_like_objects_and_rejects_others():
    class Stats:
        means = torch.randn(3, 4)

    assert SFMLoss(Stats()).num_classes == 3
    with pytest.raises(TypeError, match="ClassStats or a"):
        SFMLoss([1, 2, 3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_is_a_clear_error():
    f, y, m = make_problem(4, 3, 8)
    with pytest.raises(ValueError, match="device mismatch"):
        SFMLoss(m.cuda())(f, y)
