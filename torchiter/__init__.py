"""torchiter: iteration modules whose forward pass is an optimisation loop."""

import torch  # noqa: F401  (loads libtorch before the op library)

from . import _C  # noqa: F401  (registers torch.ops.torchiter.*)
from . import ops

__all__ = ["ops"]
