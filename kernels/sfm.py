"""Fused Triton kernels for the statistical flow matching (SFM) loss.

Notation (all shapes are for one call):

* ``S``  (N, D) synthetic features, float32 / bfloat16 / float16, row-major.
* ``Y``  (N,)   int64 labels in [0, C).
* ``M``  (C, D) class centres *translated by an origin* ``o`` (``M = means - o``),
  cast to the dtype of ``S`` so that ``tl.dot`` runs on tensor cores.
* ``O``  (D,)   float32 origin ``o``; ``KO`` (C,) float32 ``o . M_k``.
* ``P``  (C,)   float32 ``|M_k|^2``.
* ``H``  (C, C) float32 ``H[c, k] = <M_k, M_k - M_c>``.
* ``R``  (C, C) float32 ``R[c, k] = w[c, k] / |M_k - M_c|`` with a zero diagonal.
* ``WSUM`` (C,) float32 ``sum_{k != c} w[c, k]``.

With ``g_ik = (s_i - o) . M_k``, ``q_i = |s_i - o|^2`` the per-row loss is::

    a_ik = H[y_i, k] - g_ik + g_{i y_i}         # <mu_k - s_i, mu_k - mu_{y_i}>
    n_ik = sqrt(max(P_k - 2 g_ik + q_i, 0) + eps) # |mu_k - s_i|
    loss_i = (WSUM[y_i] - sum_k R[y_i, k] a_ik / n_ik) / (C - 1)

The zero diagonal of ``R`` removes ``k = y_i`` without a branch; padded columns load
``R = 0``.  The translation by ``o`` (the mean of the class centres) leaves every flow
unchanged but shrinks the magnitudes that the expansion subtracts, which is what keeps
bfloat16 inputs accurate.  Nothing of size N x C x D is ever formed: the forward is a tiled
GEMM over (rows, classes) blocks with the formula in its epilogue, reduced to per-block row
partial sums (N x C/BLOCK_C floats).  The backward either stores the N x C coefficient
matrix ``beta - alpha`` and lets cuBLAS multiply it by the centres ("store"), or recomputes
the tiles per row block flash-attention style and stores nothing N x C ("recompute").

This module holds only ``@triton.jit`` kernels and their launchers: no autograd, no
validation (callers validate), no imports from the rest of fastsfm.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["sfm_forward", "sfm_backward", "interpreter_active"]


def interpreter_active() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _own_tile(S, M, O, y, rows, rmask, d0, D, stride_s, stride_m, BLOCK_D: tl.constexpr):
    """float32 tiles of ``s_i``, ``o`` and ``M_{y_i}`` over columns ``d0 .. d0+BLOCK_D`` (+ their masks)."""
    cols = d0 + tl.arange(0, BLOCK_D)
    dmask = cols < D
    tmask = rmask[:, None] & dmask[None, :]
    s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    o = tl.load(O + cols, mask=dmask, other=0.0)
    mu = tl.load(M + y[:, None] * stride_m + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    return cols, tmask, s, o, mu


@triton.jit
def _row_terms_kernel(S, Y, M, O, KO, Q, GSELF, N, D, stride_s, stride_m, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Per-row ``q_i = |s_i - o|^2`` and ``g_{i y_i} = (s_i - o) . M_{y_i}`` (float32, (N,) each)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(Y + rows, mask=rmask, other=0)
    q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gself = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols, tmask, s, o, mu = _own_tile(S, M, O, y, rows, rmask, d0, D, stride_s, stride_m, BLOCK_D)
        sc = s - o[None, :]
        q += tl.sum(sc * sc, axis=1)
        gself += tl.sum(s * mu, axis=1)
    gself -= tl.load(KO + y, mask=rmask, other=0.0)
    tl.store(Q + rows, q, mask=rmask)
    tl.store(GSELF + rows, gself, mask=rmask)


@triton.jit
def _flow_tile(S, Y, M, KO, P, H, R, Q, GSELF, rows, rmask, c0, C, D, stride_s, stride_m, stride_h, eps,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    """One (BLOCK_N, BLOCK_C) tile: GEMM ``S @ M^T`` then the flow terms.

    Returns ``(ks, kmask, r, a, n)`` with ``r = R[y_i, k]`` (zero where k is padding or the
    target class), ``a`` the flow inner product and ``n`` the synthetic flow norm.
    """
    y = tl.load(Y + rows, mask=rmask, other=0)
    q = tl.load(Q + rows, mask=rmask, other=0.0)
    gself = tl.load(GSELF + rows, mask=rmask, other=0.0)
    ks = c0 + tl.arange(0, BLOCK_C)
    kmask = ks < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        dmask = cols < D
        s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        mt = tl.load(M + ks[None, :] * stride_m + cols[:, None], mask=dmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            s = s.to(tl.float32)
            mt = mt.to(tl.float32)
        acc = tl.dot(s, mt, acc, input_precision=PRECISION)
    g = acc - tl.load(KO + ks, mask=kmask, other=0.0)[None, :]
    p = tl.load(P + ks, mask=kmask, other=0.0)
    cmask = rmask[:, None] & kmask[None, :]
    h = tl.load(H + y[:, None] * stride_h + ks[None, :], mask=cmask, other=0.0)
    r = tl.load(R + y[:, None] * stride_h + ks[None, :], mask=cmask, other=0.0)
    a = h - g + gself[:, None]
    n = tl.sqrt(tl.maximum(p[None, :] - 2.0 * g + q[:, None], 0.0) + eps)
    return ks, kmask, r, a, n


@triton.jit
def _sfm_fwd_kernel(S, Y, M, KO, P, H, R, Q, GSELF, PART, N, C, D, stride_s, stride_m, stride_h, stride_part, eps,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    """Program (i, j): rows block i x classes block j -> ``PART[rows, j] = sum_k R a / n``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks, kmask, r, a, n = _flow_tile(S, Y, M, KO, P, H, R, Q, GSELF, rows, rmask, tl.program_id(1) * BLOCK_C, C, D,
                                    stride_s, stride_m, stride_h, eps, BLOCK_N, BLOCK_C, BLOCK_D, PRECISION, UPCAST)
    tl.store(PART + rows * stride_part + tl.program_id(1), tl.sum(r * a / n, axis=1), mask=rmask)


@triton.jit
def _sfm_coef_kernel(S, Y, M, KO, P, H, R, Q, GSELF, COEF, APART, BPART, N, C, D, stride_s, stride_m, stride_h,
                     stride_coef, stride_part, eps, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Backward coefficients of one tile: ``COEF = beta - alpha`` (stored, N x C) and the
    partial row sums of ``alpha = R/n`` and ``beta = R a/n^3`` for this classes block."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks, kmask, r, a, n = _flow_tile(S, Y, M, KO, P, H, R, Q, GSELF, rows, rmask, tl.program_id(1) * BLOCK_C, C, D,
                                    stride_s, stride_m, stride_h, eps, BLOCK_N, BLOCK_C, BLOCK_D, PRECISION, UPCAST)
    alpha = r / n
    beta = alpha * a / (n * n)
    tl.store(APART + rows * stride_part + tl.program_id(1), tl.sum(alpha, axis=1), mask=rmask)
    tl.store(BPART + rows * stride_part + tl.program_id(1), tl.sum(beta, axis=1), mask=rmask)
    tl.store(COEF + rows[:, None] * stride_coef + ks[None, :], (beta - alpha).to(COEF.dtype.element_ty),
             mask=rmask[:, None] & kmask[None, :])


@triton.jit
def _grad_tile(S, Y, M, O, GROW, ASUM, BSUM, PART, DS, rows, rmask, d0, D, stride_s, stride_m, stride_part, inv_cm1,
               BLOCK_D: tl.constexpr):
    """``ds = -g/(C-1) (A mu_y - B (s - o) + part)`` on one (rows, d0..d0+BLOCK_D) tile."""
    y = tl.load(Y + rows, mask=rmask, other=0)
    cols, tmask, s, o, mu = _own_tile(S, M, O, y, rows, rmask, d0, D, stride_s, stride_m, BLOCK_D)
    scale = -tl.load(GROW + rows, mask=rmask, other=0.0) * inv_cm1
    asum = tl.load(ASUM + rows, mask=rmask, other=0.0)
    bsum = tl.load(BSUM + rows, mask=rmask, other=0.0)
    part = tl.load(PART + rows[:, None] * stride_part + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    ds = scale[:, None] * (asum[:, None] * mu - bsum[:, None] * (s - o[None, :]) + part)
    tl.store(DS + rows[:, None] * stride_s + cols[None, :], ds.to(DS.dtype.element_ty), mask=tmask)


@triton.jit
def _sfm_grad_kernel(S, Y, M, O, GROW, ASUM, BSUM, PART, DS, N, D, stride_s, stride_m, stride_part, inv_cm1,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Epilogue of the stored-coefficient backward, ``PART = COEF @ M`` computed by cuBLAS."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    _grad_tile(S, Y, M, O, GROW, ASUM, BSUM, PART, DS, rows, rows < N, tl.program_id(1) * BLOCK_D, D, stride_s,
               stride_m, stride_part, inv_cm1, BLOCK_D)


@triton.jit
def _sfm_bwd_recompute_kernel(S, Y, M, O, KO, P, H, R, Q, GSELF, GROW, DS, WS, N, C, D, stride_s, stride_m, stride_h,
                              stride_ws, eps, inv_cm1, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Recomputing backward: one program per row block sweeps all classes, recomputing the
    flow tiles and accumulating ``sum_k (beta - alpha) mu_k`` in the float32 workspace ``WS``
    (``DS`` itself for float32 inputs; each program owns its rows, so no atomics).  Nothing
    of size N x C is stored, at the price of a grid of only N / BLOCK_N programs."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tmask = rmask[:, None] & (cols < D)[None, :]
        tl.store(WS + rows[:, None] * stride_ws + cols[None, :], tl.zeros((BLOCK_N, BLOCK_D), tl.float32), mask=tmask)
    asum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ks, kmask, r, a, n = _flow_tile(S, Y, M, KO, P, H, R, Q, GSELF, rows, rmask, c0, C, D, stride_s, stride_m,
                                        stride_h, eps, BLOCK_N, BLOCK_C, BLOCK_D, PRECISION, UPCAST)
        alpha = r / n
        beta = alpha * a / (n * n)
        asum += tl.sum(alpha, axis=1)
        bsum += tl.sum(beta, axis=1)
        coef = beta - alpha
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            dmask = cols < D
            tmask = rmask[:, None] & dmask[None, :]
            mu = tl.load(M + ks[:, None] * stride_m + cols[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            ws_ptr = WS + rows[:, None] * stride_ws + cols[None, :]
            part = tl.load(ws_ptr, mask=tmask, other=0.0)
            if UPCAST:
                mu = mu.to(tl.float32)
            tl.store(ws_ptr, tl.dot(coef.to(mu.dtype), mu, part, input_precision=PRECISION), mask=tmask)
    # The row sums go through the (N,) buffers Q and GSELF, which are no longer needed.
    tl.store(Q + rows, asum, mask=rmask)
    tl.store(GSELF + rows, bsum, mask=rmask)
    for d0 in range(0, D, BLOCK_D):
        _grad_tile(S, Y, M, O, GROW, Q, GSELF, WS, DS, rows, rmask, d0, D, stride_s, stride_m, stride_ws, inv_cm1,
                   BLOCK_D)


def _configs(shapes):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_C": bc, "BLOCK_D": bd}, num_warps=w, num_stages=st)
            for bn, bc, bd, w, st in shapes]


# Tile kernels (forward, coefficients): a GEMM-like 2-D grid over (rows, classes) blocks.
_TILE_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4),
                          (128, 128, 32, 8, 4), (64, 64, 128, 4, 3)])
# The recomputing backward holds two (BLOCK_N, BLOCK_C) tiles at once and its grid is N / BLOCK_N
# programs only, hence smaller row blocks among them.
_ROW_CONFIGS = _configs([(64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3), (32, 64, 128, 4, 3),
                         (32, 128, 64, 4, 3), (16, 128, 64, 4, 3)])
_MIN_BLOCK_C = 16  # smallest BLOCK_C of any config (interpreter included): sizes the partial-sum buffers
# The interpreter is slow: small tiles keep odd shapes multi-tile, larger D steps keep it quick.
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_C": 16, "BLOCK_D": 32}
_ROWWISE = {"BLOCK_N": 32, "BLOCK_D": 64}  # the memory-bound row kernels

_fwd_tuned = triton.autotune(_TILE_CONFIGS, key=["C", "D"])(_sfm_fwd_kernel)
_coef_tuned = triton.autotune(_TILE_CONFIGS, key=["C", "D"])(_sfm_coef_kernel)
_bwd_tuned = triton.autotune(_ROW_CONFIGS, key=["C", "D"])(_sfm_bwd_recompute_kernel)


def _precision(dtype: torch.dtype) -> str:
    """tf32 for float32 only where torch itself allows it for matmul; exact otherwise."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(tuned, plain, grid, *args, **kwargs) -> None:
    """Autotuned on GPU; a fixed config under the interpreter or with ``FASTSFM_AUTOTUNE=0``.

    ``grid(meta)`` gives the launch grid from the chosen block sizes.
    """
    if interpreter_active():
        # The interpreter's tl.dot returns garbage for bfloat16 operands (triton 3.8), so there
        # the GEMM operands are upcast to float32; loads, casts and the epilogue stay as on GPU.
        cfg = _INTERPRETER_CONFIG
        plain[grid(cfg)](*args, **kwargs, **cfg, UPCAST=True)
    elif os.environ.get("FASTSFM_AUTOTUNE", "1") == "0":
        # One fixed GPU config: for test suites that sweep many shapes (autotuning each costs seconds).
        cfg = tuned.configs[0]
        plain[grid(cfg.kwargs)](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                UPCAST=False)
    else:
        tuned[grid](*args, **kwargs, UPCAST=False)


def _row_terms(s, y, m, o, ko) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = s.shape
    q = torch.empty(n, device=s.device, dtype=torch.float32)
    gself = torch.empty_like(q)
    _row_terms_kernel[(triton.cdiv(n, _ROWWISE["BLOCK_N"]),)](s, y, m, o, ko, q, gself, n, d, s.stride(0),
                                                                m.stride(0), **_ROWWISE)
    return q, gself


def sfm_forward(s: torch.Tensor, y: torch.Tensor, m: torch.Tensor, o: torch.Tensor, ko: torch.Tensor,
                p: torch.Tensor, h: torch.Tensor, r: torch.Tensor, wsum: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row SFM losses, shape (N,) float32.  Inputs as in the module docstring, contiguous.

    Extra memory: (N, ceil(C / 16)) float32 partial sums and two (N,) row terms.
    """
    n, d = s.shape
    c = m.shape[0]
    q, gself = _row_terms(s, y, m, o, ko)
    part = torch.zeros(n, triton.cdiv(c, _MIN_BLOCK_C), device=s.device, dtype=torch.float32)
    _launch(_fwd_tuned, _sfm_fwd_kernel,
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_C"])),
            s, y, m, ko, p, h, r, q, gself, part, n, c, d, s.stride(0), m.stride(0), h.stride(0), part.stride(0), eps,
            PRECISION=_precision(s.dtype))
    return (wsum[y] - part.sum(1)) / (c - 1)


def sfm_backward(s: torch.Tensor, y: torch.Tensor, m: torch.Tensor, o: torch.Tensor, ko: torch.Tensor,
                 p: torch.Tensor, h: torch.Tensor, r: torch.Tensor, grad_rows: torch.Tensor, eps: float,
                 strategy: str = "store") -> torch.Tensor:
    """Gradient of ``sum_i grad_rows[i] * loss_i`` with respect to ``s``: (N, D) in ``s.dtype``.

    ``strategy="store"``: a GEMM-shaped kernel over (rows, classes) tiles writes the
    coefficients ``beta - alpha`` as an (N, C) matrix in ``s.dtype``, cuBLAS multiplies it by
    the centres, and a row kernel adds the per-row terms.  ``strategy="recompute"``: one
    kernel per row block recomputes the tiles and never stores N x C (extra memory: an
    (N, D) float32 workspace for half inputs, none for float32), but its grid has only
    N / BLOCK_N programs.  ``benches/bench_loss.py`` measures both; see ``benches/RESULTS.md``.
    """
    n, d = s.shape
    c = m.shape[0]
    q, gself = _row_terms(s, y, m, o, ko)
    ds = torch.empty_like(s)
    inv_cm1 = 1.0 / (c - 1)
    if strategy == "recompute":
        ws = ds if s.dtype == torch.float32 else torch.empty(n, d, device=s.device, dtype=torch.float32)
        _launch(_bwd_tuned, _sfm_bwd_recompute_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),),
                s, y, m, o, ko, p, h, r, q, gself, grad_rows, ds, ws, n, c, d, s.stride(0), m.stride(0), h.stride(0),
                ws.stride(0), eps, inv_cm1, PRECISION=_precision(s.dtype))
        return ds
    if strategy != "store":
        raise ValueError(f"strategy must be 'store' or 'recompute', got {strategy!r}")
    coef = torch.empty(n, c, device=s.device, dtype=m.dtype)
    apart = torch.zeros(n, triton.cdiv(c, _MIN_BLOCK_C), device=s.device, dtype=torch.float32)
    bpart = torch.zeros_like(apart)
    _launch(_coef_tuned, _sfm_coef_kernel,
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_C"])),
            s, y, m, ko, p, h, r, q, gself, coef, apart, bpart, n, c, d, s.stride(0), m.stride(0), h.stride(0),
            coef.stride(0), apart.stride(0), eps, PRECISION=_precision(s.dtype))
    part = coef @ m
    grid = (triton.cdiv(n, _ROWWISE["BLOCK_N"]), triton.cdiv(d, _ROWWISE["BLOCK_D"]))
    _sfm_grad_kernel[grid](s, y, m, o, grad_rows, apart.sum(1), bpart.sum(1), part, ds, n, d, s.stride(0),
                           m.stride(0), part.stride(0), inv_cm1, **_ROWWISE)
    return ds
