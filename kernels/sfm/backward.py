"""The backward: ``G/n`` rebuilt from the sums and the epilogue's workspace, written to every row.

See :mod:`fastsfm.kernels`; this module holds step 3.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..launch import Launcher, LaunchSpec, _aligned, _cdiv
from .epilogue import OBJECTIVES
from .sums import Tiles, _item_rows, _sorted_rows

__all__ = ["backward_rows", "BACKWARD_COLUMNS"]

BACKWARD_COLUMNS = 64
"""Column block of the backward (narrower than the sums': its tiles gather up to three float32 rows)."""


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
    v_vec = WORK + work_at  # the epilogue's layout: V (W), then the coefficients
    coef = v_vec + W
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


_backward_launcher = Launcher(_backward_kernel)


@functools.lru_cache(maxsize=256)
def _backward_spec(d: int, num_items: int, tiles: Tiles, objective: str, contiguous: bool, elem: int) -> LaunchSpec:
    """The launch of :func:`backward_rows` writing ``elem``-byte gradients of ``d`` columns."""
    block_d = min(tiles.block_d, BACKWARD_COLUMNS)
    constexprs = {
        "OBJECTIVE": OBJECTIVES[objective],
        "CONTIGUOUS": contiguous,
        "GROUP": tiles.group,
        "BLOCK_R": tiles.block_r,
        "BLOCK_D": block_d,
    }
    return LaunchSpec((_cdiv(d, block_d), num_items), constexprs, 8 if elem == 4 else 4)


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
    dz = torch.empty(n, d, device=sums.device, dtype=dtype)
    spec = _backward_spec(d, items.shape[0], tiles, objective, contiguous, dz.element_size())
    args = (sums, flow, centers, nontarget, shift, work, perm, sorted_labels, offsets, items, grad_out, dz)
    args += (c, d, w, work_at, inv_k)
    key = (spec, sums.device.index, dtype, _aligned(perm), _aligned(grad_out), c, w, work_at)  # d: in spec
    _backward_launcher(key, spec, args)
    return dz
