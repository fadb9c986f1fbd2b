"""Fused Triton kernels of the SFM flow-cosine loss (arXiv 2602.05391; the authors' ``einsteinxia/SFM``).

The loss depends on the synthetic features ``Z`` (N, D) only through their per-class sums,
so one forward+backward is a segmented reduction, a small (C, D) epilogue and a broadcast:

1. :func:`class_sums` -- the segmented reduction.  Rows are visited in class order through a
   permutation (identity for class-contiguous rows: the ``CONTIGUOUS`` fast path skips the
   gather) and ``OFFS`` (C+1,) class boundaries.  Program ``(c, j, s)`` sums split ``s`` of
   class ``c``'s rows over columns block ``j`` in float32, in a fixed order (no atomics: the
   result is bitwise reproducible).  Output: the **sums buffer** (SPLIT, C, W), float32, whose
   column D holds the row counts (that packing lets a process group all-reduce sums and counts
   in one call) and whose rows the caller pads to a width W that is a multiple of 16 elements
   (``fastsfm.ops.sums_width``), so that every row starts 64-byte aligned and the kernels
   that read or write the buffer use 16-byte vector accesses.  ``ACCUMULATE`` adds to the
   buffer (chunked distillation steps).  Traffic: reads N*D*s bytes of features (s: bytes per
   element; plus N*8 of ``PERM`` when permuted), writes 4*SPLIT*C*W.  Grid: C x cdiv(D, 128)
   x SPLIT programs (6,000 at C = 1000, D = 768).
2. :func:`flow_epilogue` -- three launches over a 2-D grid of (class block, column block) tiles
   of the class means ``t = S / n``, sized so that there are at least :data:`MIN_PROGRAMS`
   programs (two per SM of an H100) whenever C*D allows (384 at C = 1000, D = 768):

   * ``_epi_colsum_kernel``: per tile, the column sums of its classes' means -> ``TPART``
     (RB, W), RB the number of class blocks.  Reads 4*SPLIT*C*W, writes 4*RB*W.
   * ``_epi_partials_kernel``: per tile, ``T = sum_c t_c`` for its columns (a fixed-order sum
     of the RB rows of ``TPART``, from L2), then two partial scalars of the loss -> ``PART``
     (2, RB*CB); tiles of the first class block also write ``T`` -> ``TSUM`` (W,).  Reads
     4*SPLIT*C*W + 4*C*D (flow; decouple: 8*C*D) + 4*RB*RB*D (L2), writes 8*RB*CB.
   * ``_epi_grad_kernel``: per tile, the loss scalars from all partials (a fixed-order
     reduction of ``PART``, from L2), then ``G/n`` for its tile, ``G = dL/dt`` computed
     analytically, written **over split 0's sums** (no (C, D) allocation); tile (0, 0) writes
     the loss.  Reads 4*SPLIT*C*W + 4*C*D (decouple: 8*C*D) + 8*RB*CB per program (L2),
     writes 4*C*D.

   Extra memory beyond the sums buffer: 4*(RB*W + W + 2*RB*CB + 1) bytes, one workspace.  Every
   reduction has a fixed order, so the loss and ``G`` are deterministic.
3. :func:`broadcast_grad` -- ``dL/dz_i = g * (G/n)[y_i]`` in the input dtype.  Reads N*8 of
   labels and gathers rows of ``G/n`` (4*C*D from HBM, the rest from L2), writes N*D*s.  Grid:
   cdiv(N, 32) x cdiv(D, 128) (1,878 programs at N = 10,000, D = 768).

The floor of the whole loss is one read and one write of N*D*s bytes; everything else is
O(C*D) and mostly served from L2.

Notation of the epilogue (``k`` the non-target divisor, ``inv_k = 1/k``):
``b_c = (T - t_c) / k - t_c`` is the synthetic flow and ``a = nu - mu`` the constant real
flow (``FLOW``), with ``sum_c a_c`` (``FLOW_SUM``) and ``|a|^2`` (``FLOW_SQ``) precomputed.

* ``flow``: ``L = 1 - <a, b> / (max(|a|, eps) max(|b|, eps))`` (torch's cosine);
  ``dL/db = -(a - w b) / (A B)`` with ``w = <a, b>/|b|^2``, and
  ``G_j = inv_k sum_c dL/db_c - (1 + inv_k) dL/db_j``.
* ``decouple``: ``L = alpha/(CD) |t - mu|^2 + (1-alpha)/(CD) |e|^2`` with
  ``e = (T - t) / k - nu``; ``G_j = 2 alpha/(CD) (t_j - mu_j) + 2 (1-alpha)/(CD) inv_k (sum_c e_c - e_j)``.

Every launcher runs its kernels under ``torch.cuda.device(<its tensors' device>)``: Triton
launches on the *current* device, which need not be the tensors'.  Scalar arguments are cast
to float32 inside the kernels (Inductor passes Python floats as float64 when it traces them).

Only ``@triton.jit`` kernels and thin launchers live here: no autograd, no validation
(callers validate), no imports of the rest of fastsfm.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "class_sums",
    "flow_epilogue",
    "broadcast_grad",
    "default_split",
    "epilogue_blocks",
    "interpreter_active",
    "OBJECTIVES",
    "MIN_PROGRAMS",
]

OBJECTIVES = {"flow": 0, "decouple": 1}
MIN_PROGRAMS = 264
"""Programs an epilogue launch aims for: two per SM of an H100 (132 SMs)."""
_SPLIT_PROGRAMS = 528
"""Programs the segmented reduction aims for when there are few classes: four per SM of an H100."""
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once: triton itself reads it at import


def interpreter_active() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return _INTERPRETER


def _device_of(t: torch.Tensor):
    """The CUDA device guard of ``t``'s device (nothing for CPU tensors, i.e. the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _class_sums_kernel(
    # data
    Z,  # (N, D) features, float32 / bfloat16 / float16, any strides
    PERM,  # (N,) int64: rows in class order (not read when CONTIGUOUS)
    OFFS,  # (C + 1,) int64: class boundaries in that order
    OUT,  # (SPLIT, C, W) float32 sums buffer; column D: row counts
    # shapes
    D,
    # strides
    stride_zr,
    stride_zc,
    stride_os,
    stride_oc,
    # constants
    CONTIGUOUS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (c, j, s): float32 sum of split ``s`` of class ``c``'s rows, columns block ``j``."""
    c = tl.program_id(0)
    j = tl.program_id(1)
    s = tl.program_id(2)
    start = tl.load(OFFS + c)
    end = tl.load(OFFS + c + 1)
    per = tl.cdiv(end - start, SPLIT)
    lo = start + s * per
    hi = tl.minimum(lo + per, end)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        pos = r0 + tl.arange(0, BLOCK_R)
        rmask = pos < hi
        if CONTIGUOUS:
            rows = pos.to(tl.int64)
        else:
            rows = tl.load(PERM + pos, mask=rmask, other=0).to(tl.int64)
        ptrs = Z + rows[:, None] * stride_zr + cols[None, :].to(tl.int64) * stride_zc
        acc += tl.load(ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    out = OUT + s * stride_os + c * stride_oc
    count = tl.maximum(hi - lo, 0).to(tl.float32)
    if ACCUMULATE:
        total += tl.load(out + cols, mask=dmask, other=0.0)
        count += tl.load(out + D)
    tl.store(out + cols, total, mask=dmask)
    if j == 0:
        tl.store(out + D, count)


@triton.jit
def _means_tile(
    SUMS,  # (SPLIT, C, W) float32 sums buffer
    cs,  # (BLOCK_C,) class indices of the tile
    cmask,
    cols,  # (BLOCK_D,) column indices of the tile
    dmask,
    D,
    stride_s,
    stride_c,
    SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(t, n)``: class means (BLOCK_C, BLOCK_D) and counts (BLOCK_C,) from the split sums (0 where masked)."""
    tile = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s in range(SPLIT):
        row = SUMS + s * stride_s + cs * stride_c
        tile += tl.load(row[:, None] + cols[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        count += tl.load(row + D, mask=cmask, other=0.0)
    count = tl.where(cmask, count, 1.0)
    return tile / count[:, None], count


@triton.jit
def _epi_colsum_kernel(
    # data
    SUMS,  # (SPLIT, C, W) float32 sums buffer
    TPART,  # (RB, W) float32 out: column sums of each class block's means
    # shapes
    C,
    D,
    # strides
    stride_s,
    stride_c,
    # constants
    SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (rb, j): ``TPART[rb, cols] = sum_{c in block rb} t_c[cols]``."""
    rb = tl.program_id(0)
    j = tl.program_id(1)
    cs = rb * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cs < C
    dmask = cols < D
    t, _ = _means_tile(SUMS, cs, cmask, cols, dmask, D, stride_s, stride_c, SPLIT, BLOCK_C, BLOCK_D)
    tl.store(TPART + rb * stride_c + cols, tl.sum(t, axis=0), mask=dmask)


@triton.jit
def _column_total(TPART, cols, dmask, NUM_RB, stride_c, BLOCK_D: tl.constexpr):
    """``T[cols] = sum_rb TPART[rb, cols]`` in a fixed order."""
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r in range(0, NUM_RB):
        total += tl.load(TPART + r * stride_c + cols, mask=dmask, other=0.0)
    return total


@triton.jit
def _epi_partials_kernel(
    # data
    SUMS,  # (SPLIT, C, W) float32 sums buffer
    TPART,  # (RB, W) float32 column sums per class block
    TSUM,  # (W,) float32 out: T = sum_c t_c
    FLOW,  # (C, D) float32 a = nu - mu (flow)
    CENTERS,  # (C, D) float32 mu (decouple)
    NONTARGET,  # (C, D) float32 nu (decouple)
    PART,  # (2, RB * CB) float32 out: partial scalars of the loss per tile
    # shapes
    C,
    D,
    NUM_RB,
    NUM_TILES,
    # strides
    stride_s,
    stride_c,
    # scalars
    inv_k,
    # constants
    OBJECTIVE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (rb, j): flow: ``(<a, b>, |b|^2)`` over its tile; decouple: ``(|t - mu|^2, |e|^2)``."""
    rb = tl.program_id(0)
    j = tl.program_id(1)
    inv_k = tl.cast(inv_k, tl.float32)
    cs = rb * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cs < C
    dmask = cols < D
    mask = cmask[:, None] & dmask[None, :]
    tsum = _column_total(TPART, cols, dmask, NUM_RB, stride_c, BLOCK_D)
    if rb == 0:
        tl.store(TSUM + cols, tsum, mask=dmask)
    t, _ = _means_tile(SUMS, cs, cmask, cols, dmask, D, stride_s, stride_c, SPLIT, BLOCK_C, BLOCK_D)
    const = cs[:, None] * D + cols[None, :]
    if OBJECTIVE == 0:
        a = tl.load(FLOW + const, mask=mask, other=0.0)
        b = tl.where(mask, (tsum[None, :] - t) * inv_k - t, 0.0)
        first = tl.sum(tl.sum(a * b, axis=1), axis=0)
        second = tl.sum(tl.sum(b * b, axis=1), axis=0)
    else:
        mu = tl.load(CENTERS + const, mask=mask, other=0.0)
        nu = tl.load(NONTARGET + const, mask=mask, other=0.0)
        diff = tl.where(mask, t - mu, 0.0)
        e = tl.where(mask, (tsum[None, :] - t) * inv_k - nu, 0.0)
        first = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        second = tl.sum(tl.sum(e * e, axis=1), axis=0)
    tile = rb * tl.num_programs(1) + j
    tl.store(PART + tile, first)
    tl.store(PART + NUM_TILES + tile, second)


@triton.jit
def _epi_grad_kernel(
    # data
    SUMS,  # (SPLIT, C, W) float32 sums buffer; split 0's sums are overwritten with G/n
    TSUM,  # (W,) float32 T = sum_c t_c
    FLOW,  # (C, D) float32 a = nu - mu
    FLOW_SUM,  # (D,) float32 sum_c a_c
    FLOW_SQ,  # (1,) float32 |a|^2
    CENTERS,  # (C, D) float32 mu
    NONTARGET,  # (C, D) float32 nu
    CENTERS_SUM,  # (D,) float32 sum_c mu_c
    PART,  # (2, NUM_TILES) float32 partial scalars
    LOSS,  # (1,) float32 out
    # shapes
    C,
    D,
    NUM_TILES,
    # strides
    stride_s,
    stride_c,
    # scalars
    inv_k,
    alpha,
    scale,
    eps,
    # constants
    OBJECTIVE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (rb, j): the loss scalars from all partials, then ``G / n`` for its tile
    (``scale = 1 / (C D)``, the MSE normalisation)."""
    rb = tl.program_id(0)
    j = tl.program_id(1)
    inv_k = tl.cast(inv_k, tl.float32)
    alpha = tl.cast(alpha, tl.float32)
    scale = tl.cast(scale, tl.float32)
    eps = tl.cast(eps, tl.float32)
    first = tl.zeros((BLOCK_P,), dtype=tl.float32)
    second = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, NUM_TILES, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < NUM_TILES
        first += tl.load(PART + p, mask=pmask, other=0.0)
        second += tl.load(PART + NUM_TILES + p, mask=pmask, other=0.0)
    first = tl.sum(first, axis=0)
    second = tl.sum(second, axis=0)
    cs = rb * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cs < C
    dmask = cols < D
    mask = cmask[:, None] & dmask[None, :]
    tsum = tl.load(TSUM + cols, mask=dmask, other=0.0)
    t, count = _means_tile(SUMS, cs, cmask, cols, dmask, D, stride_s, stride_c, SPLIT, BLOCK_C, BLOCK_D)
    const = cs[:, None] * D + cols[None, :]
    if OBJECTIVE == 0:
        norm_b = tl.sqrt(second)
        denom = tl.maximum(tl.sqrt(tl.load(FLOW_SQ)), eps) * tl.maximum(norm_b, eps)
        loss = 1.0 - first / denom
        w = tl.where(norm_b > eps, first / tl.where(second > 0.0, second, 1.0), 0.0)
        bsum = tsum * ((C - 1) * inv_k - 1.0)
        gsum = -(tl.load(FLOW_SUM + cols, mask=dmask, other=0.0) - w * bsum) / denom
        a = tl.load(FLOW + const, mask=mask, other=0.0)
        b = (tsum[None, :] - t) * inv_k - t
        gb = -(a - w * b) / denom
        g = gsum[None, :] * inv_k - (1.0 + inv_k) * gb
    else:
        loss = alpha * first * scale + (1.0 - alpha) * second * scale
        esum = tsum * ((C - 1) * inv_k) - tl.load(CENTERS_SUM + cols, mask=dmask, other=0.0)
        mu = tl.load(CENTERS + const, mask=mask, other=0.0)
        nu = tl.load(NONTARGET + const, mask=mask, other=0.0)
        e = (tsum[None, :] - t) * inv_k - nu
        g = 2.0 * scale * (alpha * (t - mu) + (1.0 - alpha) * inv_k * (esum[None, :] - e))
    # In place over split 0's sums: this program read them (above) and no other touches this tile.
    tl.store(SUMS + cs[:, None] * stride_c + cols[None, :], g / count[:, None], mask=mask)
    if (rb == 0) & (j == 0):
        tl.store(LOSS, loss)


@triton.jit
def _broadcast_kernel(
    # data
    GN,  # (C, D) float32 G/n, row stride stride_gn (a view of the sums buffer)
    Y,  # (N,) int64 labels
    GOUT,  # (1,) float32 upstream gradient of the loss
    DZ,  # (N, D) out, the features' dtype, contiguous
    # shapes
    N,
    D,
    # strides
    stride_gn,
    stride_dz,
    # constants
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``DZ[i, :] = GOUT * GN[Y[i], :]`` cast to DZ's dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    y = tl.load(Y + rows, mask=rmask, other=0).to(tl.int64)
    g = tl.load(GN + y[:, None] * stride_gn + cols[None, :], mask=mask, other=0.0) * tl.load(GOUT).to(tl.float32)
    tl.store(DZ + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :], g.to(DZ.dtype.element_ty), mask=mask)


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of ints.  The launchers' host arithmetic avoids ``triton.cdiv`` and
    ``triton.next_power_of_2``: in Triton 3.8 they are ``constexpr_function`` wrappers that unwrap
    every argument in Python, and a loss step calls them 11 times on its hot path."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` >= 1."""
    return 1 << max(n - 1, 0).bit_length()


def _block_d(d: int, cap: int) -> int:
    return max(16, min(cap, _next_pow2(d)))


def _sizes() -> dict:
    """Block sizes: larger on GPU; small under the interpreter so test shapes span several tiles."""
    if _INTERPRETER:
        return {"rows": 16, "sum_cols": 32, "epi_cols": (16,), "epi_classes": (16,), "partials": 16}
    return {"rows": 32, "sum_cols": 128, "epi_cols": (64, 32), "epi_classes": (64, 32, 16), "partials": 1024}


def epilogue_blocks(c: int, d: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_D)`` of the epilogue tiles: the largest tile (wider columns first) that
    still gives :data:`MIN_PROGRAMS` tiles; the smallest tile when C*D is too small for that."""
    size = _sizes()
    candidates = [(bc, _block_d(d, bd)) for bd in size["epi_cols"] for bc in size["epi_classes"]]
    for block_c, block_d in candidates:
        if _cdiv(c, block_c) * _cdiv(d, block_d) >= MIN_PROGRAMS:
            return block_c, block_d
    return candidates[-1]


def default_split(n: int, d: int, c: int, device: torch.device) -> int:
    """Splits per class for :func:`class_sums`: enough programs to fill an H100 (about four per
    SM) when there are few classes, each split still at least two row blocks; 1 off CUDA.

    The sums buffer grows with the split (4*SPLIT*C*W bytes), which happens only when C*D is small."""
    if device.type != "cuda":
        return 1
    size = _sizes()
    programs = c * _cdiv(d, _block_d(d, size["sum_cols"]))
    wanted = _cdiv(_SPLIT_PROGRAMS, programs)
    return max(1, min(wanted, n // (c * 2 * size["rows"]), 16))


def class_sums(
    z: torch.Tensor,
    perm: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor,
    *,
    contiguous: bool,
    accumulate: bool = False,
) -> None:
    """Per-class float32 sums of ``z`` (N, D) into ``out`` (SPLIT, C, W) (column D: counts).

    ``perm`` (N,) lists the rows in class order and ``offsets`` (C+1,) the class boundaries
    in it (``contiguous=True``: ``perm`` is the identity and is not read).  ``out`` must be
    contiguous float32 with ``W > D`` (a multiple of 16 for vector accesses); ``accumulate``
    adds to it.  The split count is ``out.shape[0]``.  Columns beyond D are never read or written.
    """
    split, c, _ = out.shape
    d = z.shape[1]
    size = _sizes()
    block_d = _block_d(d, size["sum_cols"])
    with _device_of(z):
        _class_sums_kernel[(c, _cdiv(d, block_d), split)](
            z,
            perm,
            offsets,
            out,
            d,
            z.stride(0),
            z.stride(1),
            out.stride(0),
            out.stride(1),
            CONTIGUOUS=contiguous,
            ACCUMULATE=accumulate,
            SPLIT=split,
            BLOCK_R=size["rows"],
            BLOCK_D=block_d,
        )


def flow_epilogue(
    buf: torch.Tensor,
    flow: torch.Tensor,
    flow_sum: torch.Tensor,
    flow_sq: torch.Tensor,
    centers: torch.Tensor,
    nontarget: torch.Tensor,
    centers_sum: torch.Tensor,
    *,
    objective: str,
    alpha: float,
    inv_k: float,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (1,), G/n (C, D))`` float32 from the sums buffer (SPLIT, C, W).

    ``G/n`` is written **over the buffer** (split 0's sums; returned as a (C, D) view with row
    stride W), so the loss needs no (C, D) allocation beyond the sums buffer.  The constants
    (float32, contiguous) are those of the module docstring: ``flow = nu - mu``, ``flow_sum``
    its column sums, ``flow_sq`` (1,) its squared norm, ``centers = mu``, ``nontarget = nu``,
    ``centers_sum`` the column sums of ``mu``.  Three launches, see the module docstring.
    """
    split, c, width = buf.shape
    d = flow.shape[1]
    block_c, block_d = epilogue_blocks(c, d)
    rb, cb = _cdiv(c, block_c), _cdiv(d, block_d)
    tiles = rb * cb
    work = torch.empty(rb * width + width + 2 * tiles + 1, device=buf.device, dtype=torch.float32)
    tpart, tsum = work[: rb * width], work[rb * width : (rb + 1) * width]
    part, loss = work[(rb + 1) * width : -1], work[-1:]
    code = OBJECTIVES[objective]
    common = {"SPLIT": split, "BLOCK_C": block_c, "BLOCK_D": block_d}
    grid = (rb, cb)
    with _device_of(buf):
        _epi_colsum_kernel[grid](buf, tpart, c, d, buf.stride(0), buf.stride(1), **common)
        _epi_partials_kernel[grid](
            buf,
            tpart,
            tsum,
            flow,
            centers,
            nontarget,
            part,
            c,
            d,
            rb,
            tiles,
            buf.stride(0),
            buf.stride(1),
            inv_k,
            OBJECTIVE=code,
            **common,
        )
        _epi_grad_kernel[grid](
            buf,
            tsum,
            flow,
            flow_sum,
            flow_sq,
            centers,
            nontarget,
            centers_sum,
            part,
            loss,
            c,
            d,
            tiles,
            buf.stride(0),
            buf.stride(1),
            inv_k,
            alpha,
            1.0 / (c * d),
            eps,
            OBJECTIVE=code,
            BLOCK_P=min(_sizes()["partials"], _next_pow2(tiles)),
            **common,
        )
    return loss, buf[0, :, :d]


def broadcast_grad(gn: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dL/dz`` (N, D) in ``dtype``: row i is ``grad_out * gn[labels[i]]`` (``grad_out`` a 1-element
    float32 tensor; ``gn`` (C, D) float32 with unit column stride, e.g. the view :func:`flow_epilogue` returns)."""
    n = labels.shape[0]
    d = gn.shape[1]
    size = _sizes()
    block_d = _block_d(d, size["sum_cols"])
    dz = torch.empty(n, d, device=gn.device, dtype=dtype)
    with _device_of(gn):
        _broadcast_kernel[(_cdiv(n, size["rows"]), _cdiv(d, block_d))](
            gn, labels, grad_out, dz, n, d, gn.stride(0), dz.stride(0), BLOCK_R=size["rows"], BLOCK_D=block_d
        )
    return dz
