"""fastsfm's fused Triton kernels, installed as ``fastsfm.kernels``: one folder per loss family.

* :mod:`.sfm` -- the SFM flow-cosine loss: segmented class sums, the O(C*D) epilogue, the
  gradient broadcast (three launches per forward+backward).
* :mod:`.launch` -- what every family shares: :class:`~.launch.Launcher` (cached launches of
  compiled specialisations, under the device guard of their tensors), alignment and block-size
  helpers, whether Triton's interpreter is active.

Only ``@triton.jit`` kernels and thin launchers live here: no autograd, no validation (callers
validate), no imports of the rest of fastsfm; :mod:`fastsfm.loss.ops` is the one product module
that imports them.  Importing a family imports triton: set ``TRITON_INTERPRET=1`` beforehand to
run the kernels on CPU.
"""
