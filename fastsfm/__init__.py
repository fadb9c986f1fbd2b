"""fastsfm: statistical flow matching dataset distillation with fused Triton kernels (and the GCA losses)."""

from .loss import functional
from .loss.functional import sfm_loss
from .loss.gca import GCALoss, gca_loss
from .loss.module import SFMLoss
from .stats import ClassStats

__all__ = ["SFMLoss", "ClassStats", "sfm_loss", "functional", "GCALoss", "gca_loss"]
__version__ = "0.2.0"
