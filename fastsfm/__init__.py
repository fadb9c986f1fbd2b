"""fastsfm: statistical flow matching dataset distillation with fused Triton kernels."""

from .loss import functional
from .loss.functional import sfm_loss
from .loss.module import SFMLoss
from .stats import ClassStats

__all__ = ["SFMLoss", "ClassStats", "sfm_loss", "functional"]
__version__ = "0.2.0"
