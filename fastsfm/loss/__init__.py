"""The drop-in losses (floor 3): SFM and GCA, what a user calls and everything that computes them.

* :mod:`.module` -- :class:`SFMLoss`, the ``nn.Module`` (holds the real centres, validates once);
* :mod:`.functional` -- :func:`sfm_loss` and the boundary checks (shapes, dtypes, labels, NaN);
* :mod:`.ops` -- the SFM autograd ops and label plans (imports :mod:`fastsfm.kernels`);
* :mod:`.torch_path` -- the PyTorch path (CPU, float64, ``gradcheck``);
* :mod:`.reference` -- the authors' definition, literally (the tests' reference);
* the GCA family: :mod:`.gca` (:func:`gca_loss`, :class:`GCALoss`, checks), :mod:`.gca_ops` (the
  fused Sinkhorn op, the one other importer of :mod:`fastsfm.kernels`), :mod:`.gca_torch` (the
  definition and its PyTorch path).

Imports: the foundations (``fastsfm.config``) and :mod:`fastsfm.kernels` only.
"""
