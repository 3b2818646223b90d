"""torchiter: iteration modules whose forward pass is an optimisation loop."""

import torch  # noqa: F401  (loads libtorch before the op library)

from . import _C  # noqa: F401  (registers torch.ops.torchiter.*)
from ._C import cpu_bfloat16_units, cpu_capability
from . import implicit, models, ops, optim, projections, reference, scripting, stats
from .implicit import FixedPointGradient
from .modules import IterationLossModule, IterationModule
from .compiled import CompiledIterationsInfo, CompiledIterationsWarning, compile_iterations, compiled_iterations_info
from .optim import SGD
from .stats import DivergenceError, DivergenceWarning, IterationStats
from .projections import Clamp, Projection, SoftThreshold

__version__ = "0.1.0"

__all__ = [
    "cpu_bfloat16_units",
    "cpu_capability",
    "implicit",
    "models",
    "ops",
    "optim",
    "projections",
    "reference",
    "scripting",
    "stats",
    "IterationModule",
    "IterationLossModule",
    "compile_iterations",
    "compiled_iterations_info",
    "CompiledIterationsInfo",
    "CompiledIterationsWarning",
    "SGD",
    "Projection",
    "Clamp",
    "SoftThreshold",
    "FixedPointGradient",
    "IterationStats",
    "DivergenceError",
    "DivergenceWarning",
]
