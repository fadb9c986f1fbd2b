"""Triton kernels of fastsfm (installed as ``fastsfm.kernels``).

Only ``@triton.jit`` kernels and their launchers live here; autograd, fallbacks and
validation are in :mod:`fastsfm.ops` and :mod:`fastsfm.functional`.  Importing this package
imports triton, so set ``TRITON_INTERPRET=1`` beforehand to run the kernels on CPU.
"""

from .sfm import (
    MIN_PROGRAMS,
    OBJECTIVES,
    broadcast_grad,
    class_sums,
    default_split,
    epilogue_blocks,
    flow_epilogue,
    interpreter_active,
)

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
