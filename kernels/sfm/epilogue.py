"""The one-launch (C, D) epilogue: shifted partial sums per tile, reduced by the last tile.

See :mod:`fastsfm.kernels` for the algebra; this module holds step 2.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..launch import _INTERPRETER, Launcher, LaunchSpec, _cdiv, _next_pow2

__all__ = ["flow_epilogue", "epilogue_blocks", "workspace_size", "OBJECTIVES", "MIN_PROGRAMS"]

OBJECTIVES = {"flow": 0, "decouple": 1}
MIN_PROGRAMS = 264
"""Programs a launch aims for at least: two per SM of an H100 (132 SMs)."""
_TAIL_ELEMENTS = 32 if _INTERPRETER else 4096
"""Elements of the last program's (class blocks, columns) tile of column sums: 32 registers per
thread (the interpreter's 2 x 16, so that test shapes loop over several class blocks)."""
_COEFS = tl.constexpr(16)
"""Workspace room for the scalars the backward reads (alpha1, alpha2): 16 floats keep what follows 64-byte aligned."""


@triton.jit
def _block_sum(PTR, n, BLOCK: tl.constexpr):
    """Fixed-order float32 sum of ``PTR[0:n]``."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p0 in range(0, n, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        acc += tl.load(PTR + p, mask=p < n, other=0.0, cache_modifier=".cg")
    return tl.sum(acc, axis=0)


@triton.jit
def _epilogue_kernel(
    # data
    SUMS,  # (C, W) float32 sums buffer
    FLOW,  # (C, D) float32 a = nu - mu
    FLOW_SUM,  # (D,) float32 A = sum_c a_c
    FLOW_SQ,  # (1,) float32 |a|^2
    CENTERS,  # (C, D) float32 mu (decouple)
    NONTARGET,  # (C, D) float32 nu (decouple)
    SHIFT,  # (D,) float32 s = the mean of the real centres
    WORK,  # float32 from WORK + work_at: V (W) | COEF (16) | U (W) | PCOL (RB, W) | PSC (2, TILES); loss: loss_at
    COUNTER,  # (1,) int32, zero between calls
    # shapes
    C,
    D,
    W,
    NUM_RB,
    work_at,
    loss_at,
    # scalars
    inv_k,
    alpha,
    eps,
    # constants
    OBJECTIVE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_RB: tl.constexpr,
):
    """Program (j, rb): partials of tile (class block rb, column block j); the last program the rest.

    The last program's tail is vectorised: the tile partials are summed ``BLOCK_P`` at a time and
    the class blocks' column sums as (``BLOCK_RB``, ``BLOCK_D``) tiles, so its chain of dependent
    loads is ceil(tiles / BLOCK_P) + ceil(D / BLOCK_D) * ceil(class blocks / BLOCK_RB) long
    (C = 1000, D = 768: 1 + 12; C = 21,843: 5 + 72), not one load per class block and column block.
    Each reduction is a fixed tree (deterministic, as the rest)."""
    j = tl.program_id(0)
    rb = tl.program_id(1)
    num_cb = tl.num_programs(0)
    tiles = num_cb * NUM_RB
    inv_k = tl.cast(inv_k, tl.float32)
    alpha = tl.cast(alpha, tl.float32)
    eps = tl.cast(eps, tl.float32)
    v_vec = WORK + work_at  # what the backward reads comes first: it needs no tile count
    coef = v_vec + W
    u_vec = coef + _COEFS
    pcol = u_vec + W
    psc = pcol + NUM_RB * W
    cs = rb * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cs < C
    dmask = cols < D
    mask = cmask[:, None] & dmask[None, :]
    row = SUMS + cs.to(tl.int64)[:, None] * W
    count = tl.load(SUMS + cs.to(tl.int64) * W + D, mask=cmask, other=1.0)
    t = tl.load(row + cols[None, :], mask=mask, other=0.0) / count[:, None]
    s = tl.load(SHIFT + cols, mask=dmask, other=0.0)
    u = tl.where(mask, t - s[None, :], 0.0)
    const = cs.to(tl.int64)[:, None] * D + cols[None, :]
    if OBJECTIVE == 0:
        a = tl.load(FLOW + const, mask=mask, other=0.0)
        first = tl.sum(tl.sum(a * u, axis=1), axis=0)
        second = tl.sum(tl.sum(u * u, axis=1), axis=0)
    else:
        mu = tl.load(CENTERS + const, mask=mask, other=0.0)
        nu = tl.load(NONTARGET + const, mask=mask, other=0.0)
        diff = tl.where(mask, t - mu, 0.0)
        v = tl.where(mask, u * inv_k + nu - s[None, :] * ((C - 1) * inv_k), 0.0)
        first = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        second = tl.sum(tl.sum(v * v, axis=1), axis=0)
    tile = rb * num_cb + j
    tl.store(pcol + rb * W + cols, tl.sum(u, axis=0), mask=dmask)
    tl.store(psc + tile, first)
    tl.store(psc + tiles + tile, second)
    tl.debug_barrier()  # every thread's partials before the ticket
    ticket = tl.atomic_add(COUNTER, 1, sem="acq_rel")
    if ticket == tiles - 1:
        p1 = _block_sum(psc, tiles, BLOCK_P)
        p2 = _block_sum(psc + tiles, tiles, BLOCK_P)
        beta = (C - 1) * inv_k - 1.0
        gam = 1.0 + inv_k
        au = tl.zeros((BLOCK_D,), dtype=tl.float32)
        uu = tl.zeros((BLOCK_D,), dtype=tl.float32)
        su = tl.zeros((BLOCK_D,), dtype=tl.float32)
        a_s = tl.zeros((BLOCK_D,), dtype=tl.float32)
        ss = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # U = the sum of the class blocks' column sums, BLOCK_RB at a time
            dc = d0 + tl.arange(0, BLOCK_D)
            dm = dc < D
            tot = tl.zeros((BLOCK_RB, BLOCK_D), dtype=tl.float32)
            for r0 in range(0, NUM_RB, BLOCK_RB):
                r = r0 + tl.arange(0, BLOCK_RB)
                ptrs = pcol + r[:, None] * W + dc[None, :]
                tot += tl.load(ptrs, mask=(r < NUM_RB)[:, None] & dm[None, :], other=0.0, cache_modifier=".cg")
            tot = tl.sum(tot, axis=0)
            tl.store(u_vec + dc, tot, mask=dm)
            sv = tl.load(SHIFT + dc, mask=dm, other=0.0)
            av = tl.load(FLOW_SUM + dc, mask=dm, other=0.0)
            au += av * tot
            uu += tot * tot
            su += sv * tot
            a_s += av * sv
            ss += sv * sv
        au = tl.sum(au, axis=0)
        uu = tl.sum(uu, axis=0)
        su = tl.sum(su, axis=0)
        a_s = tl.sum(a_s, axis=0)
        ss = tl.sum(ss, axis=0)
        if OBJECTIVE == 0:
            ab = au * inv_k + beta * a_s - gam * p1
            qq = uu * inv_k * inv_k + 2.0 * beta * inv_k * su + beta * beta * ss
            qu = uu * inv_k + beta * su
            bb = tl.maximum(C * qq - 2.0 * gam * qu + gam * gam * p2, 0.0)
            norm_b = tl.sqrt(bb)
            den = tl.maximum(tl.sqrt(tl.load(FLOW_SQ)), eps) * tl.maximum(norm_b, eps)
            loss = 1.0 - ab / den
            w = tl.where(norm_b > eps, ab / tl.where(bb > 0.0, bb, 1.0), 0.0)
            alpha1 = gam / den
            alpha2 = gam * gam * w / den
        else:
            scale = 1.0 / (C * D)
            esq = C * uu * inv_k * inv_k - 2.0 * inv_k * (uu * inv_k - C * beta * su) + p2
            loss = alpha * scale * p1 + (1.0 - alpha) * scale * esq
            alpha1 = 2.0 * alpha * scale
            alpha2 = 2.0 * (1.0 - alpha) * inv_k * scale
        for d0 in range(0, D, BLOCK_D):  # V, the part of G shared by every class
            dc = d0 + tl.arange(0, BLOCK_D)
            dm = dc < D
            uv = tl.load(u_vec + dc, mask=dm, other=0.0, cache_modifier=".cg")
            sv = tl.load(SHIFT + dc, mask=dm, other=0.0)
            if OBJECTIVE == 0:
                q = uv * inv_k + beta * sv
                av = tl.load(FLOW_SUM + dc, mask=dm, other=0.0)
                vv = -inv_k * (av - w * (C * q - gam * uv)) / den - gam * w * q / den
            else:
                vv = alpha2 * (uv * ((C - 2) * inv_k) + C * beta * sv)
            tl.store(v_vec + dc, vv, mask=dm)
        tl.store(coef, alpha1)
        tl.store(coef + 1, alpha2)
        tl.store(WORK + loss_at, loss)
        tl.atomic_xchg(COUNTER, 0)


@functools.lru_cache(maxsize=256)
def epilogue_blocks(c: int, d: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_D)`` of the epilogue tiles: the largest tile (wider columns first) that
    still gives :data:`MIN_PROGRAMS` tiles; the smallest tile when C*D is too small for that."""
    if _INTERPRETER:
        return 16, 16
    candidates = [(bc, max(16, min(bd, _next_pow2(d)))) for bd in (64, 32) for bc in (64, 32, 16)]
    for block_c, block_d in candidates:
        if _cdiv(c, block_c) * _cdiv(d, block_d) >= MIN_PROGRAMS:
            return block_c, block_d
    return candidates[-1]


@functools.lru_cache(maxsize=256)
def workspace_size(c: int, d: int, w: int) -> int:
    """float32 elements of the epilogue's workspace: V (W) and the coefficients -- first, so the
    backward finds them without the epilogue's tile grid --, U (W), the column partials PCOL
    (RB, W), the tile partials, and the loss's element (:func:`flow_epilogue`)."""
    block_c, block_d = epilogue_blocks(c, d)
    rb, cb = _cdiv(c, block_c), _cdiv(d, block_d)
    return (rb + 2) * w + _COEFS.value + 2 * rb * cb + 1


_epilogue_launcher = Launcher(_epilogue_kernel)


@functools.lru_cache(maxsize=256)
def _epilogue_spec(c: int, d: int, objective: str) -> LaunchSpec:
    """The launch of :func:`flow_epilogue` for C x D constants (``grid``: column blocks, class blocks)."""
    block_c, block_d = epilogue_blocks(c, d)
    rb, cb = _cdiv(c, block_c), _cdiv(d, block_d)
    constexprs = {
        "OBJECTIVE": OBJECTIVES[objective],
        "BLOCK_C": block_c,
        "BLOCK_D": block_d,
        "BLOCK_P": min(1024, _next_pow2(rb * cb)),
        "BLOCK_RB": min(_TAIL_ELEMENTS // block_d, _next_pow2(rb)),
    }
    return LaunchSpec((cb, rb), constexprs)


def flow_epilogue(
    sums: torch.Tensor,
    work: torch.Tensor,
    work_at: int,
    counter: torch.Tensor,
    flow: torch.Tensor,
    flow_sum: torch.Tensor,
    flow_sq: torch.Tensor,
    centers: torch.Tensor,
    nontarget: torch.Tensor,
    shift: torch.Tensor,
    *,
    objective: str,
    alpha: float,
    inv_k: float,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The loss from the sums buffer (its first C rows of W), one launch; it lands in the last
    element of ``work``.

    The workspace, :func:`workspace_size` float32 elements from element ``work_at`` of ``work``
    (the sums buffer's own tail in the fused loss), receives the partials, ``V`` and the
    coefficients that :func:`backward_rows` reads; ``counter`` (1,) int32 is zero before and
    after.  The constants (float32, contiguous): ``flow = nu - mu`` (C, D), ``flow_sum`` (D,),
    ``flow_sq`` (1,), ``centers = mu``, ``nontarget = nu`` (C, D), ``shift`` (D,) the mean of mu.
    """
    c, d = flow.shape
    w = sums.shape[-1]
    spec = _epilogue_spec(c, d, objective)
    loss_at = work.numel() - 1
    args = (sums, flow, flow_sum, flow_sq, centers, nontarget, shift, work, counter, c, d, w, spec.grid[1], work_at)
    args += (loss_at, inv_k, alpha, eps)
    _epilogue_launcher((spec, sums.device.index, w, work_at, loss_at), spec, args)  # c, d: in spec
