"""Triton kernels of fastsfm (installed as ``fastsfm.kernels``).

Only ``@triton.jit`` kernels and their launchers live here; autograd, fallbacks and
validation are in :mod:`fastsfm.ops` and :mod:`fastsfm.functional`.  Importing this package
imports triton, so set ``TRITON_INTERPRET=1`` beforehand to run the kernels on CPU.
"""

from .sfm import *  # noqa: F403 - the package is its kernels module
from .sfm import __all__  # noqa: F401
