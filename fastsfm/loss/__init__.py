"""The drop-in SFM loss (floor 3): what a user calls, and everything that computes it.

* :mod:`.module` -- :class:`SFMLoss`, the ``nn.Module`` (holds the real centres, validates once);
* :mod:`.functional` -- :func:`sfm_loss` and the boundary checks (shapes, dtypes, labels, NaN);
* :mod:`.ops` -- the autograd ops and label plans: the one module that imports
  :mod:`fastsfm.kernels`;
* :mod:`.torch_path` -- the PyTorch path (CPU, float64, ``gradcheck``);
* :mod:`.reference` -- the authors' definition, literally (the tests' reference).

Imports: the foundations (``fastsfm.config``) and :mod:`fastsfm.kernels` only.
"""
