"""AACE: adaptive adversarial cross-entropy for sharpness-aware minimisation, reproduced."""
from .losses import (LOSSES, AACELoss, aace_loss, aace_target, cross_entropy, dual_focal_loss, focal_loss,
                     taylor_cross_entropy)
from .models import build_model
from .sam import SAM, frozen_bn_stats
from .step import StepResult, sam_step

# Part of every run's hash: bump it when a change alters the numbers a run produces.
__version__ = "0.4.0"
__all__ = ["AACELoss", "aace_loss", "aace_target", "cross_entropy", "focal_loss", "dual_focal_loss", "taylor_cross_entropy", "LOSSES", "build_model", "SAM", "frozen_bn_stats", "sam_step", "StepResult"]
