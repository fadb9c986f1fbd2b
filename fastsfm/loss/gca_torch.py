"""The GCA losses' PyTorch path (CPU, float64, ``gradcheck``) and the pieces the fused path shares.

Generalized contrastive alignment (arXiv 2502.20141; the authors' ``nerdslab/gca``,
``gca_loss_cifar.py``) treats the 2n projections of a batch of n pairs as two copies of one
point cloud and aligns them by entropic optimal transport.  In the authors' definition, for
``z`` (2n, D)::

    x = z / |z|                      (F.normalize, per row)
    C_ij = 1 - max(x_i . x_j, 1e-7)   for i != j;   C_ii = M = max_ij of that matrix (diagonal 1 - x_i . x_i
                                                    included; M is differentiated)
    K = exp(-C / eps)
    u, v = 1 (ince) or 1/2n (rince, uot);  a = b = the same vector
    10 rounds of   u = a / (K v),  v = b / (K^T u)                                (ince, rince)
                   u = (a / (K v + 1e-16))^f1,  v = (b / (K^T u + 1e-16))^f2      (uot; f = rho / (rho + eps))
    P = diag(u) K diag(v)

and with ``pos(i)`` the other view of row ``i``::

    CE     = mean_i -log(P[i, pos(i)] / sum_j P[i, j])        (F.cross_entropy of log P)
    ince   = CE;   rince = CE^q / q
    uot    = mean_i r2 (-(P[i, pos(i)] / u_i)^q / q + (lam / u_pos(i))^q / q) + r1 CE

This module computes the same in the log domain, ``f = log u``, ``g = log v``, ``lk = -C / eps``::

    R_i(h) = logsumexp_j (h_j + lk_ij)       (one "pass"; a column pass is a row pass: C is symmetric)
    f = step(R(g)),  g = step(R(f))          step(R) = log a - R, or f1 (log a - logaddexp(R, log 1e-16))
    CE_i = R_i(g) - g_pos(i) - lk_i,pos(i)   (log P's row sum is f_i + R_i(g): u cancels)
    P[i, pos(i)] / u_i = exp(lk_i,pos(i) + g_pos(i)),   1 / u_pos(i) = exp(-f_pos(i))

so a loss needs only the final potentials ``f``, ``g``, the row log-sums ``R(g)`` and the
positives' costs: :func:`loss_from_potentials` is that tail, shared with the fused path
(:mod:`fastsfm.loss.gca_ops`), which computes the potentials without any n x n buffer.

Deviation (none in value): the authors' UOT loop also has an absorption branch (for u or v
above 1e5) and a NaN/Inf early exit; neither fires for normalised costs at eps >= 0.05, and
the absorption branch as written would raise (``torch.ones(..., type_as=...)``).  Their code
creates constants in torch's default dtype; compared in float64 with
``torch.set_default_dtype(torch.float64)``, this path equals theirs to 1e-12 relative (values
and gradients, every kind and pairing; ``tests/loss/test_gca.py`` restates the definition).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import GCAOptions

__all__ = [
    "CLAMP",
    "UOT_DELTA",
    "partners",
    "start_potential",
    "marginal_step",
    "positive_logits",
    "loss_from_potentials",
    "gca_loss_torch",
]

CLAMP = 1e-7
"""Similarities are clamped below at this before ``C = 1 - S`` (the authors' value)."""
UOT_DELTA = 1e-16
"""Added to ``K v`` and ``K^T u`` in the unbalanced scaling (the authors' value)."""


def partners(rows: int, pairing: str, device: torch.device | str = "cpu") -> Tensor:
    """(rows,) int64: the row holding the other view of each row (``interleaved``: 2i <-> 2i+1;
    ``blocks``: i <-> i + n)."""
    i = torch.arange(rows, device=device)
    if pairing == "interleaved":
        return i ^ 1
    return (i + rows // 2) % rows


def start_potential(kind: str, rows: int) -> float:
    """``log a`` (= ``log b`` = the starting ``g``): 0 for ``ince`` (a = 1), ``-log 2n`` otherwise."""
    return 0.0 if kind == "ince" else -math.log(rows)


def marginal_step(options: GCAOptions, rows: int, lse: Tensor, second: bool) -> Tensor:
    """The next potential from a pass's row log-sums ``lse`` (rows,): ``f`` (``second`` False) or ``g``."""
    log_a = start_potential(options.kind, rows)
    if options.kind != "uot":
        return log_a - lse
    rho = options.relax[1 if second else 0]
    exponent = rho / (rho + options.epsilon)
    return exponent * (log_a - torch.logaddexp(lse, torch.full_like(lse, math.log(UOT_DELTA))))


def positive_logits(x: Tensor, pos: Tensor, epsilon: float) -> Tensor:
    """(rows,) ``lk_i,pos(i) = -(1 - max(x_i . x_pos(i), 1e-7)) / eps`` of normalised rows ``x``: O(n D)."""
    s = (x * x[pos]).sum(1).clamp(min=CLAMP)
    return -(1.0 - s) / epsilon


def loss_from_potentials(options: GCAOptions, f: Tensor, g: Tensor, row_lse: Tensor, lk_pos: Tensor, pos: Tensor):
    """The loss (0-dim) from the final potentials ``f``, ``g`` (rows,), ``row_lse = R(g)`` and the
    positives' log-kernel ``lk_pos`` (:func:`positive_logits`)."""
    ce = (row_lse - g[pos] - lk_pos).mean()
    if options.kind == "ince":
        return ce
    if options.kind == "rince":
        return ce.pow(options.q) / options.q
    q = options.q
    attract = torch.exp(q * (lk_pos + g[pos])) / q
    repel = torch.exp(q * (math.log(options.lam) - f[pos])) / q
    return options.r2 * (repel - attract).mean() + options.r1 * ce


def gca_loss_torch(z: Tensor, options: GCAOptions) -> Tensor:
    """The GCA loss of ``z`` (2n, D) with dense (2n, 2n) matrices and autograd.

    Computes in float64 for float64 ``z``, float32 otherwise; memory about (2 iterations + 4)
    (2n)^2 elements for the backward (the n x n passes keep their inputs, as the authors' code).
    """
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    rows = z.shape[0]
    x = F.normalize(z.to(work), dim=1)
    cost = 1.0 - (x @ x.T).clamp(min=CLAMP)
    eye = torch.eye(rows, dtype=torch.bool, device=z.device)
    cost = torch.where(eye, cost.max(), cost)
    lk = -cost / options.epsilon
    g = torch.full((rows,), start_potential(options.kind, rows), dtype=work, device=z.device)
    f = g
    for _ in range(options.iterations):
        f = marginal_step(options, rows, torch.logsumexp(lk + g[None, :], dim=1), second=False)
        g = marginal_step(options, rows, torch.logsumexp(lk + f[:, None], dim=0), second=True)
    pos = partners(rows, options.pairing, z.device)
    row_lse = torch.logsumexp(lk + g[None, :], dim=1)
    return loss_from_potentials(options, f, g, row_lse, lk[torch.arange(rows, device=z.device), pos], pos)
