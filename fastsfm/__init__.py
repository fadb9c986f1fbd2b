"""fastsfm: statistical flow matching dataset distillation with fused Triton kernels."""

from . import functional
from .functional import sfm_loss
from .loss import SFMLoss
from .stats import ClassStats

__all__ = ["SFMLoss", "ClassStats", "sfm_loss", "functional"]
__version__ = "0.2.0"
