"""The literal reference against independent definitions: Python loops and the released script."""

import pytest
import torch
from helpers import make_problem

from fastsfm.loss.reference import sfm_reference


def _loops(z, y, mu, objective="flow", alpha=1.0, k=None):
    """Flows and losses with explicit Python loops over classes and entries (no vectorisation)."""
    c, d = mu.shape
    k = c - 1 if k is None else k
    t = [sum(z[i] for i in range(len(y)) if y[i] == cls) / int((y == cls).sum()) for cls in range(c)]
    nu = [sum(mu[j] for j in range(c) if j != cls) / (c - 1) for cls in range(c)]
    nu_syn = [sum(t[j] for j in range(c) if j != cls) / k for cls in range(c)]
    if objective == "decouple":
        mse1 = sum(((mu[cls] - t[cls]) ** 2).sum() for cls in range(c)) / (c * d)
        mse2 = sum(((nu[cls] - nu_syn[cls]) ** 2).sum() for cls in range(c)) / (c * d)
        return alpha * mse1 + (1 - alpha) * mse2
    a = [nu[cls] - mu[cls] for cls in range(c)]
    b = [nu_syn[cls] - t[cls] for cls in range(c)]
    dot = sum((a[cls] * b[cls]).sum() for cls in range(c))
    na = torch.sqrt(sum((a[cls] ** 2).sum() for cls in range(c)))
    nb = torch.sqrt(sum((b[cls] ** 2).sum() for cls in range(c)))
    return 1 - dot / (na * nb)


def _released_script(z_views, mu, ipc):
    """The authors' ``match_flow`` for class-contiguous images, views stacked first: average the
    views per image, view as (C, IPC, D), divide the synthetic non-target sum by N - 1, N = C*IPC."""
    z = z_views.mean(0)
    n, d = z.shape
    t = z.view(n // ipc, ipc, d).mean(1)
    syn = (t.sum(0, keepdim=True) - t) / (n - 1) - t
    real = (mu.sum(0, keepdim=True) - mu) / (mu.shape[0] - 1) - mu
    return 1 - torch.nn.functional.cosine_similarity(real.flatten(), syn.flatten(), dim=0)


@pytest.mark.parametrize(
    "objective,alpha,k",
    [
        ("flow", 1.0, None),
        ("flow", 1.0, 7.5),
        ("decouple", 1.0, None),
        ("decouple", 0.25, None),
        ("decouple", 0.0, 4.0),
    ],
)
@pytest.mark.parametrize("n,c,d", [(2, 2, 3), (9, 4, 5), (20, 6, 2)])
def test_reference_equals_loops(n, c, d, objective, alpha, k):
    z, y, mu = make_problem(n, c, d, torch.float64)
    want = _loops(z, y, mu, objective, alpha, k)
    torch.testing.assert_close(sfm_reference(z, y, mu, objective, alpha, k), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ipc,views", [(1, 1), (3, 1), (2, 4)])
def test_reference_with_view_rows_and_divisor_equals_released_script(ipc, views):
    c, d = 5, 6
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(c, d, generator=gen, dtype=torch.float64)
    z_views = torch.randn(views, c * ipc, d, generator=gen, dtype=torch.float64)
    labels = torch.arange(c).repeat_interleave(ipc)
    rows, row_labels = z_views.reshape(views * c * ipc, d), labels.repeat(views)
    want = _released_script(z_views, mu, ipc)
    torch.testing.assert_close(sfm_reference(rows, row_labels, mu, nontarget_divisor=c * ipc - 1), want)


def test_identity_mean_centred_cosine():
    """With k = C - 1 the loss is one minus the cosine of the mean-centred class-mean matrices."""
    z, y, mu = make_problem(30, 7, 9, torch.float64)
    t = torch.stack([z[y == c].mean(0) for c in range(7)])
    want = 1 - torch.nn.functional.cosine_similarity((mu - mu.mean(0)).flatten(), (t - t.mean(0)).flatten(), dim=0)
    torch.testing.assert_close(sfm_reference(z, y, mu), want)


def test_perfect_match_gives_zero_and_translation_invariance():
    _, _, mu = make_problem(6, 6, 4, torch.float64)
    y = torch.arange(6)
    assert sfm_reference(mu, y, mu).abs().item() < 1e-12
    # Flows are differences: a common shift of the synthetic features changes nothing (k = C - 1) ...
    assert sfm_reference(mu + 5.0, y, mu).abs().item() < 1e-12
    # ... but with the script's divisor k != C - 1 it does.
    assert sfm_reference(mu + 5.0, y, mu, nontarget_divisor=10.0).item() > 1e-3
