"""The SFM flow-cosine loss family: fused Triton kernels (arXiv 2602.05391; the authors' ``einsteinxia/SFM``).

The loss depends on the synthetic features ``Z`` (N, D) only through their per-class sums, so
one forward+backward is **three launches**:

1. :func:`class_sums` -- a deterministic segmented reduction of ``Z`` into the **sums buffer**
   (C, W) float32: class sums in columns 0..D-1, row counts in column D, rows padded to a
   width W that is a multiple of 16 elements (``fastsfm.loss.ops.sums_width``) so that every row
   starts 64-byte aligned.  Rows are visited in class order through a permutation (``PERM``;
   not read for class-contiguous rows) and the class boundaries ``OFFS`` (C+1,).  The work is
   a table of **items** (:func:`segment_items`, built once per labels tensor): an item is a run
   of up to ``GROUP`` consecutive classes whose rows one program reads, or one slice of a
   heavy class (the load-balanced form for skewed counts).  Program ``(j, i)`` -- column block
   fastest, so resident programs read whole rows -- sums item ``i`` over column block ``j`` in
   one software-pipelined row loop (``tl.range(..., num_stages)``: cp.async copies keep several
   row tiles in flight whatever ptxas does with registers).  With ``GROUP > 1`` a tile's rows
   are added to their classes by a one-hot matrix product on the tensor cores (for 16-bit
   features each product is exact -- the one-hot operand is 0/1 -- and accumulation is float32,
   as plain adds; float32 features use the 3xTF32 split, which drops the low-by-low term: about
   2^-22 relative per element, beside the 2^-24 rounding of each float32 add); with ``GROUP == 1``
   (many rows per class) by plain float32 adds.  Slices of a heavy class
   write partial sums to a carry buffer; the last slice to finish (an integer arrival counter)
   adds them in slice order and resets the counter.  No float atomics: every sum has a fixed
   order, so results are bitwise reproducible.  ``ACCUMULATE`` adds to the buffer (chunked
   steps).  Traffic: N*D*s bytes read (s: bytes per element), plus 8*N of ``PERM``/sorted labels.
2. :func:`flow_epilogue` -- **one launch** over (column block, class block) tiles of the class
   means ``t = S / n``.  Each tile writes partial sums of the loss (below) to a workspace, then
   takes an integer ticket; the last tile reduces all partials in a fixed order, writes the
   loss and the per-column vector ``V`` and two scalars from which the backward rebuilds
   ``G/n`` (``G = dL/dt``), and resets the counter (graph-safe: the counter is zero between calls).
   Its divisions compile to ``div.full.f32`` and its square roots to ``sqrt.approx.f32`` (a few
   ulp each, not IEEE-rounded).  Bounds, for float32 features against the float64 reference:
   loss within 1e-5 relative and gradient within 1e-4 of its largest entry (asserted across
   shapes, orders and counts); measured 3.1e-6 relative L2 on the gradient at N = 50,000 (H200).
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

Modules: :mod:`.sums` (step 1 and the work items), :mod:`.epilogue` (step 2), :mod:`.backward`
(step 3); launches go through :class:`fastsfm.kernels.launch.Launcher`.  Importing this package imports triton: set
``TRITON_INTERPRET=1`` beforehand to run the kernels on CPU.

No imports of the rest of fastsfm.
"""

from .backward import BACKWARD_COLUMNS, backward_rows
from .epilogue import MIN_PROGRAMS, OBJECTIVES, epilogue_blocks, flow_epilogue, workspace_size
from .sums import GROUP_BELOW, ITEM_FIELDS, Tiles, class_sums, segment_items, tiles_for

__all__ = [
    "class_sums",
    "flow_epilogue",
    "backward_rows",
    "segment_items",
    "Tiles",
    "tiles_for",
    "epilogue_blocks",
    "workspace_size",
    "OBJECTIVES",
    "MIN_PROGRAMS",
    "ITEM_FIELDS",
    "GROUP_BELOW",
    "BACKWARD_COLUMNS",
]
