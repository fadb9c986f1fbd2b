"""Triton kernels of fastsfm (installed as ``fastsfm.kernels``).

Only ``@triton.jit`` kernels and their launchers live here; autograd and validation are in
:mod:`fastsfm.functional`.  Importing this package imports triton, so set
``TRITON_INTERPRET=1`` beforehand to run the kernels on CPU.
"""

from .sfm import interpreter_active, sfm_backward, sfm_forward

__all__ = ["sfm_forward", "sfm_backward", "interpreter_active"]
