"""Fused Triton kernels of the SFM flow-cosine loss (``shared/references/sfm.md``).

The loss depends on the synthetic features ``Z`` (N, D) only through their per-class sums,
so one call is three memory passes and a small epilogue:

1. :func:`class_sums` -- a segmented reduction.  Rows are visited in class order through a
   permutation (identity for class-contiguous rows: the ``CONTIGUOUS`` fast path skips the
   gather) and ``OFFS`` (C+1,) class boundaries.  Program ``(c, j, s)`` sums split ``s`` of
   class ``c``'s rows over columns block ``j`` in float32, in a fixed order (no atomics, so
   the result is bitwise reproducible).  Output: a float32 buffer (SPLIT, C, D+1) whose
   last column holds the row counts (that packing lets a process group all-reduce sums and
   counts in one call).  ``ACCUMULATE`` adds to the buffer instead of overwriting it
   (chunked distillation steps).
2. :func:`flow_epilogue` -- two launches over columns blocks of the (C, D) class means
   ``t = S / n``.  The first sums the classes (``T = sum_c t_c``) and reduces the partial
   scalars of the loss; the second turns them into the loss and ``G/n`` where
   ``G = dL/dt`` (C, D), computed analytically in the same pass and written over the sums.
3. :func:`broadcast_grad` -- ``dL/dz_i = g * (G/n)[y_i]`` in the input dtype.

Notation of the epilogue (``k`` the non-target divisor, ``inv_k = 1/k``):
``b_c = (T - t_c) / k - t_c`` is the synthetic flow and ``a = nu - mu`` the constant real
flow (``FLOW``), with ``sum_c a_c`` (``FLOW_SUM``) and ``|a|^2`` (``FLOW_SQ``) precomputed.

* ``flow``: ``L = 1 - <a, b> / (max(|a|, eps) max(|b|, eps))`` (torch's cosine);
  ``dL/db = -(a - w b) / (A B)`` with ``w = <a, b>/|b|^2``, and
  ``G_j = inv_k sum_c dL/db_c - (1 + inv_k) dL/db_j``.
* ``decouple``: ``L = alpha/(CD) |t - mu|^2 + (1-alpha)/(CD) |e|^2`` with
  ``e = (T - t) / k - nu``; ``G_j = 2 alpha/(CD) (t_j - mu_j) + 2 (1-alpha)/(CD) inv_k (sum_c e_c - e_j)``.

Only ``@triton.jit`` kernels and thin launchers live here: no autograd, no validation
(callers validate), no imports of the rest of fastsfm.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["class_sums", "flow_epilogue", "broadcast_grad", "default_split", "interpreter_active", "OBJECTIVES"]

OBJECTIVES = {"flow": 0, "decouple": 1}


def interpreter_active() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _class_sums_kernel(
    Z,
    PERM,
    OFFS,
    OUT,
    D,
    stride_zr,
    stride_zc,
    stride_os,
    stride_oc,
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
def _class_means_tile(
    BUF,
    cs,
    cmask,
    cols,
    dmask,
    D,
    stride_s,
    stride_c,
    SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(t, n)``: class means (BLOCK_C, BLOCK_D) and counts (BLOCK_C,) from the split sums."""
    tile = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s in range(SPLIT):
        row = BUF + s * stride_s + cs * stride_c
        tile += tl.load(row[:, None] + cols[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        count += tl.load(row + D, mask=cmask, other=0.0)
    count = tl.where(cmask, count, 1.0)
    return tile / count[:, None], count


@triton.jit
def _flow_partials_kernel(
    BUF,
    FLOW,
    CENTERS,
    NONTARGET,
    TSUM,
    PART,
    C,
    D,
    stride_s,
    stride_c,
    inv_k,
    OBJECTIVE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program j (columns block): ``T`` for its columns, then two partial sums of the loss.

    flow: ``(<a, b>, |b|^2)``; decouple: ``(|t - mu|^2, |e|^2)``, written to ``PART[j, 0:2]``.
    """
    j = tl.program_id(0)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    tsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        t, _ = _class_means_tile(BUF, cs, cmask, cols, dmask, D, stride_s, stride_c, SPLIT, BLOCK_C, BLOCK_D)
        tsum += tl.sum(tl.where(cmask[:, None], t, 0.0), axis=0)
    tl.store(TSUM + cols, tsum, mask=dmask)
    first = tl.zeros((BLOCK_D,), dtype=tl.float32)
    second = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        mask = cmask[:, None] & dmask[None, :]
        t, _ = _class_means_tile(BUF, cs, cmask, cols, dmask, D, stride_s, stride_c, SPLIT, BLOCK_C, BLOCK_D)
        const = cs[:, None] * D + cols[None, :]
        if OBJECTIVE == 0:
            a = tl.load(FLOW + const, mask=mask, other=0.0)
            b = tl.where(mask, (tsum[None, :] - t) * inv_k - t, 0.0)
            first += tl.sum(a * b, axis=0)
            second += tl.sum(b * b, axis=0)
        else:
            mu = tl.load(CENTERS + const, mask=mask, other=0.0)
            nu = tl.load(NONTARGET + const, mask=mask, other=0.0)
            diff = tl.where(mask, t - mu, 0.0)
            e = tl.where(mask, (tsum[None, :] - t) * inv_k - nu, 0.0)
            first += tl.sum(diff * diff, axis=0)
            second += tl.sum(e * e, axis=0)
    tl.store(PART + 2 * j, tl.sum(first, axis=0))
    tl.store(PART + 2 * j + 1, tl.sum(second, axis=0))


@triton.jit
def _flow_grad_kernel(
    BUF,
    FLOW,
    FLOW_SUM,
    FLOW_SQ,
    CENTERS,
    NONTARGET,
    CENTERS_SUM,
    TSUM,
    PART,
    LOSS,
    C,
    D,
    NUM_BLOCKS,
    stride_s,
    stride_c,
    inv_k,
    alpha,
    scale,
    eps,
    OBJECTIVE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program j: the loss scalars from all partials, then ``G / n`` for its columns, written over
    the sums of split 0 in ``BUF``
    (``scale = 1 / (C D)``, the MSE normalisation)."""
    j = tl.program_id(0)
    blocks = tl.arange(0, BLOCK_P)
    pmask = blocks < NUM_BLOCKS
    first = tl.sum(tl.load(PART + 2 * blocks, mask=pmask, other=0.0), axis=0)
    second = tl.sum(tl.load(PART + 2 * blocks + 1, mask=pmask, other=0.0), axis=0)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    tsum = tl.load(TSUM + cols, mask=dmask, other=0.0)
    if OBJECTIVE == 0:
        norm_b = tl.sqrt(second)
        denom = tl.maximum(tl.sqrt(tl.load(FLOW_SQ)), eps) * tl.maximum(norm_b, eps)
        loss = 1.0 - first / denom
        w = tl.where(norm_b > eps, first / tl.where(second > 0.0, second, 1.0), 0.0)
        bsum = tsum * ((C - 1) * inv_k - 1.0)
        gsum = -(tl.load(FLOW_SUM + cols, mask=dmask, other=0.0) - w * bsum) / denom
    else:
        loss = alpha * first * scale + (1.0 - alpha) * second * scale
        esum = tsum * ((C - 1) * inv_k) - tl.load(CENTERS_SUM + cols, mask=dmask, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        mask = cmask[:, None] & dmask[None, :]
        t, count = _class_means_tile(BUF, cs, cmask, cols, dmask, D, stride_s, stride_c, SPLIT, BLOCK_C, BLOCK_D)
        const = cs[:, None] * D + cols[None, :]
        if OBJECTIVE == 0:
            a = tl.load(FLOW + const, mask=mask, other=0.0)
            b = (tsum[None, :] - t) * inv_k - t
            gb = -(a - w * b) / denom
            g = gsum[None, :] * inv_k - (1.0 + inv_k) * gb
        else:
            mu = tl.load(CENTERS + const, mask=mask, other=0.0)
            nu = tl.load(NONTARGET + const, mask=mask, other=0.0)
            e = (tsum[None, :] - t) * inv_k - nu
            g = 2.0 * scale * (alpha * (t - mu) + (1.0 - alpha) * inv_k * (esum[None, :] - e))
        # In place over split 0's sums: this program read them (above) and no other touches these columns.
        tl.store(BUF + cs[:, None] * stride_c + cols[None, :], g / count[:, None], mask=mask)
    if j == 0:
        tl.store(LOSS, loss)


@triton.jit
def _broadcast_kernel(GN, Y, GOUT, DZ, N, D, stride_gn, stride_dz, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``DZ[i, :] = GOUT * GN[Y[i], :]`` cast to DZ's dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    y = tl.load(Y + rows, mask=rmask, other=0).to(tl.int64)
    g = tl.load(GN + y[:, None] * stride_gn + cols[None, :], mask=mask, other=0.0) * tl.load(GOUT).to(tl.float32)
    tl.store(DZ + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :], g.to(DZ.dtype.element_ty), mask=mask)


def _block_d(d: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(d)))


def _sizes() -> dict[str, int]:
    """Block sizes: larger on GPU; small under the interpreter so test shapes span several tiles."""
    if interpreter_active():
        return {"rows": 16, "sum_cols": 32, "classes": 16, "epi_cols": 16}
    return {"rows": 32, "sum_cols": 128, "classes": 32, "epi_cols": 32}


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_split(n: int, d: int, c: int, device: torch.device) -> int:
    """Splits per class for :func:`class_sums`: enough programs to fill the GPU (about four per
    multiprocessor) when there are few classes, each split still at least two row blocks; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    size = _sizes()
    programs = c * triton.cdiv(d, _block_d(d, size["sum_cols"]))
    wanted = triton.cdiv(4 * _multiprocessors(device.index or 0), programs)
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
    """Per-class float32 sums of ``z`` (N, D) into ``out`` (SPLIT, C, D+1) (last column: counts).

    ``perm`` (N,) lists the rows in class order and ``offsets`` (C+1,) the class boundaries
    in it (``contiguous=True``: ``perm`` is the identity and is not read).  ``out`` must be
    contiguous float32; ``accumulate`` adds to it.  The split count is ``out.shape[0]``.
    """
    split, c, width = out.shape
    d = width - 1
    size = _sizes()
    block_d = _block_d(d, size["sum_cols"])
    grid = (c, triton.cdiv(d, block_d), split)
    _class_sums_kernel[grid](
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
    """``(loss (1,), G/n (C, D))`` float32 from the sums buffer (SPLIT, C, D+1).

    ``G/n`` is written **over the buffer** (split 0's sums; returned as a (C, D) view with row
    stride D+1), so the whole loss needs no (C, D) allocation beyond the sums buffer.  The
    constants (float32, contiguous) are those of the module docstring: ``flow = nu - mu``,
    ``flow_sum`` its column sums, ``flow_sq`` (1,) its squared norm, ``centers = mu``,
    ``nontarget = nu``, ``centers_sum`` the column sums of ``mu``.  Extra memory:
    D + 2 * D / BLOCK floats.
    """
    split, c, width = buf.shape
    d = width - 1
    size = _sizes()
    block_d = _block_d(d, size["epi_cols"])
    blocks = triton.cdiv(d, block_d)
    tsum = torch.empty(d, device=buf.device, dtype=torch.float32)
    part = torch.empty(blocks, 2, device=buf.device, dtype=torch.float32)
    loss = torch.empty(1, device=buf.device, dtype=torch.float32)
    code = OBJECTIVES[objective]
    common = {"OBJECTIVE": code, "SPLIT": split, "BLOCK_C": size["classes"], "BLOCK_D": block_d}
    _flow_partials_kernel[(blocks,)](
        buf, flow, centers, nontarget, tsum, part, c, d, buf.stride(0), buf.stride(1), inv_k, **common
    )
    _flow_grad_kernel[(blocks,)](
        buf,
        flow,
        flow_sum,
        flow_sq,
        centers,
        nontarget,
        centers_sum,
        tsum,
        part,
        loss,
        c,
        d,
        blocks,
        buf.stride(0),
        buf.stride(1),
        inv_k,
        alpha,
        1.0 / (c * d),
        eps,
        **common,
        BLOCK_P=triton.next_power_of_2(blocks),
    )
    return loss, buf[0, :, :d]


def broadcast_grad(gn: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dL/dz`` (N, D) in ``dtype``: row i is ``grad_out * gn[labels[i]]`` (``grad_out`` a 1-element
    tensor; ``gn`` (C, D) float32 with unit column stride, e.g. the view :func:`flow_epilogue` returns)."""
    n = labels.shape[0]
    d = gn.shape[1]
    size = _sizes()
    block_d = _block_d(d, size["sum_cols"])
    dz = torch.empty(n, d, device=gn.device, dtype=dtype)
    grid = (triton.cdiv(n, size["rows"]), triton.cdiv(d, block_d))
    _broadcast_kernel[grid](
        gn, labels, grad_out, dz, n, d, gn.stride(0), dz.stride(0), BLOCK_R=size["rows"], BLOCK_D=block_d
    )
    return dz
