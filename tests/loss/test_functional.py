"""The public API on the PyTorch paths: against the literal reference, gradcheck, bad input, SFMLoss."""

import pytest
import torch
from helpers import make_problem

import fastsfm
from fastsfm import SFMLoss, sfm_loss
from fastsfm.loss.reference import sfm_reference

OPTIONS = [
    {},
    {"objective": "decouple"},
    {"objective": "decouple", "alpha": 0.3},
    {"nontarget_divisor": 11.0},
    {"objective": "decouple", "alpha": 0.6, "nontarget_divisor": 5.0},
]


def _reference_grad(z, y, mu, **kw):
    x = z.clone().requires_grad_()
    loss = sfm_reference(x, y, mu, kw.get("objective", "flow"), kw.get("alpha", 1.0), kw.get("nontarget_divisor"))
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(
    "n,c,d,order",
    [
        (2, 2, 3, "shuffled"),
        (7, 2, 64, "contiguous"),
        (130, 33, 200, "shuffled"),
        (1000, 10, 3, "shuffled"),
        (40, 10, 64, "contiguous"),
    ],
)
def test_default_api_equals_reference_float64(n, c, d, order, options):
    z, y, mu = make_problem(n, c, d, torch.float64, order=order)
    want, want_grad = _reference_grad(z, y, mu, **options)
    x = z.clone().requires_grad_()
    got = sfm_loss(x, y, mu, **options)
    got.backward()
    assert got.shape == () and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-7, atol=1e-12 * want_grad.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("options", OPTIONS[:4])
def test_gradcheck_float64(backend, options):
    z, y, mu = make_problem(9, 4, 5, torch.float64)
    x = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: sfm_loss(a, y, mu, backend=backend, **options), (x,))


def test_views_are_extra_rows():
    """Two augmented views per image as extra rows equal the authors' averaging over views."""
    z, y, mu = make_problem(12, 4, 6, torch.float64)
    second = z + 0.1 * torch.randn_like(z)
    views = torch.cat([z, second]), y.repeat(2)
    torch.testing.assert_close(sfm_loss(*views, mu), sfm_loss((z + second) / 2, y, mu))


def test_float32_torch_path_and_int32_labels_and_non_contiguous():
    z, y, mu = make_problem(50, 6, 33, torch.float64)
    want = sfm_reference(z, y, mu)
    wide = torch.zeros(50, 66, dtype=torch.float32)
    wide[:, ::2] = z.float()
    got = sfm_loss(wide[:, ::2], y.int(), mu.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_centers_get_no_gradient():
    z, y, mu = make_problem(8, 3, 4, torch.float64)
    mu = mu.clone().requires_grad_()
    sfm_loss(z.requires_grad_(), y, mu).backward()
    assert mu.grad is None


@pytest.mark.parametrize(
    "make_bad,err,match",
    [
        (lambda z, y, m: (z[:, :5], y, m), ValueError, "D=5 but the centres have D=8"),
        (lambda z, y, m: (z, y + 10, m), ValueError, r"labels must lie in \[0, 4\), got values in \[10, 13\]"),
        (lambda z, y, m: (z, y - 1, m), ValueError, r"labels must lie in \[0, 4\)"),
        (lambda z, y, m: (z, y.float(), m), TypeError, "labels: expected an integer tensor"),
        (lambda z, y, m: (z, y.bool(), m), TypeError, "labels: expected an integer tensor"),
        (lambda z, y, m: (z[:0], y[:0], m), ValueError, "empty batch"),
        (lambda z, y, m: (z, torch.where(y == 2, 1, y), m), ValueError, r"classes without rows: \[2\]"),
        (lambda z, y, m: (z.index_fill(0, torch.tensor([3]), float("nan")), y, m), ValueError, "NaN or Inf"),
        (lambda z, y, m: (z.index_fill(0, torch.tensor([3]), float("inf")), y, m), ValueError, "NaN or Inf"),
        (lambda z, y, m: (z, y, m.index_fill(0, torch.tensor([1]), float("nan"))), ValueError, "centers contain NaN"),
        (lambda z, y, m: (z, y, m[:1]), ValueError, "at least 2 classes"),
        (lambda z, y, m: (z, y[:3], m), ValueError, r"labels: expected shape \(10,\)"),
        (lambda z, y, m: (z[0], y, m), ValueError, "features: expected shape"),
        (lambda z, y, m: (z.int(), y, m), TypeError, "features: expected a floating-point tensor"),
        (lambda z, y, m: (z, y, m[0]), TypeError, r"centers: expected a floating-point tensor \(C, D\)"),
        (lambda z, y, m: (z.numpy(), y, m), TypeError, "got ndarray"),
        (lambda z, y, m: (z, y.to("meta"), m), ValueError, "device mismatch"),
    ],
)
def test_bad_inputs_raise_clear_errors(make_bad, err, match):
    z, y, mu = make_problem(10, 4, 8)
    with pytest.raises(err, match=match):
        sfm_loss(*make_bad(z, y, mu.float()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"objective": "pairwise"}, r"objective must be one of \['flow', 'decouple'\]"),
        ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be a number in \[0, 1\]"),
        ({"alpha": float("nan")}, r"alpha must be a number in \[0, 1\]"),
        ({"nontarget_divisor": 0}, "nontarget_divisor must be a number >= 1"),
        ({"nontarget_divisor": 0.5}, "nontarget_divisor must be a number >= 1"),
        ({"nontarget_divisor": float("inf")}, "nontarget_divisor must be a number >= 1"),
        ({"alpha": True}, r"alpha must be a number in \[0, 1\]"),
        ({"backend": "cuda"}, "backend must be"),
    ],
)
def test_bad_options(kwargs, match):
    z, y, mu = make_problem(6, 3, 4)
    with pytest.raises(ValueError, match=match):
        sfm_loss(z, y, mu, **kwargs)
    if "backend" not in kwargs:
        with pytest.raises(ValueError, match=match):
            SFMLoss(mu, **kwargs)


def test_triton_backend_refuses_float64():
    z, y, mu = make_problem(6, 3, 4, torch.float64)
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        sfm_loss(z, y, mu, backend="triton")


def test_module_equals_functional_and_top_level_exports():
    z, y, mu = make_problem(40, 5, 12)
    assert fastsfm.sfm_loss is sfm_loss
    module = SFMLoss(mu.float(), objective="decouple", alpha=0.4)
    torch.testing.assert_close(module(z, y), sfm_loss(z, y, mu.float(), objective="decouple", alpha=0.4))
    assert "objective=decouple" in repr(module) and module.num_classes == 5

    class Stats:
        means = mu.float()

    torch.testing.assert_close(SFMLoss(Stats())(z, y), sfm_loss(z, y, mu.float()))
    with pytest.raises(TypeError, match="ClassStats or a"):
        SFMLoss([1, 2, 3])


def test_module_validates_once_per_labels_tensor(monkeypatch):
    import fastsfm.loss.module as loss_mod
    import fastsfm.loss.ops as ops_mod
    import fastsfm.loss.torch_path as torch_loss_mod

    calls = {"sync": [], "sums": 0}
    real_check, real_sums = loss_mod.check_batch, ops_mod.check_class_sums

    def check_batch(*args, **kwargs):
        calls["sync"].append(kwargs["sync"])
        return real_check(*args, **kwargs)

    def check_sums(buf, d):
        calls["sums"] += 1
        return real_sums(buf, d)

    monkeypatch.setattr(loss_mod, "check_batch", check_batch)
    for module in (ops_mod, torch_loss_mod):  # the Triton path checks in ops, the PyTorch path in torch_loss
        monkeypatch.setattr(module, "check_class_sums", check_sums)
    z, y, mu = make_problem(30, 4, 6)
    module = SFMLoss(mu)
    first = module(z, y)
    module(z * 2, y)  # the same labels, features of the same shape, dtype and device: no check at all
    assert calls == {"sync": [True], "sums": 1}
    module(z.double(), y)  # another dtype: the batch checks again, without a synchronisation
    assert calls == {"sync": [True, False], "sums": 1}
    y.add_(0)  # an in-place change of the labels invalidates the cached plan
    module(z, y)
    assert calls == {"sync": [True, False, True], "sums": 2}
    bad = z.clone()
    bad[0] = float("nan")
    assert torch.isnan(module(bad, y))  # validated labels, unchecked features: NaN propagates
    torch.testing.assert_close(module(z, y.clone()), first)
    with pytest.raises(ValueError, match="NaN or Inf"):
        SFMLoss(mu, validate="always")(bad, y)
    assert torch.isnan(SFMLoss(mu, validate="never")(bad, y))


def _synchronisations(fn) -> int:
    """Host synchronisations ``fn`` makes on CUDA, counted by PyTorch's sync debug mode."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
def test_documented_host_synchronisations():
    """sfm_loss: three (centres, labels, class sums); SFMLoss: two on a new labels tensor, then none."""
    z, y, mu = make_problem(300, 10, 64, device="cuda")
    x = z.float()
    assert _synchronisations(lambda: sfm_loss(x, y, mu.float())) == 3
    module = SFMLoss(mu.float()).cuda()
    assert _synchronisations(lambda: module(x, y)) == 2
    assert _synchronisations(lambda: module(x, y)) == 0
