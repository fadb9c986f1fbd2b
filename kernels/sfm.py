"""Fused Triton kernels of the SFM flow-cosine loss (arXiv 2602.05391; the authors' ``einsteinxia/SFM``).

The loss depends on the synthetic features ``Z`` (N, D) only through their per-class sums, so
one forward+backward is **three launches**:

1. :func:`class_sums` -- a deterministic segmented reduction of ``Z`` into the **sums buffer**
   (C, W) float32: class sums in columns 0..D-1, row counts in column D, rows padded to a
   width W that is a multiple of 16 elements (``fastsfm.ops.sums_width``) so that every row
   starts 64-byte aligned.  Rows are visited in class order through a permutation (``PERM``;
   not read for class-contiguous rows) and the class boundaries ``OFFS`` (C+1,).  The work is
   a table of **items** (:func:`segment_items`, built once per labels tensor): an item is a run
   of up to ``GROUP`` consecutive classes whose rows one program reads, or one slice of a
   heavy class (the load-balanced form for skewed counts).  Program ``(j, i)`` -- column block
   fastest, so resident programs read whole rows -- sums item ``i`` over column block ``j`` in
   one software-pipelined row loop (``tl.range(..., num_stages)``: cp.async copies keep several
   row tiles in flight whatever ptxas does with registers).  With ``GROUP > 1`` a tile's rows
   are added to their classes by a one-hot matrix product on the tensor cores (exact: the
   one-hot operand is 0/1 and accumulation is float32; float32 features use the 3xTF32 split);
   with ``GROUP == 1`` (many rows per class) by plain float32 adds.  Slices of a heavy class
   write partial sums to a carry buffer; the last slice to finish (an integer arrival counter)
   adds them in slice order and resets the counter.  No float atomics: every sum has a fixed
   order, so results are bitwise reproducible.  ``ACCUMULATE`` adds to the buffer (chunked
   steps).  Traffic: N*D*s bytes read (s: bytes per element), plus 8*N of ``PERM``/sorted labels.
2. :func:`flow_epilogue` -- **one launch** over (column block, class block) tiles of the class
   means ``t = S / n``.  Each tile writes partial sums of the loss (below) to a workspace, then
   takes an integer ticket; the last tile reduces all partials in a fixed order, writes the
   loss and the per-column vector ``V`` and two scalars from which the backward rebuilds
   ``G/n`` (``G = dL/dt``), and resets the counter (graph-safe: the counter is zero between calls).
3. :func:`backward_rows` -- ``dL/dz_i = g * (G/n)[y_i]`` in the features' dtype, over the same
   items as the sums: a ``GROUP == 1`` program computes its class's ``G/n`` row once and writes
   it to all the class's rows; a ``GROUP > 1`` program gathers each row's class row (few rows
   per class, so the gathers are about C*D in total).  Writes N*D*s bytes.

**Shifted partial sums.**  With ``s`` the mean of the real centres (a constant), the tiles
accumulate ``u_c = t_c - s``, whose magnitudes are those of the centred means: the expansions
of ``<a, b>`` and ``|b|^2`` below then lose no float32 digits to cancellation (unshifted, the
loss error was ~1e3 times larger in float32).  Notation (``k`` the non-target divisor,
``inv_k = 1/k``, ``gam = 1 + inv_k``, ``beta = (C - 1) inv_k - 1``; ``a = nu - mu`` the real flow,
``A = sum_c a_c``; ``U = sum_c u_c``; tile partials ``P1``, ``P2``)::

    flow:      b_c = q - gam u_c,  q = U inv_k + beta s        (b: the synthetic flow)
               <a, b> = <A, q> - gam P1,  P1 = sum_c <a_c, u_c>
               |b|^2 = C |q|^2 - 2 gam <q, U> + gam^2 P2,  P2 = sum_c |u_c|^2
               L = 1 - <a, b> / (max(|a|, eps) max(|b|, eps))   (torch's cosine)
               G_c = V + alpha1 a_c + alpha2 u_c   with  w = <a, b> / |b|^2, den = the denominator,
               V = -inv_k (A - w (C q - gam U)) / den - gam w q / den, alpha1 = gam / den, alpha2 = gam^2 w / den
    decouple:  e_c = U inv_k - v_c,  v_c = u_c inv_k + h_c,  h_c = nu_c - s (C - 1) inv_k
               L = alpha/(CD) P1 + (1 - alpha)/(CD) (C |U|^2 inv_k^2 - 2 inv_k <U, U inv_k - C beta s> + P2)
               with P1 = sum_c |t_c - mu_c|^2, P2 = sum_c |v_c|^2
               G_c = V + alpha1 (t_c - mu_c) + alpha2 v_c,  V = alpha2 (U (C - 2) inv_k + C beta s),
               alpha1 = 2 alpha/(CD), alpha2 = 2 (1 - alpha) inv_k/(CD)

Every launch goes through :class:`Launcher`: the first call of a specialisation goes through
Triton's JIT (binder, cache, compile); later calls with the same key launch the cached
compiled kernel directly (the binder alone costs several microseconds per launch).  The key
holds everything Triton specialises on (dtypes, pointer alignment, integer values).

Only ``@triton.jit`` kernels and thin launchers live here: no autograd, no validation
(callers validate), no imports of the rest of fastsfm.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.driver import driver

__all__ = [
    "class_sums",
    "flow_epilogue",
    "backward_rows",
    "segment_items",
    "Tiles",
    "tiles_for",
    "epilogue_blocks",
    "workspace_size",
    "interpreter_active",
    "Launcher",
    "OBJECTIVES",
    "MIN_PROGRAMS",
    "ITEM_FIELDS",
]

OBJECTIVES = {"flow": 0, "decouple": 1}
MIN_PROGRAMS = 264
"""Programs a launch aims for at least: two per SM of an H100 (132 SMs)."""
_TARGET_PROGRAMS = 528
"""Programs the segmented reduction aims for: four per SM of an H100."""
ITEM_FIELDS = 5
"""Columns of the item table: first class, end class, slice index, slices, first carry slot (-1: none)."""
_COEFS = 4
"""Workspace scalars the backward reads: alpha1, alpha2, and two spare."""
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once: triton itself reads it at import


def interpreter_active() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return _INTERPRETER


# --------------------------------------------------------------------------------------------
# the segmented reduction


@triton.jit
def _item_rows(ITEMS, OFFS, item):
    """``(c0, c1, lo, hi, part, parts, slot)`` of one item: classes [c0, c1), sorted rows [lo, hi)."""
    base = ITEMS + item * 5
    c0 = tl.load(base)
    c1 = tl.load(base + 1)
    part = tl.load(base + 2)
    parts = tl.load(base + 3)
    slot = tl.load(base + 4)
    start = tl.load(OFFS + c0)
    end = tl.load(OFFS + c1)
    per = tl.cdiv(end - start, parts)
    lo = start + part * per
    hi = tl.minimum(lo + per, end)
    return c0, c1, lo, hi, part, parts, slot


@triton.jit
def _sorted_rows(PERM, pos, rmask, CONTIGUOUS: tl.constexpr):
    """Row indices (int64) of class-order positions ``pos``: themselves, or ``PERM[pos]``."""
    if CONTIGUOUS:
        return pos.to(tl.int64)
    return tl.load(PERM + pos, mask=rmask, other=0).to(tl.int64)


@triton.jit
def _class_sums_kernel(
    # data
    Z,  # (N, D) features, float32 / bfloat16 / float16, any strides
    PERM,  # (N,) int32: rows in class order (not read when CONTIGUOUS)
    SORTED,  # (N,) int32: the class of each position of that order (read when GROUP > 1)
    OFFS,  # (C + 1,) int32: class boundaries in that order
    ITEMS,  # (P, 5) int32: the work items
    OUT,  # (C, W) float32 sums buffer; column D: row counts
    CARRY,  # (SLOTS, W) float32: partial sums of heavy-class slices
    COUNTER,  # (SLOTS * NUM_CB,) int32, zero between calls: slices finished per (heavy class, column block)
    # shapes
    D,
    W,
    NUM_CB,
    # strides
    stride_zr,
    stride_zc,
    # constants
    CONTIGUOUS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (j, i): float32 sums of item ``i``'s rows over column block ``j``."""
    j = tl.program_id(0)
    c0, c1, lo, hi, part, parts, slot = _item_rows(ITEMS, OFFS, tl.program_id(1))
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    if GROUP == 1:
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    else:
        acc = tl.zeros((GROUP, BLOCK_D), dtype=tl.float32)
    for r0 in tl.range(lo, hi, BLOCK_R, num_stages=STAGES):
        pos = r0 + tl.arange(0, BLOCK_R)
        rmask = pos < hi
        rows = _sorted_rows(PERM, pos, rmask, CONTIGUOUS)
        x = tl.load(Z + rows[:, None] * stride_zr + cols[None, :] * stride_zc, mask=rmask[:, None] & dmask[None, :])
        x = tl.where(rmask[:, None] & dmask[None, :], x, 0.0)
        if GROUP == 1:
            acc += x.to(tl.float32)
        else:
            local = tl.load(SORTED + pos, mask=rmask, other=-1) - c0
            if UPCAST:  # the interpreter's tl.dot is wrong on 16-bit operands (Triton 3.8)
                x = x.to(tl.float32)
            onehot = (tl.arange(0, GROUP)[:, None] == local[None, :]).to(x.dtype)
            if x.dtype == tl.float32:
                acc = tl.dot(onehot, x, acc, input_precision="tf32x3")
            else:
                acc = tl.dot(onehot, x, acc)
    if GROUP == 1:
        sums = tl.sum(acc, axis=0)[None, :]
    else:
        sums = acc
    g = tl.arange(0, GROUP)
    if parts == 1:  # whole classes c0 .. c1-1: rows g of the accumulator
        cls = c0 + g
        gmask = cls < c1
        mask = gmask[:, None] & dmask[None, :]
        ptrs = OUT + cls.to(tl.int64)[:, None] * W + cols[None, :]
        counts = (tl.load(OFFS + cls + 1, mask=gmask, other=0) - tl.load(OFFS + cls, mask=gmask, other=0)).to(
            tl.float32
        )
        if ACCUMULATE:
            sums += tl.load(ptrs, mask=mask, other=0.0)
            counts += tl.load(OUT + cls.to(tl.int64) * W + D, mask=gmask, other=0.0)
        tl.store(ptrs, sums, mask=mask)
        if j == 0:
            tl.store(OUT + cls.to(tl.int64) * W + D, counts, mask=gmask)
    else:  # slice `part` of heavy class c0: carry it, and the last slice to finish adds them all
        row0 = (g == 0)[:, None] & dmask[None, :]
        tl.store(CARRY + (slot + part).to(tl.int64) * W + g[:, None] * 0 + cols[None, :], sums, mask=row0)
        tl.debug_barrier()  # every thread's carry store before the ticket
        ticket = tl.atomic_add(COUNTER + slot * NUM_CB + j, 1, sem="acq_rel")
        if ticket == parts - 1:
            total = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for p in range(0, parts):
                total += tl.load(
                    CARRY + (slot + p).to(tl.int64) * W + cols, mask=dmask, other=0.0, cache_modifier=".cg"
                )
            ptrs = OUT + c0.to(tl.int64) * W + cols
            count = (tl.load(OFFS + c0 + 1) - tl.load(OFFS + c0)).to(tl.float32)
            if ACCUMULATE:
                total += tl.load(ptrs, mask=dmask, other=0.0)
                count += tl.load(OUT + c0.to(tl.int64) * W + D)
            tl.store(ptrs, total, mask=dmask)
            if j == 0:
                tl.store(OUT + c0.to(tl.int64) * W + D, count)
            tl.atomic_xchg(COUNTER + slot * NUM_CB + j, 0)


# --------------------------------------------------------------------------------------------
# the epilogue: partial sums per tile, the last tile reduces them


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
    WORK,  # float32: from WORK + work_at PCOL (RB, W) | U, V (W) | PSC (2, TILES) | COEF (4); loss at WORK + loss_at
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
):
    """Program (j, rb): partials of tile (class block rb, column block j); the last program the rest."""
    j = tl.program_id(0)
    rb = tl.program_id(1)
    num_cb = tl.num_programs(0)
    tiles = num_cb * NUM_RB
    inv_k = tl.cast(inv_k, tl.float32)
    alpha = tl.cast(alpha, tl.float32)
    eps = tl.cast(eps, tl.float32)
    pcol = WORK + work_at
    u_vec = pcol + NUM_RB * W
    v_vec = u_vec + W
    psc = v_vec + W
    coef = psc + 2 * tiles
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
        for d0 in range(0, D, BLOCK_D):  # U = sum of the class blocks' column sums, in block order
            dc = d0 + tl.arange(0, BLOCK_D)
            dm = dc < D
            tot = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for r in range(0, NUM_RB):
                tot += tl.load(pcol + r * W + dc, mask=dm, other=0.0, cache_modifier=".cg")
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


# --------------------------------------------------------------------------------------------
# the backward: G/n rebuilt from the sums and the workspace, written to every row


@triton.jit
def _grad_tile(
    SUMS, FLOW, CENTERS, NONTARGET, cls, cmask, cols, dmask, s, vv, alpha1, alpha2, inv_k, C, D, W, OBJECTIVE
):
    """``G/n`` (R, BLOCK_D) for the classes ``cls`` (R,) of a tile (0 where masked)."""
    mask = cmask[:, None] & dmask[None, :]
    row = SUMS + cls.to(tl.int64)[:, None] * W
    count = tl.load(SUMS + cls.to(tl.int64) * W + D, mask=cmask, other=1.0)
    t = tl.load(row + cols[None, :], mask=mask, other=0.0) / count[:, None]
    const = cls.to(tl.int64)[:, None] * D + cols[None, :]
    if OBJECTIVE == 0:
        a = tl.load(FLOW + const, mask=mask, other=0.0)
        g = vv[None, :] + alpha1 * a + alpha2 * (t - s[None, :])
    else:
        mu = tl.load(CENTERS + const, mask=mask, other=0.0)
        nu = tl.load(NONTARGET + const, mask=mask, other=0.0)
        v = (t - s[None, :]) * inv_k + nu - s[None, :] * ((C - 1) * inv_k)
        g = vv[None, :] + alpha1 * (t - mu) + alpha2 * v
    return g / count[:, None]


@triton.jit
def _backward_kernel(
    # data
    SUMS,  # (C, W) float32 sums buffer (after the all-reduce, if any)
    FLOW,
    CENTERS,
    NONTARGET,
    SHIFT,
    WORK,  # the epilogue's workspace from WORK + work_at (V and the coefficients)
    PERM,
    SORTED,
    OFFS,
    ITEMS,
    GOUT,  # (1,) float32 upstream gradient of the loss
    DZ,  # (N, D) out, the features' dtype, contiguous
    # shapes
    C,
    D,
    W,
    NUM_RB,
    NUM_TILES,
    work_at,
    # scalars
    inv_k,
    # constants
    OBJECTIVE: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (j, i): ``DZ[row, cols] = GOUT * (G/n)[class of row, cols]`` for item ``i``'s rows."""
    j = tl.program_id(0)
    c0, c1, lo, hi, part, parts, slot = _item_rows(ITEMS, OFFS, tl.program_id(1))
    inv_k = tl.cast(inv_k, tl.float32)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    v_vec = WORK + work_at + (NUM_RB + 1) * W
    coef = v_vec + W + 2 * NUM_TILES
    vv = tl.load(v_vec + cols, mask=dmask, other=0.0)
    s = tl.load(SHIFT + cols, mask=dmask, other=0.0)
    alpha1 = tl.load(coef)
    alpha2 = tl.load(coef + 1)
    gout = tl.load(GOUT).to(tl.float32)
    if GROUP == 1:  # one class: its G/n row once, for every row of the class
        one = tl.arange(0, 1)
        g1 = _grad_tile(
            SUMS, FLOW, CENTERS, NONTARGET, c0 + one, one == 0, cols, dmask, s, vv, alpha1, alpha2, inv_k, C, D, W,
            OBJECTIVE,
        )  # fmt: skip
        g1 = tl.broadcast_to(g1 * gout, (BLOCK_R, BLOCK_D))
    for r0 in tl.range(lo, hi, BLOCK_R):
        pos = r0 + tl.arange(0, BLOCK_R)
        rmask = pos < hi
        rows = _sorted_rows(PERM, pos, rmask, CONTIGUOUS)
        if GROUP == 1:
            tile = g1
        else:  # several classes of few rows: each row gathers its class's row
            cls = tl.load(SORTED + pos, mask=rmask, other=0)
            tile = _grad_tile(
                SUMS, FLOW, CENTERS, NONTARGET, cls, rmask, cols, dmask, s, vv, alpha1, alpha2, inv_k, C, D, W,
                OBJECTIVE,
            )  # fmt: skip
            tile = tile * gout
        tl.store(
            DZ + rows[:, None] * D + cols[None, :], tile.to(DZ.dtype.element_ty), mask=rmask[:, None] & dmask[None, :]
        )


# --------------------------------------------------------------------------------------------
# host side: tile table, work items, launches


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of ints.  The launchers' host arithmetic avoids ``triton.cdiv`` and
    ``triton.next_power_of_2``: in Triton 3.8 they are ``constexpr_function`` wrappers that unwrap
    every argument in Python (about 1 us per call)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` >= 1."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Tiles:
    """Tile shape of the segmented reduction and the backward, from a fixed table (no run-time
    autotuning: a timing-dependent choice would change the float sums between runs).

    ``group``: classes per item (1, or 16 for the one-hot product); ``block_r`` x ``block_d``:
    the row tile; ``stages``: software-pipeline depth of the row loop; ``rows``: target rows per
    item (items are cut so that about :data:`_TARGET_PROGRAMS` programs run).
    """

    group: int
    block_r: int
    block_d: int
    stages: int
    rows: int

    def column_blocks(self, d: int) -> int:
        return _cdiv(d, self.block_d)


BACKWARD_COLUMNS = 64
"""Column block of the backward (narrower than the sums': its tiles gather up to three float32 rows)."""
GROUP_BELOW = 64
"""Mean rows per class below which classes are grouped (one-hot product); above, one class per item."""


@functools.lru_cache(maxsize=256)
def tiles_for(n: int, c: int, d: int) -> Tiles:
    """The :class:`Tiles` of N rows, C classes, D features (the table, keyed on N/C and D)."""
    group = 16 if n < GROUP_BELOW * c else 1
    if _INTERPRETER:  # small tiles, so that test shapes span several of them
        block_r, block_d, stages = 16, 32, 1
    else:
        block_r, block_d, stages = 32, max(16, min(128, _next_pow2(d))), 3
    items = max(1, _cdiv(_TARGET_PROGRAMS, _cdiv(d, block_d)))
    return Tiles(group, block_r, block_d, stages, max(block_r, _cdiv(n, items)))


def segment_items(counts: list[int] | None, n: int, c: int, d: int, max_slots: int | None = None) -> tuple[list, int]:
    """The work items of the segmented reduction and the backward: ``(rows, slots)``.

    Each row is ``(c0, c1, part, parts, slot)``: classes [c0, c1) whole (``parts == 1``), or
    slice ``part`` of ``parts`` of class c0 whose partial sums go to carry slot ``slot + part``.
    With ``counts`` (the rows per class, known on the host) consecutive classes are grouped up
    to :attr:`Tiles.rows` rows and :attr:`Tiles.group` classes, and a class of more than twice
    that many rows is sliced (at most ``max_slots`` slices in all, default max(C/2, 16): the
    carry rows cost at most half the sums buffer; a class beyond the budget gets fewer, longer
    slices) -- every program then reads about the same number of rows however skewed the counts.  Without
    counts (no host synchronisation), groups of a fixed number of classes from N/C.
    """
    tiles = tiles_for(n, c, d)
    if counts is None:
        size = max(1, min(tiles.group, tiles.rows * c // max(n, 1)))
        return [(a, min(a + size, c), 0, 1, -1) for a in range(0, c, size)], 0
    budget = max(c // 2, 16) if max_slots is None else max_slots
    items, slots, i = [], 0, 0
    while i < c:
        parts = min(_cdiv(counts[i], tiles.rows), budget - slots)
        if counts[i] > 2 * tiles.rows and parts >= 2:
            items += [(i, i + 1, p, parts, slots) for p in range(parts)]
            slots, i = slots + parts, i + 1
            continue
        end, rows = i + 1, counts[i]
        while end < c and end - i < tiles.group and rows + counts[end] <= tiles.rows:
            rows, end = rows + counts[end], end + 1
        items.append((i, end, 0, 1, -1))
        i = end
    return items, slots


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
    """float32 elements of the epilogue's workspace: PCOL (RB, W), U, V (W), the tile partials,
    the coefficients, and the loss's element (:func:`flow_epilogue`)."""
    block_c, block_d = epilogue_blocks(c, d)
    rb, cb = _cdiv(c, block_c), _cdiv(d, block_d)
    return (rb + 2) * w + 2 * rb * cb + _COEFS + 1


class Launcher:
    """A ``@triton.jit`` kernel launched through its cached compiled specialisations.

    ``launcher(key, grid, args, constexprs, num_warps)``: the first call of a ``key`` goes through
    Triton's JIT (``kernel[grid](*args, **constexprs, num_warps=...)``: binder, cache look-up,
    compile) and keeps the
    compiled kernel it returns; later calls with the same key call the compiled kernel's
    launcher directly with the same argument list Triton's JIT passes (every parameter, in
    order), skipping the binder.  The key must hold everything Triton specialises on that can
    vary between calls -- the device, tensor dtypes, whether a pointer is 16-byte aligned,
    integer arguments (their value decides ``== 1`` and divisibility by 16) -- the callers pass
    them (:func:`fastsfm.kernels.class_sums` and friends).  Under the interpreter, while Dynamo
    traces (``torch.compile`` captures the plain JIT launch), and on Triton versions whose
    compiled kernels lack the launcher fields, every call goes through the JIT.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.cache: dict[tuple, object] = {}

    @property
    def fn(self):
        return self.kernel

    def __call__(self, key: tuple, grid: tuple[int, int], args: tuple, constexprs: dict, num_warps: int = 4) -> None:
        if torch.compiler.is_compiling():  # Dynamo captures a plain JIT launch (its Triton support)
            self.kernel[grid](*args, **constexprs, num_warps=num_warps)
            return
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self.kernel[grid](*args, **constexprs, num_warps=num_warps)
            if not _INTERPRETER and all(hasattr(compiled, f) for f in ("run", "function", "packed_metadata")):
                self.cache[key] = (compiled, tuple(constexprs.values()))
            return
        kernel, values = compiled
        active = driver.active
        stream = active.get_current_stream(active.get_current_device())
        enter = knobs.runtime.launch_enter_hook
        hooked = enter is not None and getattr(enter, "calls", True)  # Triton 3.8: an empty HookChain
        meta = kernel.launch_metadata(grid, stream, *args, *values) if hooked else None
        kernel.run(
            grid[0],
            grid[1],
            1,
            stream,
            kernel.function,
            kernel.packed_metadata,
            meta,
            enter,
            knobs.runtime.launch_exit_hook,
            *args,
            *values,
        )


_sums_launcher = Launcher(_class_sums_kernel)
_epilogue_launcher = Launcher(_epilogue_kernel)
_backward_launcher = Launcher(_backward_kernel)


def _aligned(t: torch.Tensor) -> bool:
    """Whether Triton would take ``t``'s pointer as 16-byte aligned (a launch-cache key; not read
    while Dynamo traces, where :class:`Launcher` goes through the JIT)."""
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def class_sums(
    z: torch.Tensor,
    perm: torch.Tensor,
    sorted_labels: torch.Tensor,
    offsets: torch.Tensor,
    items: torch.Tensor,
    out: torch.Tensor,
    carry: torch.Tensor,
    counter: torch.Tensor,
    tiles: Tiles,
    *,
    contiguous: bool,
    accumulate: bool = False,
) -> None:
    """Per-class float32 sums of ``z`` (N, D) into ``out`` (C, W) (column D: counts).

    ``perm`` (N,) int32 lists the rows in class order (not read when ``contiguous``),
    ``sorted_labels`` (N,) int32 their classes, ``offsets`` (C+1,) int32 the class boundaries,
    ``items`` (P, 5) int32 the work (:func:`segment_items`, made with ``tiles``), ``carry``
    (SLOTS, W) float32 room for heavy-class slices and ``counter`` (SLOTS * column blocks,)
    int32 zeros.  ``out`` must be contiguous float32 rows of ``W > D`` (a multiple of 16; rows
    beyond C, the fused loss's workspace, are not touched);
    ``accumulate`` adds to it.  Columns beyond D are never read or written.
    """
    d = z.shape[1]
    w = out.shape[1]
    num_cb = tiles.column_blocks(d)
    grid = (num_cb, items.shape[0])
    args = (z, perm, sorted_labels, offsets, items, out, carry, counter, d, w, num_cb, z.stride(0), z.stride(1))
    constexprs = {
        "CONTIGUOUS": contiguous,
        "ACCUMULATE": accumulate,
        "GROUP": tiles.group,
        "BLOCK_R": tiles.block_r,
        "BLOCK_D": tiles.block_d,
        "STAGES": tiles.stages,
        "UPCAST": _INTERPRETER,
    }
    warps = 8 if z.element_size() == 4 else 4  # float32 tiles: half the registers per thread
    key = (z.device.index, z.dtype, _aligned(z), _aligned(perm), grid) + args[8:] + tuple(constexprs.values())
    _sums_launcher(key, grid, args, constexprs, warps)


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
    block_c, block_d = epilogue_blocks(c, d)
    rb, cb = _cdiv(c, block_c), _cdiv(d, block_d)
    grid = (cb, rb)
    loss_at = work.numel() - 1
    args = (sums, flow, flow_sum, flow_sq, centers, nontarget, shift, work, counter, c, d, w, rb, work_at, loss_at)
    args += (inv_k, alpha, eps)
    constexprs = {
        "OBJECTIVE": OBJECTIVES[objective],
        "BLOCK_C": block_c,
        "BLOCK_D": block_d,
        "BLOCK_P": min(1024, _next_pow2(rb * cb)),
    }
    key = (sums.device.index, grid, c, d, w, work_at, loss_at) + tuple(constexprs.values())
    _epilogue_launcher(key, grid, args, constexprs)


def backward_rows(
    sums: torch.Tensor,
    work: torch.Tensor,
    work_at: int,
    flow: torch.Tensor,
    centers: torch.Tensor,
    nontarget: torch.Tensor,
    shift: torch.Tensor,
    perm: torch.Tensor,
    sorted_labels: torch.Tensor,
    offsets: torch.Tensor,
    items: torch.Tensor,
    grad_out: torch.Tensor,
    tiles: Tiles,
    n: int,
    dtype: torch.dtype,
    *,
    objective: str,
    inv_k: float,
    contiguous: bool,
) -> torch.Tensor:
    """``dL/dz`` (N, D) in ``dtype``, contiguous: row i is ``grad_out * (G/n)[y_i]``, ``G/n`` rebuilt
    from the sums buffer and the workspace of :func:`flow_epilogue`; the items and label order
    of the rows (:func:`class_sums`'s arguments); ``grad_out`` a 1-element float32 tensor."""
    c, d = flow.shape
    w = sums.shape[-1]
    block_c, block_d = epilogue_blocks(c, d)
    rb, cb = _cdiv(c, block_c), _cdiv(d, block_d)
    dz = torch.empty(n, d, device=sums.device, dtype=dtype)
    block_d = min(tiles.block_d, BACKWARD_COLUMNS)
    grid = (_cdiv(d, block_d), items.shape[0])
    args = (sums, flow, centers, nontarget, shift, work, perm, sorted_labels, offsets, items, grad_out, dz)
    args += (c, d, w, rb, rb * cb, work_at, inv_k)
    constexprs = {
        "OBJECTIVE": OBJECTIVES[objective],
        "CONTIGUOUS": contiguous,
        "GROUP": tiles.group,
        "BLOCK_R": tiles.block_r,
        "BLOCK_D": block_d,
    }
    warps = 8 if dz.element_size() == 4 else 4
    key = (
        (sums.device.index, dtype, _aligned(perm), _aligned(grad_out), grid) + args[12:18] + tuple(constexprs.values())
    )
    _backward_launcher(key, grid, args, constexprs, warps)
    return dz
