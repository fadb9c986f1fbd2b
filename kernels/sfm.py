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
bfloat16 inputs accurate.  Nothing of size N x C x D, nor N x C, is ever stored: the
forward is a tiled GEMM with the formula in its epilogue, and the backward recomputes
the same tiles (flash-attention style) and feeds ``beta - alpha`` into a second GEMM.

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
def _row_terms(S, Y, M, O, KO, rows, rmask, D, stride_s, stride_m, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row ``q_i = |s_i - o|^2`` and ``g_{i y_i} = (s_i - o) . M_{y_i}`` in float32."""
    y = tl.load(Y + rows, mask=rmask, other=0)
    q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gself = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols, tmask, s, o, mu = _own_tile(S, M, O, y, rows, rmask, d0, D, stride_s, stride_m, BLOCK_D)
        sc = s - o[None, :]
        q += tl.sum(sc * sc, axis=1)
        gself += tl.sum(s * mu, axis=1)
    gself -= tl.load(KO + y, mask=rmask, other=0.0)
    return y, q, gself


@triton.jit
def _flow_tile(S, M, KO, P, H, R, y, q, gself, rows, rmask, c0, C, D, stride_s, stride_m, stride_h, eps,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    """One (BLOCK_N, BLOCK_C) tile: GEMM ``S @ M^T`` then the flow terms.

    Returns ``(ks, kmask, r, a, n)`` with ``r = R[y_i, k]`` (zero where k is padding or the
    target class), ``a`` the flow inner product and ``n`` the synthetic flow norm.
    """
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
def _sfm_fwd_kernel(S, Y, M, O, KO, P, H, R, WSUM, LOSS, N, C, D, stride_s, stride_m, stride_h, eps, inv_cm1,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y, q, gself = _row_terms(S, Y, M, O, KO, rows, rmask, D, stride_s, stride_m, BLOCK_N, BLOCK_D)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ks, kmask, r, a, n = _flow_tile(S, M, KO, P, H, R, y, q, gself, rows, rmask, c0, C, D, stride_s, stride_m,
                                        stride_h, eps, BLOCK_N, BLOCK_C, BLOCK_D, PRECISION, UPCAST)
        total += tl.sum(r * a / n, axis=1)
    wsum = tl.load(WSUM + y, mask=rmask, other=0.0)
    tl.store(LOSS + rows, (wsum - total) * inv_cm1, mask=rmask)


@triton.jit
def _sfm_bwd_kernel(S, Y, M, O, KO, P, H, R, GROW, DS, WS, N, C, D, stride_s, stride_m, stride_h, stride_ws, eps,
                    inv_cm1, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dL/ds_i = -g_i/(C-1) [ A_i mu_y - B_i s_i + sum_k (beta_ik - alpha_ik) mu_k ].

    ``alpha = R / n``, ``beta = R a / n^3``, ``A = sum_k alpha``, ``B = sum_k beta`` and
    ``g_i`` the upstream gradient of row i.  The sum over k is accumulated in the float32
    workspace ``WS`` (which is ``DS`` itself for float32 inputs): each program owns its rows,
    so the read-modify-write needs no atomics.  The flow tiles are recomputed, not stored.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y, q, gself = _row_terms(S, Y, M, O, KO, rows, rmask, D, stride_s, stride_m, BLOCK_N, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tmask = rmask[:, None] & (cols < D)[None, :]
        tl.store(WS + rows[:, None] * stride_ws + cols[None, :], tl.zeros((BLOCK_N, BLOCK_D), tl.float32), mask=tmask)
    asum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ks, kmask, r, a, n = _flow_tile(S, M, KO, P, H, R, y, q, gself, rows, rmask, c0, C, D, stride_s, stride_m,
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
    scale = -tl.load(GROW + rows, mask=rmask, other=0.0) * inv_cm1
    for d0 in range(0, D, BLOCK_D):
        cols, tmask, s, o, mu = _own_tile(S, M, O, y, rows, rmask, d0, D, stride_s, stride_m, BLOCK_D)
        part = tl.load(WS + rows[:, None] * stride_ws + cols[None, :], mask=tmask, other=0.0)
        ds = scale[:, None] * (asum[:, None] * mu - bsum[:, None] * (s - o[None, :]) + part)
        tl.store(DS + rows[:, None] * stride_s + cols[None, :], ds.to(DS.dtype.element_ty), mask=tmask)


# GPU configurations; the backward holds two (BLOCK_N, BLOCK_C) tiles at once, hence the
# smaller tiles among them.  Keyed on (C, D): N only changes the grid.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_C": bc, "BLOCK_D": bd}, num_warps=w, num_stages=st)
    for bn, bc, bd, w, st in [
        (64, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 64, 64, 8, 3),
        (128, 128, 32, 8, 3),
        (64, 64, 128, 4, 2),
        (32, 64, 128, 4, 3),
        # Small row blocks: one program per BLOCK_N rows sweeps all C, so at N ~ 10k the
        # grid only fills the GPU's SMs with BLOCK_N <= 32.
        (32, 128, 64, 4, 3),
        (16, 128, 64, 4, 3),
        (16, 64, 128, 4, 3),
    ]
]
# The interpreter is slow: small tiles keep odd shapes multi-tile, larger D steps keep it quick.
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_C": 16, "BLOCK_D": 32}

_fwd_tuned = triton.autotune(_GPU_CONFIGS, key=["C", "D"])(_sfm_fwd_kernel)
_bwd_tuned = triton.autotune(_GPU_CONFIGS, key=["C", "D"])(_sfm_bwd_kernel)


def _precision(dtype: torch.dtype) -> str:
    """tf32 for float32 only where torch itself allows it for matmul; exact otherwise."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(tuned, plain, n: int, *args, **kwargs) -> None:
    if os.environ.get("FASTSFM_AUTOTUNE", "1") == "0" and not interpreter_active():
        # One fixed GPU config: for test suites that sweep many shapes (autotuning each costs seconds).
        cfg = _GPU_CONFIGS[0]
        plain[(triton.cdiv(n, cfg.kwargs["BLOCK_N"]),)](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                                                       num_stages=cfg.num_stages, UPCAST=False)
    elif interpreter_active():
        # The interpreter's tl.dot returns garbage for bfloat16 operands (triton 3.8), so there
        # the GEMM operands are upcast to float32; loads, casts and the epilogue stay as on GPU.
        cfg = _INTERPRETER_CONFIG
        plain[(triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **kwargs, **cfg, UPCAST=True)
    else:
        tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **kwargs, UPCAST=False)


def sfm_forward(s: torch.Tensor, y: torch.Tensor, m: torch.Tensor, o: torch.Tensor, ko: torch.Tensor,
                p: torch.Tensor, h: torch.Tensor, r: torch.Tensor, wsum: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row SFM losses, shape (N,) float32.  Inputs as in the module docstring, contiguous."""
    n, d = s.shape
    c = m.shape[0]
    loss = torch.empty(n, device=s.device, dtype=torch.float32)
    _launch(_fwd_tuned, _sfm_fwd_kernel, n, s, y, m, o, ko, p, h, r, wsum, loss, n, c, d, s.stride(0), m.stride(0),
            h.stride(0), eps, 1.0 / (c - 1), PRECISION=_precision(s.dtype))
    return loss


def sfm_backward(s: torch.Tensor, y: torch.Tensor, m: torch.Tensor, o: torch.Tensor, ko: torch.Tensor,
                 p: torch.Tensor, h: torch.Tensor, r: torch.Tensor, grad_rows: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient of ``sum_i grad_rows[i] * loss_i`` with respect to ``s``: (N, D) in ``s.dtype``.

    For float32 inputs the accumulation happens in the output itself; for half inputs a
    float32 (N, D) workspace is allocated (the only extra memory besides the output).
    """
    n, d = s.shape
    c = m.shape[0]
    ds = torch.empty_like(s)
    ws = ds if s.dtype == torch.float32 else torch.empty(n, d, device=s.device, dtype=torch.float32)
    _launch(_bwd_tuned, _sfm_bwd_kernel, n, s, y, m, o, ko, p, h, r, grad_rows, ds, ws, n, c, d, s.stride(0),
            m.stride(0), h.stride(0), ws.stride(0), eps, 1.0 / (c - 1), PRECISION=_precision(s.dtype))
    return ds
