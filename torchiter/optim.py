"""SGD steps through the fused ``torchiter.ops.sgd_step_`` kernel.

:func:`fused_sgd_step` runs one step of a ``torch.optim.SGD`` optimizer, plus
a projection, in one pass over memory while keeping the optimizer's state
exactly as ``torch.optim.SGD.step`` would (``state[p]["momentum_buffer"]``),
so a loop may switch between the fused and the generic step at any time.
:class:`SGD` is ``torch.optim.SGD`` with an optional projection whose step
uses it.

The layers follow ``torch/optim/sgd.py``: :func:`_init_group` gathers a param
group's lists, the functional :func:`sgd` steps them (through
``torchiter.ops.sgd_step_``, which picks the op's overload for ``lr``), and
:func:`fused_sgd_step` drives both for an optimizer.
"""

from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch

from . import _C, _internals, ops
from .projections import ProjectionArgs, fused_projection_args, project_

__all__ = ["SGD", "FastStep", "fused_sgd_step", "sgd"]

_NO_PROJECTION: ProjectionArgs = (0.0, None, None)
_Number = (int, float)


class FastStep(NamedTuple):
    """The per-iteration fast path of an iteration module, decided once per forward.

    Attributes:
        optimizer: the SGD optimizer the plan was made for (the plan applies
            only while the module still holds this very optimizer).
        projection: the module's ``iteration_projection`` the plan was made
            for (likewise compared by identity).
        kernel_args: ``(shrink, min, max)`` of the projection the kernel applies.
        fused_projection: the projection the kernel applies, or None when the
            kernel only steps and the module's projection runs generically
            afterwards.
    """

    optimizer: torch.optim.Optimizer
    projection: Optional[Callable]
    kernel_args: ProjectionArgs
    fused_projection: Optional[Callable]


def _group_options(group: Dict[str, Any]) -> Optional[Tuple[Any, ...]]:
    """``(lr, momentum, dampening, weight_decay, nesterov, maximize)`` of a
    param group, or None when the kernel cannot take them (a differentiable
    group, tensor options other than a 0-dim constant ``lr``)."""
    lr = group["lr"]
    if group.get("differentiable", False):
        return None
    if isinstance(lr, torch.Tensor):
        if lr.requires_grad or lr.dim() != 0:
            return None
    elif not isinstance(lr, _Number):
        return None
    momentum, dampening, weight_decay = group["momentum"], group["dampening"], group["weight_decay"]
    if not (isinstance(momentum, _Number) and isinstance(dampening, _Number) and isinstance(weight_decay, _Number)):
        return None
    return lr, momentum, dampening, weight_decay, group["nesterov"], group["maximize"]


def _init_group(
    group: Dict[str, Any],
    state: Dict[torch.Tensor, Dict[str, Any]],
    momentum: float,
    new_buffers: List[Tuple[torch.Tensor, torch.Tensor]],
    skipped: List[torch.Tensor],
) -> List[Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], bool]]:
    """The kernel calls of one param group, as ``torch.optim.SGD._init_group``
    gathers its lists: ``(params, grads, momentum_buffers, first_step)`` for
    the params that have a gradient (those without go to ``skipped``).

    SGD starts a momentum buffer as a copy of the (decayed) gradient; the
    kernel's ``first_step`` writes exactly that into a fresh tensor, which is
    put into the optimizer state (``new_buffers``) once every call succeeded.
    """
    params: List[torch.Tensor] = []
    grads: List[torch.Tensor] = []
    for p in group["params"]:
        g = p.grad
        if g is None:
            skipped.append(p)
        else:
            params.append(p)
            grads.append(g)
    if not params:
        return []
    if momentum == 0:
        return [(params, grads, [], False)]
    old: Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]] = ([], [], [])
    new: Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]] = ([], [], [])
    for p, g in zip(params, grads):
        buf = state[p].get("momentum_buffer")
        if buf is None:
            buf = torch.empty_like(p)
            new_buffers.append((p, buf))
            lists = new
        else:
            lists = old
        lists[0].append(p)
        lists[1].append(g)
        lists[2].append(buf)
    return [(*lists, first) for lists, first in ((old, False), (new, True)) if lists[0]]


def sgd(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    momentum_buffers: List[torch.Tensor],
    *,
    lr: Union[float, torch.Tensor],
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool = False,
    projection_args: ProjectionArgs = _NO_PROJECTION,
) -> None:
    """Functional projected SGD: one fused step over lists of tensors, in place
    (the counterpart of ``torch.optim.sgd.sgd``, plus the projection).

    Shapes, dtypes and devices as :func:`torchiter.ops.sgd_step_`, which it
    calls; the update is not recorded by autograd.
    """
    shrink, lo, hi = projection_args
    with torch.no_grad():
        ops.sgd_step_(
            params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
            nesterov, maximize, first_step, shrink, lo, hi,
        )


def _single_group_step(optimizer: torch.optim.SGD, projection_args: ProjectionArgs) -> Optional[bool]:
    """The common case (one group of float options, no momentum, every
    param with a gradient) with the least Python: it runs once per inner
    iteration. Returns None where the case does not apply."""
    groups = optimizer.param_groups
    if len(groups) != 1:
        return None
    group = groups[0]
    lr = group["lr"]
    weight_decay = group["weight_decay"]
    if not (
        group["momentum"] == 0
        and type(lr) is float
        and type(weight_decay) in _Number
        and not group.get("differentiable", False)
    ):
        return None
    params = group["params"]
    grads = [p.grad for p in params]
    # A loop, not `None in grads` (which compares tensors with ==) nor all()
    # over a generator (slower for the usual one or two params).
    for g in grads:
        if g is None:
            return None
    shrink, lo, hi = projection_args
    if torch.compiler.is_compiling():
        # TorchDynamo cannot trace the direct binding below (a graph break
        # per iteration); the op itself it can.
        with torch.no_grad():
            torch.ops.torchiter.sgd_step_(
                params, grads, [], lr, 0.0, 0.0, weight_decay, False, group["maximize"], False, shrink, lo, hi
            )
        # The scheduler's flag is not set here: TorchDynamo before torch 2.13
        # cannot trace an attribute write on an optimizer (at worst a
        # scheduler then warns once).
        return True
    try:
        # The op through a direct binding (same dispatcher path as
        # torch.ops.torchiter.sgd_step_, without its ~2 us of generic
        # argument parsing, more than a small step costs).
        _C._sgd_step_no_momentum(params, grads, lr, weight_decay, group["maximize"], shrink, lo, hi)
    except RuntimeError:
        # Checked before anything is written: the generic step may run.
        return False
    _internals.mark_optimizer_stepped(optimizer)
    return True


def fused_sgd_step(
    optimizer: torch.optim.SGD,
    projection: Optional[Callable] = None,
    projection_args: Optional[ProjectionArgs] = None,
) -> bool:
    """One ``torch.optim.SGD`` step followed by a projection, fused.

    Reads ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``
    and ``maximize`` from every param group at call time (so schedulers are
    honoured), skips params whose ``.grad`` is None for the update (as SGD
    does) and keeps momentum buffers in ``optimizer.state[p]["momentum_buffer"]``
    as SGD does. Params without a gradient are still projected, generically,
    so the result equals ``optimizer.step()`` followed by the projection of
    every param.

    Args:
        optimizer: a ``torch.optim.SGD`` (or a subclass with SGD's step
            semantics); params and grads on one device, float32, float64,
            float16 or bfloat16.
        projection: the callable applied after the step, or None.
        projection_args: ``fused_projection_args(projection)``, if already
            known; must be an expressible projection's args.

    Returns:
        True when the step was done; False, with nothing written, when the
        kernel cannot do it (``differentiable`` groups, tensor-valued options
        other than a 0-dim ``lr``, step hooks, inputs the kernel rejects, such
        as sparse gradients or a device it was not built for). The caller then
        runs ``optimizer.step()`` and the projection itself.
    """
    if projection_args is None:
        projection_args = fused_projection_args(projection)
        if projection_args is None:
            return False
    # The kernel bypasses optimizer.step(), so it must not run where step
    # hooks expect to be called.
    if _internals.optimizer_step_hooks_present(optimizer):
        return False
    done = _single_group_step(optimizer, projection_args)
    if done is not None:
        return done
    calls: List[Tuple[Any, ...]] = []
    new_buffers: List[Tuple[torch.Tensor, torch.Tensor]] = []
    skipped: List[torch.Tensor] = []
    for group in optimizer.param_groups:
        options = _group_options(group)
        if options is None:
            return False
        for call in _init_group(group, optimizer.state, options[1], new_buffers, skipped):
            calls.append((call, options))
    for i, ((params, grads, bufs, first_step), options) in enumerate(calls):
        lr, momentum, dampening, weight_decay, nesterov, maximize = options
        try:
            sgd(
                params, grads, bufs, lr=lr, momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                first_step=first_step, projection_args=projection_args,
            )
        except RuntimeError:
            # The op checks all input before writing, so after a failed first
            # call nothing has changed and the generic step can take over.
            if i == 0:
                return False
            raise
    for p, buf in new_buffers:
        optimizer.state[p]["momentum_buffer"] = buf
    if skipped and projection is not None and projection_args != _NO_PROJECTION:
        project_(skipped, projection)
    # An LR scheduler warns unless it sees optimizer.step() called.
    _internals.mark_optimizer_stepped(optimizer)
    return True


def _torch_sgd_step(optimizer: torch.optim.SGD) -> None:
    # torch.optim.SGD's own step without the hook wrapper that Optimizer
    # patches onto the class (our subclass' step already ran the hooks).
    _internals.unhooked_step(torch.optim.SGD)(optimizer)


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` with an optional projection, stepped by the fused kernel.

    The step equals ``torch.optim.SGD.step()`` followed by
    ``projection(p)`` for every param (to float rounding), in one pass over
    memory when :func:`fused_sgd_step` can do it, otherwise through
    ``torch.optim.SGD``'s own code. Step hooks run once either way.

    Args:
        params: iterable of tensors or param-group dicts, as for any optimizer.
        lr: learning rate (float or 0-dim tensor).
        momentum: momentum factor.
        dampening: dampening for momentum.
        weight_decay: L2 penalty.
        nesterov: enables Nesterov momentum.
        projection: optional callable applied in place to every param after
            each step; :mod:`torchiter.projections` objects, ReLU and
            ``None`` are fused.
        **kwargs: ``maximize``, ``foreach``, ``differentiable``, ``fused``,
            passed to ``torch.optim.SGD``.

    Example:
        >>> y = torch.zeros(8, requires_grad=True)
        >>> opt = SGD([y], lr=0.1, momentum=0.9, projection=torchiter.Clamp(min=0.0))
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        projection: Optional[Callable] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            **kwargs,
        )
        self.projection = projection

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Performs one step, then the projection.

        Args:
            closure: optional closure re-evaluating the loss (run with grad).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not fused_sgd_step(self, self.projection):
            _torch_sgd_step(self)
            if self.projection is not None:
                project_([p for g in self.param_groups for p in g["params"]], self.projection)
        return loss
