"""The generalized contrastive alignment (GCA) family: fused Sinkhorn passes and their adjoint.

GCA (arXiv 2502.20141; the authors' ``nerdslab/gca``) scales the Gibbs kernel
``K = exp(-C / eps)`` of the cost ``C = 1 - max(X X^T, 1e-7)`` between the normalised rows ``X``
(rows, dim) of a batch by Sinkhorn iterations.  In the log domain each half-iteration is one
**pass**: ``R_i = log sum_j exp(h_j - C_ij / eps)`` for a potential ``h``; the cost is symmetric,
so the column pass is a row pass too.  The kernels recompute ``S = X X^T`` tile by tile in every
pass and keep nothing of size rows^2: memory is O(rows * dim) plus a few vectors per pass.

* :func:`lse_pass` -- one forward pass (online log-sum-exp over column tiles), off-diagonal;
  optionally each row's largest cost and its column (the authors' diagonal is that maximum).
* :func:`adjoint_pass` -- ``sum_{i != j} cv_i exp(h_j - C_ij / eps - R_i)``: the adjoint of a
  pass with respect to its input (the softmax weights are <= 1, so no overflow).
* :func:`gradient_pass` -- ``dX`` of all passes at once: the adjoint with respect to the cost of
  ``P`` passes is ``K`` times a sum of ``P`` rank-one terms, applied in one flash-attention-style
  pass (``S`` tile, rank-``2P`` tile, ``G X_j`` product).

Each launch's cost is one ``2 * rows^2 * dim`` FLOP similarity product (the gradient pass two)
plus ``rows^2`` exponentials; a forward is ``2 T + 1`` passes, a backward ``2 T`` adjoint passes
and one gradient pass (``T`` iterations).  Float32 rows use IEEE float32 products (or, with
``tf32``, TF32 tensor-core ones); 16-bit rows use the tensor cores with float32 accumulation.
No float atomics: every sum has a fixed order.

No imports of the rest of fastsfm.
"""

from .gradient import GRAD_COLUMNS, RANK_BLOCK, gradient_pass
from .passes import CLAMP, adjoint_pass, lse_pass, pass_tiles

__all__ = ["lse_pass", "adjoint_pass", "gradient_pass", "pass_tiles", "CLAMP", "RANK_BLOCK", "GRAD_COLUMNS"]
