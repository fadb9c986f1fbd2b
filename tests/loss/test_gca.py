"""The GCA losses: the PyTorch path against an independent statement of the authors' definition,
the fused Triton path against the PyTorch path (values, gradients), the kernels one by one, the
memory the fused path keeps, and the boundary checks."""

import contextlib
import math

import pytest
import torch

import fastsfm
from fastsfm.config import GCAOptions
from fastsfm.loss.gca_ops import gca_fused
from fastsfm.loss.gca_torch import gca_loss_torch

KINDS = ("ince", "rince", "uot")


def _gca_restated(
    z, kind, eps=0.5, iters=10, lam=0.01, q=0.98, relax=(0.2, 0.2), r1=1.0, r2=0.02, pairing="interleaved"
):
    """The definition in the multiplicative domain, as the paper and ``gca_loss_cifar.py`` state it:
    dense K, scalings u and v, plan P, positives by an explicit list."""
    m = z.shape[0]
    x = z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cost = 1 - (x @ x.T).clamp(min=1e-7)
    eye = torch.eye(m, dtype=z.dtype)
    cost = cost * (1 - eye) + cost.max() * eye
    K = torch.exp(-cost / eps)
    if pairing == "interleaved":
        pos = [i + 1 if i % 2 == 0 else i - 1 for i in range(m)]
    else:
        pos = [(i + m // 2) % m for i in range(m)]
    a = torch.ones(m, dtype=z.dtype) * (1.0 if kind == "ince" else 1.0 / m)
    u, v = a.clone(), a.clone()
    p1, p2 = relax[0] / (relax[0] + eps), relax[1] / (relax[1] + eps)
    for _ in range(iters):
        if kind == "uot":
            u = (a / (K @ v + 1e-16)) ** p1
            v = (a / (K.T @ u + 1e-16)) ** p2
        else:
            u = a / (K @ v)
            v = a / (K.T @ u)
    P = u[:, None] * K * v[None, :]
    ce = sum(-torch.log(P[i, pos[i]] / P[i].sum()) for i in range(m)) / m
    if kind == "ince":
        return ce
    if kind == "rince":
        return ce**q / q
    terms = [r2 * (-((P[i, pos[i]] / u[i]) ** q) / q + (lam / u[pos[i]]) ** q / q) + r1 * ce for i in range(m)]
    return sum(terms) / m


def _value_and_grad(fn, z):
    z = z.clone().requires_grad_(True)
    loss = fn(z)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def _embeddings(rows, dim, shift, dtype=torch.float64, seed=0):
    """``shift`` 0: about half the similarities are clamped; 2: none (the maximum is differentiable)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, dim, generator=gen, dtype=torch.float64) + shift).to(dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pairing", ["interleaved", "blocks"])
@pytest.mark.parametrize("rows,dim,shift,eps", [(12, 5, 0.0, 0.5), (18, 7, 2.0, 0.1), (30, 33, 0.3, 0.5)])
def test_gca_torch_path_equals_restated_definition(kind, pairing, rows, dim, shift, eps):
    z = _embeddings(rows, dim, shift)
    opts = GCAOptions(kind=kind, epsilon=eps, pairing=pairing)
    want, want_grad = _value_and_grad(lambda t: _gca_restated(t, kind, eps=eps, pairing=pairing), z)
    got, got_grad = _value_and_grad(lambda t: gca_loss_torch(t, opts), z)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-10 * want_grad.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_gca_torch_path_gradcheck(kind):
    z = _embeddings(8, 4, 1.5).requires_grad_(True)
    opts = GCAOptions(kind=kind, iterations=3, epsilon=0.3)
    assert torch.autograd.gradcheck(lambda t: gca_loss_torch(t, opts), (z,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_gca_options_change_the_loss(kind):
    """Every option of a kind enters its value (a test of the tests: restated and torch path agree
    on each of them, and they move the loss)."""
    z = _embeddings(10, 6, 0.5)
    base = GCAOptions(kind=kind)
    changes = {"epsilon": 0.3, "iterations": 1, "pairing": "blocks"}
    if kind != "ince":
        changes["q"] = 0.6
    if kind == "uot":
        changes.update(lam=0.1, relax=(0.5, 0.1), r1=0.5, r2=1.0)
    ref = float(gca_loss_torch(z, base))
    for name, value in changes.items():
        opts = GCAOptions(**{**base.__dict__, name: value})
        got = float(gca_loss_torch(z, opts))
        fields = {k: v for k, v in opts.__dict__.items() if k not in ("kind", "tf32")}
        fields = {"eps" if k == "epsilon" else "iters" if k == "iterations" else k: v for k, v in fields.items()}
        assert got == pytest.approx(float(_gca_restated(z, kind, **fields)), rel=1e-10), name
        assert abs(got - ref) > 1e-8, name


# ----- the fused path (Triton interpreter on CPU) -----

TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (1e-4, 3e-2), torch.float16: (2e-5, 2e-3)}
"""(loss relative, gradient relative to its largest entry) against float64: the rows are normalised in
float32 and rounded to the input dtype for the kernels (bfloat16: 2^-9 per element, measured 2.1e-2)."""


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "rows,dim,shift,eps,iters,pairing",
    [(38, 20, 0.0, 0.5, 10, "interleaved"), (30, 17, 2.0, 0.1, 4, "blocks"), (70, 45, 0.3, 0.25, 2, "interleaved")],
)
def test_gca_fused_equals_torch_path(kind, rows, dim, shift, eps, iters, pairing):
    z = _embeddings(rows, dim, shift, torch.float32, seed=rows)
    opts = GCAOptions(kind=kind, epsilon=eps, iterations=iters, pairing=pairing)
    want, want_grad = _value_and_grad(lambda t: gca_loss_torch(t, opts), z.double())
    got, got_grad = _value_and_grad(lambda t: gca_fused(t, opts), z)
    rtol, gtol = TOL[torch.float32]
    assert got.dtype == torch.float32 and got_grad.dtype == torch.float32
    assert abs(float(got) - float(want)) <= rtol * abs(float(want))
    assert float((got_grad.double() - want_grad).abs().max()) <= gtol * float(want_grad.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gca_fused_16bit_inputs(dtype):
    z = _embeddings(34, 24, 0.2, dtype, seed=3)
    opts = GCAOptions(kind="uot", iterations=3)
    want, want_grad = _value_and_grad(lambda t: gca_loss_torch(t, opts), z.double())
    got, got_grad = _value_and_grad(lambda t: gca_fused(t, opts), z)
    rtol, gtol = TOL[dtype]
    assert got_grad.dtype == dtype
    assert abs(float(got) - float(want)) <= rtol * abs(float(want))
    assert float((got_grad.double() - want_grad).abs().max()) <= gtol * float(want_grad.abs().max())


def test_gca_fused_is_deterministic_and_keeps_no_square_buffer():
    rows, dim = 96, 8
    z = _embeddings(rows, dim, 0.0, torch.float32, seed=5)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        first = _value_and_grad(lambda t: gca_fused(t, GCAOptions()), z)
    assert max(sizes) < rows * rows / 4  # (2T+1) x rows vectors and the rows; nothing (rows, rows)
    again = _value_and_grad(lambda t: gca_fused(t, GCAOptions()), z)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_gca_kernels_one_by_one():
    """Each kernel against its dense formula (off-diagonal sums, maximum, adjoint, gradient)."""
    from fastsfm.kernels import gca as k

    gen = torch.Generator().manual_seed(7)
    rows, dim, inv = 41, 19, 1 / 0.3
    x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    s = (x.double() @ x.double().T).clamp(min=1e-7)
    lk = -(1 - s) * inv
    off = ~torch.eye(rows, dtype=torch.bool)
    h = torch.randn(rows, generator=gen)
    out, rowmax, argcol = k.lse_pass(x, h, inv, with_max=True)
    want = torch.logsumexp(torch.where(off, lk + h.double()[None, :], -math.inf), dim=1)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rowmax.double(), (1 - s).amax(1), rtol=0, atol=1e-6)
    assert torch.equal(argcol.long(), (1 - s.float()).argmax(1))
    r, cv = want.float() + 0.5, torch.randn(rows, generator=gen)
    got = k.adjoint_pass(x, h, r, cv, inv)
    w = torch.where(off, torch.exp(h.double()[None, :] + lk - r.double()[:, None]), 0.0)  # w[i, j]
    torch.testing.assert_close(got.double(), w.T @ cv.double(), rtol=1e-5, atol=1e-6)
    rank = 5
    a = torch.zeros(rows, k.RANK_BLOCK)
    b = torch.zeros(rows, k.RANK_BLOCK)
    a[:, :rank] = torch.randn(rows, rank, generator=gen)
    b[:, :rank] = torch.rand(rows, rank, generator=gen)
    rho = torch.rand(rows, generator=gen)
    dx = k.gradient_pass(x, a, b, rho, inv)
    t = a.double() @ b.double().T
    keep = off & ((x.double() @ x.double().T) >= 1e-7)
    g = torch.where(keep, torch.exp(lk + rho.double()[:, None] + rho.double()[None, :]) * (t + t.T) * inv, 0.0)
    torch.testing.assert_close(dx.double(), g @ x.double(), rtol=1e-5, atol=1e-5)


# ----- the public API -----


def test_gca_public_api_dispatch_and_module():
    z = _embeddings(16, 6, 0.5, torch.float32)
    torch_value = fastsfm.gca_loss(z, kind="rince", backend="torch")
    fused_value = fastsfm.gca_loss(z, kind="rince", backend="triton")
    assert fastsfm.gca_loss(z.double(), kind="rince").dtype == torch.float64  # auto on CPU: torch
    assert abs(float(torch_value) - float(fused_value)) < 1e-5 * abs(float(torch_value))
    module = fastsfm.GCALoss(kind="rince", backend="torch")
    assert torch.equal(module(z), torch_value)
    assert "rince" in repr(module)


@pytest.mark.parametrize(
    "z,kwargs,error,match",
    [
        (torch.randn(7, 4), {}, ValueError, "even number"),
        (torch.randn(8), {}, TypeError, r"\(2n, D\)"),
        (torch.ones(8, 4, dtype=torch.int64), {}, TypeError, "floating-point"),
        (torch.full((4, 3), float("nan")), {}, ValueError, "NaN"),
        (torch.randn(4, 0), {}, ValueError, "D=0"),
        (torch.randn(4, 3), {"epsilon": 0.0}, ValueError, "epsilon must be"),
        (torch.randn(4, 3), {"kind": "infonce"}, ValueError, "kind must be one of"),
        (torch.randn(4, 3), {"pairing": "pairs"}, ValueError, "pairing must be one of"),
        (torch.randn(4, 3), {"iterations": 0}, ValueError, "iterations must be"),
        (torch.randn(4, 3), {"relax": (0.2,)}, ValueError, "relax must be"),
        (torch.randn(4, 3), {"backend": "cuda"}, ValueError, "backend must be one of"),
        (torch.randn(4, 3, dtype=torch.float64), {"backend": "triton"}, TypeError, "float64"),
    ],
)
def test_gca_bad_inputs_give_one_line_errors(z, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastsfm.gca_loss(z, **kwargs)


@pytest.mark.parametrize("iters", [1, 4])
def test_gca_fused_launch_counts(iters):
    """A forward is 2T + 1 log-sum-exp passes (the first finds the maximum), a backward 2T adjoint
    passes and one gradient pass: nothing else touches the rows^2 tiles."""
    from unittest import mock

    from fastsfm.kernels import gca as k

    z = _embeddings(20, 6, 0.0, torch.float32).requires_grad_(True)
    with (
        mock.patch.object(k, "lse_pass", wraps=k.lse_pass) as lse,
        mock.patch.object(k, "adjoint_pass", wraps=k.adjoint_pass) as adjoint,
        mock.patch.object(k, "gradient_pass", wraps=k.gradient_pass) as gradient,
    ):
        loss = gca_fused(z, GCAOptions(kind="uot", iterations=iters))
        assert (lse.call_count, adjoint.call_count, gradient.call_count) == (2 * iters + 1, 0, 0)
        loss.backward()
    assert (adjoint.call_count, gradient.call_count) == (2 * iters, 1)
    assert [c.kwargs.get("with_max", False) for c in lse.call_args_list] == [True] + [False] * (2 * iters)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gca_fused_on_cuda_equals_torch_path(dtype):
    """On a GPU, at a size where the tiles, the online log-sum-exp and the rank blocks all loop."""
    z = _embeddings(2050, 128, 0.0, dtype, seed=11)
    opts = GCAOptions(kind="uot", iterations=10)
    want, want_grad = _value_and_grad(lambda t: gca_loss_torch(t, opts), z.double().cuda())
    got, got_grad = _value_and_grad(lambda t: fastsfm.gca_loss(t, kind="uot"), z.cuda())
    rtol, gtol = TOL[dtype]
    assert abs(float(got) - float(want)) <= rtol * abs(float(want))
    assert float((got_grad.double() - want_grad).abs().max()) <= gtol * float(want_grad.abs().max())


def test_gca_tf32_option_reaches_every_kernel():
    """``tf32=True`` launches every float32 pass without IEEE products (TF32 on a GPU; the interpreter
    computes float32 either way, so the values still equal the PyTorch path's)."""
    from unittest import mock

    from fastsfm.kernels.gca import gradient, passes

    z = _embeddings(20, 6, 0.0, torch.float32).requires_grad_(True)
    launchers = [(passes, "_lse_launcher"), (passes, "_adjoint_launcher"), (gradient, "_gradient_launcher")]
    seen = []
    with contextlib.ExitStack() as stack:
        for module, name in launchers:
            real = getattr(module, name)
            stack.enter_context(
                mock.patch.object(
                    module, name, lambda key, spec, args, real=real: (seen.append(spec), real(key, spec, args))
                )
            )
        loss = fastsfm.gca_loss(z, kind="ince", iterations=2, tf32=True, backend="triton")
        loss.backward()
    assert len(seen) == 5 + 4 + 1 and all(spec.constexprs["IEEE"] is False for spec in seen)
    want = gca_loss_torch(z.detach().double(), GCAOptions(iterations=2))
    assert abs(float(loss.detach()) - float(want)) < 1e-5 * float(want)
    with pytest.raises(ValueError, match="tf32 must be True or False"):
        GCAOptions(tf32="yes")
