"""torchiter: iteration modules whose forward pass is an optimisation loop."""

import torch  # noqa: F401  (loads libtorch before the op library)

from . import _C  # noqa: F401  (registers torch.ops.torchiter.*)
from . import ops
from . import optim, projections
from .modules import IterationLossModule, IterationModule
from .projections import Clamp, Projection, SoftThreshold

__all__ = [
    "ops",
    "optim",
    "projections",
    "IterationModule",
    "IterationLossModule",
    "Projection",
    "Clamp",
    "SoftThreshold",
]
