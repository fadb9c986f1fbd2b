"""fastsfm: statistical flow matching dataset distillation with fused Triton kernels."""

from . import functional
from .functional import sfm_loss
from .loss import SFMLoss

__all__ = ["SFMLoss", "sfm_loss", "functional"]
__version__ = "0.1.0"
