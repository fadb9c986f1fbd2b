"""The fused GCA path: Sinkhorn passes on :mod:`fastsfm.kernels.gca` under one autograd op.

:func:`gca_fused` computes what :func:`fastsfm.loss.gca_torch.gca_loss_torch` computes, without any
(2n, 2n) buffer.  The split:

* Triton (O(n^2 D) each): the ``2T + 1`` off-diagonal row log-sums of the forward (the first
  also finds the largest cost), ``2T`` adjoint passes and one gradient pass in the backward;
* PyTorch (O(n D) or O(n), with autograd): normalisation, the authors' diagonal ``C_ii = M``
  (the kernels leave the diagonal out; its term ``h_i - M / eps`` is added per row, and ``M``
  is rebuilt from the two rows attaining it, so its gradient reaches them), the marginal
  steps, the positives' costs and the loss (:func:`~fastsfm.loss.gca_torch.loss_from_potentials`).

Backward: pass ``p`` maps its input potential ``h_p`` to ``R_p = logsumexp_j(h_p,j + lk_ij)``;
given ``dR_p`` the reverse sweep computes ``dh_p`` (an adjoint pass plus the diagonal's term),
then ``dR_{p-1}`` through the marginal step.  The cost adjoint of all passes is
``dlk_ij = sum_p dR_p,i exp(h_p,j + lk_ij - R_p,i) = exp(lk_ij) (A B^T)_ij`` with
``A[:, p] = dR_p exp(-R_p)``, ``B[:, p] = exp(h_p)``, which one gradient pass applies (both
factors scaled by a per-row shift ``rho`` so that neither overflows).  The adjoint is that of the
unrolled iterations, exact in exact arithmetic (no envelope shortcut).

Memory: the normalised rows (fp32 and the kernel's copy) and 2 (2T + 1) float32 vectors.
At n = 8,192 pairs (16,384 rows), D = 128: 8 MB + 2.7 MB, against 43-54 GB for the authors'
formulation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import GCAOptions
from .gca_torch import CLAMP, UOT_DELTA, loss_from_potentials, marginal_step, partners, positive_logits, start_potential
from .ops import _on_device

__all__ = ["gca_fused"]

_KERNELS = []


def _kernels():
    """:mod:`fastsfm.kernels.gca`, imported on first use (importing triton reads ``TRITON_INTERPRET`` once)."""
    if not _KERNELS:
        from fastsfm.kernels import gca

        _KERNELS.append(gca)
    return _KERNELS[0]


def _step_vjp(options: GCAOptions, r: Tensor, grad: Tensor, second: bool) -> Tensor:
    """The adjoint of :func:`~fastsfm.loss.gca_torch.marginal_step` at row log-sums ``r``."""
    if options.kind != "uot":
        return -grad
    rho = options.relax[1 if second else 0]
    exponent = rho / (rho + options.epsilon)
    return -exponent * grad * torch.sigmoid(r - math.log(UOT_DELTA))


class _Sinkhorn(torch.autograd.Function):
    """``(x, diag) -> (f, g, R(g))``: the final potentials and row log-sums of ``options.iterations``
    rounds of log-domain Sinkhorn on ``lk = -C / eps`` with ``lk_ii = diag_i``.

    ``x`` (rows, D) float32 normalised rows (the gradient's variable), ``xk`` its copy in the kernels'
    dtype, ``first`` the first pass's off-diagonal log-sums (computed with the maximum)."""

    @staticmethod
    def forward(ctx, x: Tensor, diag: Tensor, xk: Tensor, first: Tensor, options: GCAOptions):
        with _on_device(x):
            return _Sinkhorn._forward(ctx, x, diag, xk, first, options)

    @staticmethod
    def _forward(ctx, x: Tensor, diag: Tensor, xk: Tensor, first: Tensor, options: GCAOptions):
        k = _kernels()
        rows = x.shape[0]
        inv = 1.0 / options.epsilon
        passes = 2 * options.iterations + 1
        h = torch.full((rows,), start_potential(options.kind, rows), dtype=torch.float32, device=x.device)
        inputs, outputs = [], []
        for p in range(passes):
            off = first if p == 0 else k.lse_pass(xk, h, inv, tf32=options.tf32)[0]
            r = torch.logaddexp(off, h + diag)
            inputs.append(h)
            outputs.append(r)
            if p < passes - 1:
                h = marginal_step(options, rows, r, second=p % 2 == 1)
        ctx.options = options
        ctx.save_for_backward(xk, diag, torch.stack(inputs), torch.stack(outputs))  # x itself is not read
        return inputs[-2], inputs[-1], outputs[-1]

    @staticmethod
    def backward(ctx, df: Tensor | None, dg: Tensor | None, dr: Tensor | None):
        xk, diag, inputs, outputs = ctx.saved_tensors
        with _on_device(xk):
            return _Sinkhorn._backward(ctx.options, xk, diag, inputs, outputs, df, dg, dr)

    @staticmethod
    def _backward(options, xk, diag, inputs, outputs, df, dg, dr):
        k = _kernels()
        passes, rows = inputs.shape
        inv = 1.0 / options.epsilon
        zero = torch.zeros(rows, dtype=torch.float32, device=xk.device)
        given = {passes - 2: df, passes - 1: dg}  # the outputs f = h_{P-2}, g = h_{P-1}
        ybar = dr if dr is not None else zero
        ybars = [None] * passes
        ddiag = zero
        for p in range(passes - 1, -1, -1):
            h, r = inputs[p], outputs[p]
            ybars[p] = ybar
            on_diag = ybar * torch.exp(h + diag - r)
            ddiag = ddiag + on_diag
            if p == 0:  # the starting potential is a constant
                break
            hbar = k.adjoint_pass(xk, h, r, ybar.contiguous(), inv, tf32=options.tf32) + on_diag
            if given.get(p) is not None:
                hbar = hbar + given[p]
            ybar = _step_vjp(options, outputs[p - 1], hbar, second=(p - 1) % 2 == 1)
        log_a, log_b = -outputs, inputs  # (P, rows) logs of the factors' magnitudes
        rho = torch.maximum(log_a.amax(0), log_b.amax(0))
        width = -(-passes // k.RANK_BLOCK) * k.RANK_BLOCK
        a = torch.zeros(rows, width, dtype=torch.float32, device=xk.device)
        b = torch.zeros_like(a)
        a[:, :passes] = (torch.stack(ybars) * torch.exp(log_a - rho)).T
        b[:, :passes] = torch.exp(log_b - rho).T
        dx = k.gradient_pass(xk, a, b, rho.contiguous(), inv, tf32=options.tf32)
        return dx, ddiag, None, None, None


def gca_fused(z: Tensor, options: GCAOptions) -> Tensor:
    """The GCA loss of ``z`` (2n, D) float32|bfloat16|float16 on the Triton kernels (0-dim float32)."""
    with _on_device(z):
        return _fused(z, options)


def _fused(z: Tensor, options: GCAOptions) -> Tensor:
    k = _kernels()
    rows = z.shape[0]
    inv = 1.0 / options.epsilon
    x = F.normalize(z.float(), dim=1)
    xk = (x if z.dtype == torch.float32 else x.to(z.dtype)).detach().contiguous()
    start = torch.full((rows,), start_potential(options.kind, rows), dtype=torch.float32, device=z.device)
    first, rowmax, argcol = k.lse_pass(xk, start, inv, with_max=True, tf32=options.tf32)
    i = rowmax.argmax()
    j = argcol[i].long()
    top = 1.0 - (x[i] * x[j]).sum().clamp(min=CLAMP)  # the maximum cost, differentiable
    diag = (-top * inv).expand(rows)
    f, g, row_lse = _Sinkhorn.apply(x, diag, xk, first, options)
    pos = partners(rows, options.pairing, z.device)
    return loss_from_potentials(options, f, g, row_lse, positive_logits(x, pos, options.epsilon), pos)
