"""Projections applied to iteration parameters after each optimizer step.

A projection is any callable ``tensor -> tensor`` that keeps shape and dtype.
The objects here are plain callables, so every code path can use them, and
they are also understood by the fused ``torchiter.ops.sgd_step_`` kernel, so an
SGD step followed by one of them runs as a single pass over memory.

:func:`fused_projection_args` tells which callables the kernel can express.
"""

import math
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _internals

__all__ = ["Projection", "Clamp", "SoftThreshold", "fused_projection_args", "project_"]

# (shrink, min, max) in the order of the sgd_step_ schema.
ProjectionArgs = Tuple[float, Optional[float], Optional[float]]


class Projection:
    """Soft threshold by ``shrink`` followed by a clamp to ``[min, max]``.

    Elementwise, in this order (the order of ``torchiter.ops.sgd_step_``)::

        v = sign(v) * max(|v| - shrink, 0)     (if shrink > 0)
        v = max(v, min); v = min(v, max)       (bounds that are given)

    Instances are immutable, so a module may decide once per forward pass
    whether the fused kernel can apply them.

    Args:
        shrink: soft-threshold width, ``>= 0``; 0 disables the threshold.
        min: optional lower bound (``min=0`` is a ReLU).
        max: optional upper bound, ``>= min`` when both are given.

    Raises:
        ValueError: if an option is NaN or infinite (``shrink``), negative
            (``shrink``), or ``min > max``.

    Example:
        >>> proj = Projection(shrink=0.1, min=0.0)
        >>> proj(torch.tensor([-1.0, 0.05, 0.5]))
        tensor([0.0000, 0.0000, 0.4000])
    """

    __slots__ = ("_shrink", "_min", "_max")

    def __init__(
        self,
        shrink: float = 0.0,
        min: Optional[float] = None,
        max: Optional[float] = None,
    ) -> None:
        shrink = float(shrink)
        if not math.isfinite(shrink) or shrink < 0:
            raise ValueError(f"{type(self).__name__}: shrink must be a finite number >= 0, got {shrink}")
        min = None if min is None else float(min)
        max = None if max is None else float(max)
        for name, bound in (("min", min), ("max", max)):
            if bound is not None and math.isnan(bound):
                raise ValueError(f"{type(self).__name__}: {name} must not be NaN")
        if min is not None and max is not None and min > max:
            raise ValueError(f"{type(self).__name__}: min must be <= max, got min={min} and max={max}")
        object.__setattr__(self, "_shrink", shrink)
        object.__setattr__(self, "_min", min)
        object.__setattr__(self, "_max", max)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def shrink(self) -> float:
        """Soft-threshold width (0 when there is no threshold)."""
        return self._shrink

    @property
    def min(self) -> Optional[float]:
        """Lower clamp bound, or None."""
        return self._min

    @property
    def max(self) -> Optional[float]:
        """Upper clamp bound, or None."""
        return self._max

    @property
    def args(self) -> ProjectionArgs:
        """``(shrink, min, max)``, as passed to ``torchiter.ops.sgd_step_``."""
        return (self._shrink, self._min, self._max)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the projection of ``x`` as a new tensor.

        Args:
            x: floating tensor of any shape, on any device.

        Returns:
            A tensor with the shape, dtype and device of ``x``.
        """
        if self._shrink > 0:
            # The kernel's formula: bit for bit sign(x) * max(|x| - s, 0).
            x = x - x.clamp(-self._shrink, self._shrink)
        if self._min is not None or self._max is not None:
            x = x.clamp(self._min, self._max)
        return x

    def __reduce__(self) -> Tuple[Callable, Tuple]:
        # Copy and pickle through the constructor; __setattr__ is closed.
        return (_rebuild, (type(self), self.args))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.args == self.args  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.args))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shrink={self._shrink}, min={self._min}, max={self._max})"


def _rebuild(cls: type, args: ProjectionArgs) -> Projection:
    obj = object.__new__(cls)
    Projection.__init__(obj, *args)
    return obj


class Clamp(Projection):
    """Clamp to ``[min, max]``; ``Clamp(min=0.0)`` is a ReLU.

    Args:
        min: optional lower bound.
        max: optional upper bound; at least one bound must be given.

    Raises:
        ValueError: if neither bound is given, a bound is NaN or ``min > max``.
    """

    __slots__ = ()

    def __init__(self, min: Optional[float] = None, max: Optional[float] = None) -> None:
        if min is None and max is None:
            raise ValueError("Clamp: at least one of min and max must be given")
        super().__init__(0.0, min, max)

    def __repr__(self) -> str:
        return f"Clamp(min={self._min}, max={self._max})"


class SoftThreshold(Projection):
    """Soft threshold ``sign(v) * max(|v| - shrink, 0)``, then optional bounds.

    ``SoftThreshold(s)`` is the proximal step of ISTA sparse coding;
    ``SoftThreshold(s, min=0.0)`` its non-negative variant.

    Args:
        shrink: threshold width, ``>= 0``.
        min: optional lower bound applied after the threshold.
        max: optional upper bound applied after the threshold.
    """

    __slots__ = ()

    def __init__(
        self, shrink: float, min: Optional[float] = None, max: Optional[float] = None
    ) -> None:
        super().__init__(shrink, min, max)

    def __repr__(self) -> str:
        return f"SoftThreshold(shrink={self._shrink}, min={self._min}, max={self._max})"


_RELU: ProjectionArgs = (0.0, 0.0, None)
# Functions whose result the kernel reproduces; compared by identity so that a
# user's wrapper, however similar, is never assumed to be one of them.
_FUNCTIONS = {id(F.relu): _RELU, id(torch.relu): _RELU, id(F.relu6): (0.0, 0.0, 6.0)}


def _module_is_plain(module: nn.Module) -> bool:
    # Forward hooks, or a forward patched onto the instance, would be skipped
    # by the kernel, so such a module is left to the generic path.
    return not _internals.module_has_forward_hooks(module)


def fused_projection_args(projection: Optional[Callable]) -> Optional[ProjectionArgs]:
    """Returns ``(shrink, min, max)`` when the fused kernel can apply ``projection``.

    Recognised: None (no projection), ``nn.ReLU``, ``nn.ReLU6`` and
    ``nn.Hardtanh`` instances without hooks (``inplace`` either way), ``F.relu``,
    ``torch.relu``, ``F.relu6`` and the exact classes :class:`Projection`,
    :class:`Clamp` and :class:`SoftThreshold`. Subclasses and any other
    callable return None, so they take the generic path.

    Args:
        projection: the candidate projection.

    Returns:
        The kernel arguments, or None if the kernel cannot express it.
    """
    if projection is None:
        return (0.0, None, None)
    kind = type(projection)
    if kind is Projection or kind is Clamp or kind is SoftThreshold:
        return projection.args  # type: ignore[union-attr]
    if kind is nn.ReLU and _module_is_plain(projection):  # type: ignore[arg-type]
        return _RELU
    if (kind is nn.Hardtanh or kind is nn.ReLU6) and _module_is_plain(projection):  # type: ignore[arg-type]
        # Read per instance: min_val and max_val are plain, mutable attributes.
        return (0.0, float(projection.min_val), float(projection.max_val))  # type: ignore[union-attr]
    return _FUNCTIONS.get(id(projection))


def project_(params: Iterable[torch.Tensor], projection: Callable) -> None:
    """Applies ``projection`` to each tensor in place, without autograd.

    The result is copied into the tensor's own memory (the original library
    reassigned ``.data`` instead, which silently reallocated on a shape or
    dtype change and broke aliases such as optimizer state keys).

    Args:
        params: tensors to project; any shape, dtype and device.
        projection: callable ``tensor -> tensor``; may also work in place
            and return its input.

    Raises:
        TypeError: if the projection returns something other than a tensor.
        ValueError: if the result's shape, dtype or device differs from the
            parameter's.
    """
    with torch.no_grad():
        for i, p in enumerate(params):
            out = projection(p)
            if out is p:
                continue
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"projection {projection!r} returned {type(out).__name__} for "
                    f"iteration parameter {i}; a tensor is expected"
                )
            if out.shape != p.shape or out.dtype != p.dtype or out.device != p.device:
                raise ValueError(
                    f"projection {projection!r} changed iteration parameter {i} from "
                    f"{tuple(p.shape)} {p.dtype} on {p.device} to {tuple(out.shape)} "
                    f"{out.dtype} on {out.device}; a projection must keep shape, dtype "
                    "and device"
                )
            try:
                p.copy_(out)
            except RuntimeError:
                # A result that aliases p through another view (say x.mT of a
                # square x) cannot be copied onto p directly.
                p.copy_(out.clone())
