"""The segmented class-sum reduction: its work items, tile table, kernel and launcher.

See :mod:`fastsfm.kernels` for the algorithm; this module holds step 1 (and the item helpers the
backward shares).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..launch import _INTERPRETER, Launcher, LaunchSpec, _aligned, _cdiv, _next_pow2

__all__ = ["class_sums", "segment_items", "Tiles", "tiles_for", "ITEM_FIELDS", "GROUP_BELOW"]

_TARGET_PROGRAMS = 528
"""Programs the segmented reduction aims for: four per SM of an H100."""
ITEM_FIELDS = 5
"""Columns of the item table: first class, end class, slice index, slices, first carry slot (-1: none)."""


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


class Tiles(NamedTuple):
    """Tile shape of the segmented reduction and the backward, from a fixed table (no run-time
    autotuning: a timing-dependent choice would change the float sums between runs).  A tuple, so
    the launchers' cached specs hash it at C speed.

    ``group``: classes per item (1, or 16 for the one-hot product); ``block_r`` x ``block_d``:
    the row tile; ``stages``: software-pipeline depth of the row loop; ``rows``: target rows per
    item (items are cut so that about :data:`_TARGET_PROGRAMS` programs run).
    """

    group: int
    block_r: int
    block_d: int
    stages: int
    rows: int


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


def segment_items(counts: list[int] | None, n: int, c: int, d: int) -> tuple[list, int]:
    """The work items of the segmented reduction and the backward: ``(rows, slots)``.

    Each row is ``(c0, c1, part, parts, slot)``: classes [c0, c1) whole (``parts == 1``), or
    slice ``part`` of ``parts`` of class c0 whose partial sums go to carry slot ``slot + part``.
    With ``counts`` (the rows per class, known on the host) consecutive classes are grouped up
    to :attr:`Tiles.rows` rows and :attr:`Tiles.group` classes, and a class of more than twice
    that many rows is sliced (at most max(C/2, 16) slices in all: the carry rows cost at most
    half the sums buffer; a class beyond the budget gets fewer, longer slices) -- every program
    then reads about the same number of rows however skewed the counts.  Without counts (no
    host synchronisation), groups of a fixed number of classes from N/C.
    """
    tiles = tiles_for(n, c, d)
    if counts is None:
        size = max(1, min(tiles.group, tiles.rows * c // max(n, 1)))
        return [(a, min(a + size, c), 0, 1, -1) for a in range(0, c, size)], 0
    budget = max(c // 2, 16)
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


_sums_launcher = Launcher(_class_sums_kernel)


@functools.lru_cache(maxsize=256)
def _sums_spec(
    elem: int, d: int, stride_c: int, num_items: int, tiles: Tiles, contiguous: bool, accumulate: bool
) -> LaunchSpec:
    """The launch of :func:`class_sums` for features of ``elem``-byte elements, ``d`` columns of
    stride ``stride_c``, over ``num_items`` items (``grid[0]``: the column blocks)."""
    block_d = tiles.block_d
    if elem == 4 and (d % 16 or stride_c != 1):  # float32 rows without 16-byte vectors:
        block_d = min(block_d, 64)  # one address per element; narrower tiles keep them in registers
    constexprs = {
        "CONTIGUOUS": contiguous,
        "ACCUMULATE": accumulate,
        "GROUP": tiles.group,
        "BLOCK_R": tiles.block_r,
        "BLOCK_D": block_d,
        "STAGES": tiles.stages,
        "UPCAST": _INTERPRETER,
    }
    warps = 8 if elem == 4 else 4  # float32 tiles: half the registers per thread
    return LaunchSpec((_cdiv(d, block_d), num_items), constexprs, warps)


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
    (SLOTS, W) float32 room for heavy-class slices and ``counter`` int32 zeros, one per heavy-class
    slot and column block (enough for 16-column blocks).  ``out`` must be contiguous float32 rows
    of ``W > D`` (a multiple of 16; rows beyond C, the fused loss's workspace, are not touched);
    ``accumulate`` adds to it.  Columns beyond D are never read or written.
    """
    d = z.shape[1]
    w = out.shape[1]
    stride_r, stride_c = z.stride()
    spec = _sums_spec(z.element_size(), d, stride_c, items.shape[0], tiles, contiguous, accumulate)
    args = (z, perm, sorted_labels, offsets, items, out, carry, counter, d, w, spec.grid[0], stride_r, stride_c)
    key = (spec, z.device.index, z.dtype, _aligned(z), _aligned(perm), w, stride_r)  # d, stride_c: in spec
    _sums_launcher(key, spec, args)
