"""The gradient pass: ``dL/dX`` of every Sinkhorn pass at once, flash-attention style.

See :mod:`fastsfm.kernels.gca`.  With the rank-``P`` factors ``A``, ``B`` (rows, P) and the row
shifts ``rho`` (rows,) the caller collects from the backward sweep, the gradient of the loss with
respect to the off-diagonal log-kernel is ``exp(lk_ij + rho_i + rho_j) (A B^T)_ij``; through
``lk = -(1 - max(S, 1e-7)) / eps`` and ``S = X X^T`` (symmetric)::

    G_ij = [i != j] [S_ij >= 1e-7] exp(lk_ij + rho_i + rho_j) (A_i . B_j + B_i . A_j) / eps
    dX_i = sum_j G_ij X_j

Program ``(i, d)`` owns row block ``i`` and column block ``d`` of ``dX`` and streams the row
blocks ``j`` in order: per tile one ``S`` product over ``dim``, one rank-``2P`` product, one
``G X_j`` product.  No atomics, nothing of size rows^2 in memory.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..launch import Launcher, LaunchSpec, _cdiv, _next_pow2
from .passes import _CLAMP, _common, _similarity_tile

__all__ = ["gradient_pass", "RANK_BLOCK", "GRAD_COLUMNS"]

RANK_BLOCK = 16
"""The rank factors are padded to a multiple of this (the smallest ``tl.dot`` width)."""
GRAD_ROWS = 32
"""Row block of the gradient pass (its accumulator is BLOCK_M x BLOCK_D float32: 32 rows keep it in
registers without spills on sm_80 and sm_90)."""
GRAD_COLUMNS = 128
"""Widest column block of ``dX`` one program accumulates (wider features: more programs, ``S`` recomputed)."""


@triton.jit
def _gradient_kernel(
    X,  # (rows, dim) normalised rows, contiguous
    A,  # (rows, rank) float32, zero-padded
    B,  # (rows, rank) float32
    RHO,  # (rows,) float32 row shifts
    DX,  # (rows, dim) float32 out
    rows,
    dim,
    rank,
    inv_eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < dim
    rows_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rows_m < rows
    rho_m = tl.load(RHO + rows_m, mask=mmask, other=0.0)
    ranks = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, rows, BLOCK_N):
        rows_n = start + tl.arange(0, BLOCK_N)
        nmask = rows_n < rows
        s = _similarity_tile(X, rows_m, rows_n, mmask, nmask, dim, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, UPCAST)
        t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(0, rank, 16):
            am = tl.load(A + rows_m[:, None] * rank + (r + ranks)[None, :], mask=mmask[:, None], other=0.0)
            bm = tl.load(B + rows_m[:, None] * rank + (r + ranks)[None, :], mask=mmask[:, None], other=0.0)
            an = tl.load(A + rows_n[:, None] * rank + (r + ranks)[None, :], mask=nmask[:, None], other=0.0)
            bn = tl.load(B + rows_n[:, None] * rank + (r + ranks)[None, :], mask=nmask[:, None], other=0.0)
            t += tl.dot(am, tl.trans(bn), input_precision="ieee")
            t += tl.dot(bm, tl.trans(an), input_precision="ieee")
        rho_n = tl.load(RHO + rows_n, mask=nmask, other=0.0)
        keep = nmask[None, :] & (rows_n[None, :] != rows_m[:, None]) & (s >= _CLAMP)
        lk = (tl.maximum(s, _CLAMP) - 1.0) * inv_eps
        g = tl.where(keep, tl.exp(lk + rho_m[:, None] + rho_n[None, :]) * t * inv_eps, 0.0)
        xn = tl.load(X + rows_n[:, None] * dim + cols[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST or IEEE:
            acc += tl.dot(g, xn.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(g.to(xn.dtype), xn)
    tl.store(DX + rows_m[:, None] * dim + cols[None, :], acc, mask=mmask[:, None] & dmask[None, :])


_gradient_launcher = Launcher(_gradient_kernel)


@functools.lru_cache(maxsize=64)
def _gradient_spec(rows: int, dim: int, tiles: tuple, ieee: bool, upcast: bool) -> LaunchSpec:
    block_m, block_n, block_k, warps = tiles
    block_m = min(block_m, GRAD_ROWS)
    block_n = min(block_n, 32) if ieee else block_n  # float32 FMA products: half the column tile
    block_d = min(GRAD_COLUMNS, max(16, _next_pow2(dim)))
    constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": block_d}
    constexprs.update(IEEE=ieee, UPCAST=upcast)
    return LaunchSpec((_cdiv(rows, block_m), _cdiv(dim, block_d)), constexprs, warps)


def gradient_pass(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor, inv_eps: float, tf32: bool = False
) -> torch.Tensor:
    """``dX`` (rows, dim) float32 of the normalised rows ``x`` (rows, dim), contiguous, from the rank
    factors ``a``, ``b`` (rows, rank) float32 (rank a multiple of :data:`RANK_BLOCK`) and the row
    shifts ``rho`` (rows,) float32 (module docstring); ``tf32`` as :func:`~.passes.lse_pass`."""
    rows, dim = x.shape
    tiles, ieee, upcast = _common(x, tf32)
    out = torch.empty(rows, dim, device=x.device, dtype=torch.float32)
    spec = _gradient_spec(rows, dim, tiles, ieee, upcast)
    rank = a.shape[1]
    key = (spec, x.device.index, x.dtype, rank)
    _gradient_launcher(key, spec, (x, a, b, rho, out, rows, dim, rank, inv_eps))
    return out
