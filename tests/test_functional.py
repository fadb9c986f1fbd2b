"""Reference paths of the SFM loss: literal oracle vs lean expansion, gradcheck, bad input."""

import pytest
import torch
from conftest import make_problem

from fastsfm.functional import class_mean_features, sfm_loss, sfm_loss_literal


def _brute_force(feats, labels, means, weight=None, eps=1e-8):
    """Python loops over i and k != y_i: independent of any vectorisation."""
    n, c = feats.shape[0], means.shape[0]
    out = []
    for i in range(n):
        total = 0.0
        for k in range(c):
            if k == int(labels[i]):
                continue
            v = means[k] - feats[i]
            r = means[k] - means[labels[i]]
            cos = (v @ r) / (torch.sqrt(v @ v + eps) * torch.sqrt(r @ r + eps))
            total = total + (1.0 if weight is None else weight[labels[i], k]) * (1 - cos)
        out.append(total / (c - 1))
    return torch.stack(out)


@pytest.mark.parametrize("n,c,d", [(1, 2, 3), (7, 10, 64), (13, 5, 9)])
def test_literal_matches_brute_force(n, c, d):
    f, y, m = make_problem(n, c, d, torch.float64)
    w = torch.rand(c, c, dtype=torch.float64)
    torch.testing.assert_close(sfm_loss_literal(f, y, m.double()), _brute_force(f, y, m.double()))
    torch.testing.assert_close(sfm_loss_literal(f, y, m.double(), w), _brute_force(f, y, m.double(), w))


def test_perfect_flows_give_zero_loss():
    f, y, m = make_problem(9, 6, 16, torch.float64)
    # s_i = mu_c makes every synthetic flow equal to the real flow: cos = 1 up to eps/|r|^2.
    m = m.double()
    assert sfm_loss(m[y], y, m, backend="lean").abs().item() < 1e-8
    assert sfm_loss(m[y] + 0.5, y, m, backend="lean").item() > 1e-3


@pytest.mark.parametrize("n,c,d", [(1, 2, 3), (7, 10, 64), (130, 33, 200), (5, 3, 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_lean_matches_literal_float64(n, c, d, weighted):
    f, y, m = make_problem(n, c, d, torch.float64)
    w = torch.rand(c, c, dtype=torch.float64) if weighted else None
    m = m.double()
    f1, f2 = f.clone().requires_grad_(), f.clone().requires_grad_()
    lit = sfm_loss(f1, y, m, w, backend="literal", reduction="none")
    lean = sfm_loss(f2, y, m, w, backend="lean", reduction="none")
    torch.testing.assert_close(lean, lit, rtol=1e-10, atol=1e-12)
    (lit * torch.arange(n)).sum().backward()
    (lean * torch.arange(n)).sum().backward()
    torch.testing.assert_close(f2.grad, f1.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["literal", "lean"])
def test_gradcheck_features_and_means(backend):
    f, y, m = make_problem(5, 4, 6, torch.float64)
    f = f.requires_grad_()
    m = m.double().requires_grad_()
    w = torch.rand(4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: sfm_loss(a, y, b, w, backend=backend, reduction="none"), (f, m))


def test_feature_on_non_target_centre_is_finite():
    f, y, m = make_problem(4, 3, 5, torch.float64)
    m = m.double()
    y = torch.tensor([0, 0, 1, 2])
    f[0] = m[1]  # the synthetic flow to class 1 has zero length
    for backend in ("literal", "lean"):
        x = f.clone().requires_grad_()
        loss = sfm_loss(x, y, m, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(sfm_loss(f, y, m, backend="lean"), sfm_loss(f, y, m, backend="literal"))


def test_reductions_and_non_contiguous():
    f, y, m = make_problem(12, 5, 8)
    rows = sfm_loss(f, y, m, reduction="none")
    assert rows.shape == (12,)
    torch.testing.assert_close(sfm_loss(f, y, m, reduction="sum"), rows.sum())
    torch.testing.assert_close(sfm_loss(f, y, m), rows.mean())
    wide = torch.zeros(12, 16)
    wide[:, ::2] = f
    torch.testing.assert_close(sfm_loss(wide[:, ::2], y, m), rows.mean())


def test_class_mean_mode_equals_loss_of_class_means():
    f, y, m = make_problem(20, 4, 8, torch.float64)
    m = m.double()
    y = torch.tensor([0, 1, 3] * 6 + [0, 1])  # class 2 absent
    means, ids = class_mean_features(f, y, 4)
    assert ids.tolist() == [0, 1, 3]
    torch.testing.assert_close(means[1], f[y == 1].mean(0))
    for backend in ("literal", "lean"):
        got = sfm_loss(f, y, m, mode="class_mean", backend=backend, reduction="none")
        torch.testing.assert_close(got, sfm_loss_literal(means, ids, m))


@pytest.mark.parametrize("make_bad,err,match", [
    (lambda f, y, m: (f[:, :5], y, m), ValueError, "D=5 but the class statistics have D=8"),
    (lambda f, y, m: (f, y + 10, m), ValueError, r"labels must lie in \[0, 4\)"),
    (lambda f, y, m: (f, y - 1, m), ValueError, r"labels must lie in \[0, 4\)"),
    (lambda f, y, m: (f, y.float(), m), TypeError, "labels: expected an integer tensor"),
    (lambda f, y, m: (f[:0], y[:0], m), ValueError, "empty batch"),
    (lambda f, y, m: (f.index_fill(0, torch.tensor([2]), float("nan")), y, m), ValueError, "NaN or Inf"),
    (lambda f, y, m: (f, y, m.index_fill(0, torch.tensor([1]), float("inf"))), ValueError, "means contain NaN"),
    (lambda f, y, m: (f, y, m[:1]), ValueError, "at least 2 classes"),
    (lambda f, y, m: (f, y[:3], m), ValueError, r"labels: expected shape \(6,\)"),
    (lambda f, y, m: (f[0], y, m), ValueError, "features: expected shape"),
    (lambda f, y, m: (f.int(), y, m), TypeError, "features: expected a floating-point tensor"),
])
def test_bad_inputs_raise_clear_errors(make_bad, err, match):
    f, y, m = make_problem(6, 4, 8)
    with pytest.raises(err, match=match):
        sfm_loss(*make_bad(f, y, m))


def test_bad_backend_reduction_mode_weight():
    f, y, m = make_problem(6, 4, 8)
    with pytest.raises(ValueError, match="backend must be"):
        sfm_loss(f, y, m, backend="cuda")
    with pytest.raises(ValueError, match="reduction must be"):
        sfm_loss(f, y, m, reduction="avg")
    with pytest.raises(ValueError, match="mode must be"):
        sfm_loss(f, y, m, mode="batch")
    with pytest.raises(ValueError, match=r"weight: expected a \(4, 4\)"):
        sfm_loss(f, y, m, torch.ones(3, 3))
    with pytest.raises(ValueError, match="non-negative"):
        sfm_loss(f, y, m, -torch.ones(4, 4))


def test_triton_backend_refuses_learnable_means_and_float64():
    f, y, m = make_problem(6, 4, 8)
    with pytest.raises(ValueError, match="treats class statistics as constants"):
        sfm_loss(f, y, m.requires_grad_(), backend="triton")
    with pytest.raises(TypeError, match="use backend='lean' for float64"):
        sfm_loss(f.double(), y, m.detach(), backend="triton")
