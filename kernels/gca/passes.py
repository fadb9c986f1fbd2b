"""The row passes of the fused Sinkhorn: log-sum-exp (forward) and its linear adjoint (backward).

See :mod:`fastsfm.kernels.gca`.  Both stream (BLOCK_M, BLOCK_N) tiles of the similarity
``S = X X^T`` recomputed from the normalised rows ``X`` (rows, dim) in BLOCK_K column chunks;
neither writes anything of size rows^2.  The diagonal ``j == i`` is left out (the caller adds
its term: the authors' diagonal holds the matrix's maximum cost, known only after the first
pass).  Program ``i`` owns row block ``i`` and visits the column blocks in order: no atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..launch import Launcher, LaunchSpec, _cdiv, interpreter_active

__all__ = ["lse_pass", "adjoint_pass", "pass_tiles", "CLAMP"]

CLAMP = 1e-7
"""Similarities are clamped below at this before ``C = 1 - S`` (the authors' value)."""
_CLAMP = tl.constexpr(CLAMP)  # the kernels' copy (jitted code reads only constexpr globals)


@triton.jit
def _similarity_tile(X, rows_m, rows_n, mmask, nmask, dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """``S[rows_m, rows_n]`` (BLOCK_M, BLOCK_N) float32, the dot products over ``dim`` in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_K)
    for k in range(0, dim, BLOCK_K):
        kmask = (k + cols) < dim
        a = tl.load(X + rows_m[:, None] * dim + (k + cols)[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(X + rows_n[:, None] * dim + (k + cols)[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:  # Triton's interpreter mis-computes tl.dot on 16-bit operands
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b))
    return acc


@triton.jit
def _lse_kernel(
    X,  # (rows, dim) normalised rows, float32 | bfloat16 | float16, contiguous
    H,  # (rows,) float32: the potential h_j of the columns
    OUT,  # (rows,) float32 out: log sum_{j != i} exp(h_j - C_ij / eps)
    ROWMAX,  # (rows,) float32 out (WITH_MAX): max_j C_ij, diagonal included
    ARGCOL,  # (rows,) int32 out (WITH_MAX): the first column attaining it
    rows,
    dim,
    inv_eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WITH_MAX: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rows_m < rows
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_col = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for start in range(0, rows, BLOCK_N):
        rows_n = start + tl.arange(0, BLOCK_N)
        nmask = rows_n < rows
        s = _similarity_tile(X, rows_m, rows_n, mmask, nmask, dim, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, UPCAST)
        cost = 1.0 - tl.maximum(s, _CLAMP)
        if WITH_MAX:
            shown = tl.where(nmask[None, :], cost, float("-inf"))
            tile_best = tl.max(shown, axis=1)
            tile_col = tl.argmax(shown, axis=1).to(tl.int32) + start
            better = tile_best > best
            best_col = tl.where(better, tile_col, best_col)
            best = tl.where(better, tile_best, best)
        h = tl.load(H + rows_n, mask=nmask, other=0.0)
        keep = nmask[None, :] & (rows_n[None, :] != rows_m[:, None])
        e = tl.where(keep, h[None, :] - cost * inv_eps, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(e, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(e - safe[:, None]), axis=1)
        run_max = new_max
    tl.store(OUT + rows_m, run_max + tl.log(run_sum), mask=mmask)
    if WITH_MAX:
        tl.store(ROWMAX + rows_m, best, mask=mmask)
        tl.store(ARGCOL + rows_m, best_col, mask=mmask)


@triton.jit
def _adjoint_kernel(
    X,  # (rows, dim) normalised rows, contiguous
    H,  # (rows,) float32: the pass's input potential
    R,  # (rows,) float32: the pass's output (full row log-sums, diagonal included)
    CV,  # (rows,) float32: the adjoint of R
    OUT,  # (rows,) float32 out: sum_{i != j} CV_i exp(H_j - C_ij / eps - R_i)
    rows,
    dim,
    inv_eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # the output index j
    mmask = rows_m < rows
    h = tl.load(H + rows_m, mask=mmask, other=0.0)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, rows, BLOCK_N):
        rows_n = start + tl.arange(0, BLOCK_N)  # the summed index i
        nmask = rows_n < rows
        s = _similarity_tile(X, rows_m, rows_n, mmask, nmask, dim, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, UPCAST)
        cost = 1.0 - tl.maximum(s, _CLAMP)
        r = tl.load(R + rows_n, mask=nmask, other=0.0)
        cv = tl.load(CV + rows_n, mask=nmask, other=0.0)
        keep = nmask[None, :] & (rows_n[None, :] != rows_m[:, None])
        w = tl.where(keep, tl.exp(h[:, None] - cost * inv_eps - r[None, :]), 0.0)  # softmax weights: <= 1
        acc += tl.sum(w * cv[None, :], axis=1)
    tl.store(OUT + rows_m, acc, mask=mmask)


@functools.lru_cache(maxsize=32)
def pass_tiles(elem: int, dim: int) -> tuple[int, int, int, int]:
    """The tiles of every GCA pass for ``elem``-byte rows of ``dim`` features: (64, 64) row x column
    tiles (32 x 32 under the interpreter), BLOCK_K 32 (float32) or 64 (16-bit), 8 warps (with 4, the
    float32 passes need 255 registers and spill on sm_80; with 8, at most 181, no spills: the
    compile report).  The gradient pass narrows the rows (:data:`~.gradient.GRAD_ROWS`)."""
    if interpreter_active():
        return (32, 32, 32, 4)
    block_k = min(32 if elem == 4 else 64, max(16, 1 << max(dim - 1, 0).bit_length()))
    return (64, 64, block_k, 8)


@functools.lru_cache(maxsize=64)
def _pass_spec(rows: int, tiles: tuple, ieee: bool, upcast: bool, with_max: bool | None) -> LaunchSpec:
    block_m, block_n, block_k, warps = tiles
    constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    if with_max is not None:
        constexprs["WITH_MAX"] = with_max
    constexprs.update(IEEE=ieee, UPCAST=upcast)
    return LaunchSpec((_cdiv(rows, block_m), 1), constexprs, warps)


_lse_launcher = Launcher(_lse_kernel)
_adjoint_launcher = Launcher(_adjoint_kernel)


def _common(x: torch.Tensor, tf32: bool) -> tuple[tuple, bool, bool]:
    """The tiles, whether the products are IEEE float32 (float32 rows without ``tf32``), whether to upcast."""
    tiles = pass_tiles(x.element_size(), x.shape[1])
    return tiles, x.dtype == torch.float32 and not tf32, interpreter_active() and x.element_size() == 2


def lse_pass(
    x: torch.Tensor, h: torch.Tensor, inv_eps: float, with_max: bool = False, tf32: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Off-diagonal row log-sums ``log sum_{j != i} exp(h_j - C_ij / eps)`` (rows,) float32 of the
    normalised rows ``x`` (rows, dim), contiguous, and the potential ``h`` (rows,) float32; with
    ``with_max`` also each row's largest cost (diagonal included) and its first column (int32); ``tf32``:
    float32 rows' products on the tensor cores (TF32) instead of IEEE float32."""
    rows, dim = x.shape
    tiles, ieee, upcast = _common(x, tf32)
    out = torch.empty(rows, device=x.device, dtype=torch.float32)
    rowmax = torch.empty_like(out) if with_max else out
    argcol = torch.empty(rows, device=x.device, dtype=torch.int32) if with_max else out
    spec = _pass_spec(rows, tiles, ieee, upcast, with_max)
    key = (spec, x.device.index, x.dtype, rows, dim)
    _lse_launcher(key, spec, (x, h, out, rowmax, argcol, rows, dim, inv_eps))
    return out, (rowmax if with_max else None), (argcol if with_max else None)


def adjoint_pass(
    x: torch.Tensor, h: torch.Tensor, r: torch.Tensor, cv: torch.Tensor, inv_eps: float, tf32: bool = False
) -> torch.Tensor:
    """``out_j = sum_{i != j} cv_i exp(h_j - C_ij / eps - r_i)`` (rows,) float32: the adjoint, with
    respect to the input ``h``, of a pass whose full output is ``r``, given the output's adjoint ``cv``."""
    rows, dim = x.shape
    tiles, ieee, upcast = _common(x, tf32)
    out = torch.empty(rows, device=x.device, dtype=torch.float32)
    spec = _pass_spec(rows, tiles, ieee, upcast, None)
    key = (spec, x.device.index, x.dtype, rows, dim)
    _adjoint_launcher(key, spec, (x, h, r, cv, out, rows, dim, inv_eps))
    return out
