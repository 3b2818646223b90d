"""Which inner loop a forward runs, and why a faster one was not taken.

An :class:`~torchiter.IterationLossModule` forward runs one of four loops,
named in ``iteration_stats.path``:

- ``"quadratic_descent"``: the models' whole loop as one
  ``torchiter.ops.quadratic_descent_ex`` call (``torchiter.models``);
- ``"compiled"``: blocks of iterations compiled by
  ``torchiter.compile_iterations``;
- ``"fused_step"``: the Python loop, each optimizer step and projection one
  ``torchiter.ops.sgd_step_`` call;
- ``"generic"``: the Python loop with ``optimizer.step()`` and the projection
  as written.

The fastest loop a module can have is the whole-loop op for the models, the
compiled loop when ``compile_iterations`` switched it on, and the fused step
otherwise. ``iteration_stats.path_reason`` is None when that one ran, else the
first cause that kept the forward from it, as one sentence. This module holds
every rule that decides it, so the loops ask here and the sentences users
read are written once.

Each loop is a strategy object with one entry point, ``run(module, args,
kwargs)``, that runs the forward's whole inner loop and returns its
``IterationStats`` (None where the loop records none), or :data:`DECLINED`,
having changed nothing, when this loop cannot take the forward; the reason is
then kept for ``path_reason``. :func:`run` tries a module's strategies fastest
first. What is decided once per configuration is cached by the strategies'
owners: a model's plan of the whole-loop op (``torchiter.models``, replayed
while its configuration holds) and the compiled blocks (``compile_iterations``).
"""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from . import _internals
from .optim import _NO_PROJECTION, SGD, FastStep
from .projections import fused_projection_args

QUADRATIC_DESCENT = "quadratic_descent"
COMPILED = "compiled"
FUSED_STEP = "fused_step"
GENERIC = "generic"
PATHS = (QUADRATIC_DESCENT, COMPILED, FUSED_STEP, GENERIC)

# The optimizers whose step the kernels reproduce: torch.optim.SGD itself, not
# subclasses (which may change step()).
SGD_TYPES = (torch.optim.SGD, SGD)

_SGD_NAMES = "torch.optim.SGD or torchiter.optim.SGD"


def _name(obj: Any) -> str:
    return type(obj).__name__


def _projection_name(projection: Any) -> str:
    if isinstance(projection, torch.nn.Module):
        return repr(projection)
    name = getattr(projection, "__name__", None)
    if name is not None and getattr(torch, name, None) is projection:
        return f"torch.{name}"
    return getattr(projection, "__qualname__", None) or _name(projection)


def projection_reason(projection: Any) -> str:
    return (
        f"the projection {_projection_name(projection)} is not one the kernels express "
        "(clamp, ReLU, shrinkage), so it runs as written after each step"
    )


def fused_step_plan(module: Any, params: List[torch.Tensor]) -> Union[FastStep, str]:
    """The fused-step plan of a forward, or why the step cannot be fused.

    Decided once per forward, in ``pre_iteration``, when the optimizer has
    just been made. A plan whose projection the kernel cannot express still
    fuses the step (the projection then runs generically):
    :func:`eager_path` reports that case.
    """
    optimizer = module.iteration_optimizer
    projection = module.iteration_projection
    fused = projection
    if type(optimizer) not in SGD_TYPES:
        return f"the iteration optimizer is {_name(optimizer)}; the fused step takes {_SGD_NAMES}"
    if _internals.optimizer_step_replaced(optimizer):
        return "the iteration optimizer's step() has been replaced, so it runs as written"
    if type(optimizer) is SGD and optimizer.projection is not None:
        if projection is not None:
            return "both iteration_projection and the optimizer's projection are set, so each runs as written"
        fused = optimizer.projection
    args = fused_projection_args(fused)
    if args is None:
        if fused is not projection:
            return projection_reason(fused)
        args, fused = _NO_PROJECTION, None
    # The generic path projects iteration_parameters(); the kernel, the
    # optimizer's params. Fuse only when the two are the same tensors.
    opt_params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(opt_params) != len(params) or {id(p) for p in opt_params} != {id(p) for p in params}:
        return "the iteration optimizer's parameters are not the module's iteration_parameters()"
    return FastStep(optimizer, projection, args, fused)


def fused_step_declined(module: Any, fast: FastStep) -> str:
    """Why a planned fused step fell back to ``optimizer.step()`` mid-loop.

    Diagnosed after the loop, so the loop itself pays nothing for it.
    """
    optimizer = module.__dict__.get("_it_optimizer")
    if optimizer is not fast.optimizer:
        return "the iteration optimizer was replaced during the loop"
    if module.iteration_projection is not fast.projection:
        return "iteration_projection was replaced during the loop"
    if _internals.optimizer_step_hooks_present(optimizer):
        return "the iteration optimizer has step hooks, which the fused step would skip"
    for group in optimizer.param_groups:
        if group.get("differentiable", False):
            return "an optimizer param group is differentiable"
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and (lr.requires_grad or lr.dim() != 0):
            return "the learning rate is a tensor that is not a 0-dim constant"
        for p in group["params"]:
            g = p.grad
            if g is not None and (g.is_sparse or g.layout != torch.strided):
                return "a gradient is sparse; the fused step takes dense gradients"
            if not _internals.has_kernel_for("torchiter::sgd_step_", _dispatch_key(p)):
                return f"the fused step has no kernel for {p.dtype} on {p.device.type}"
            if p.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                return f"the fused step has no kernel for {p.dtype}"
    return "the fused step kernel rejected this step's inputs (mixed devices or dtypes)"


def _dispatch_key(t: torch.Tensor) -> str:
    return {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(t.device.type, t.device.type)


def quadratic_loop_reason(module: Any) -> Optional[str]:
    """Why a model's forward cannot run as one ``quadratic_descent`` call
    (the checks that need no tensors), or None. The loop methods must come
    from the modules in the class's ``_LOOP_MODULES``."""
    if module.hooks["iteration"]:
        return "an 'iteration' hook is registered, so the loop runs one step at a time to call it"
    # The loop methods must be the library's: a user's override of any of
    # them is honoured by running the per-iteration loop.
    cls = type(module)
    for name in ("iteration", "iteration_set_gradients", "converged"):
        if getattr(getattr(cls, name), "__module__", None) not in cls._LOOP_MODULES:
            return f"{cls.__name__} overrides {name}()"
        if name in module.__dict__:
            return f"{name}() is replaced on this {cls.__name__} instance"
    construct = module.it_construct_optim
    if construct not in SGD_TYPES:
        what = getattr(construct, "__name__", None) or _name(construct)
        return f"the iteration optimizer is {what}; the whole-loop op takes {_SGD_NAMES}"
    sched = module.it_construct_sched
    if sched is None:
        return None
    what = getattr(sched, "__name__", None) or _name(sched)
    if not (isinstance(sched, type) and issubclass(sched, torch.optim.lr_scheduler.LRScheduler)):
        return f"the iteration scheduler {what} is not a torch.optim.lr_scheduler.LRScheduler"
    if issubclass(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return "the iteration scheduler is ReduceLROnPlateau, which needs the loss of every iteration"
    return None


def quadratic_args_reason(
    module: Any, fast: Optional[FastStep], state: torch.Tensor, has_kernel: Callable[[torch.Tensor], bool]
) -> Optional[str]:
    """Why this forward's tensors or optimizer settings keep a model off the
    whole-loop op (after :func:`quadratic_loop_reason` passed), or None."""
    attrs = module.__dict__
    if fast is None:
        return attrs.get("_it_fast_reason") or "the optimizer step cannot be fused"
    if fast.projection is not None and fast.fused_projection is None:
        return projection_reason(fast.projection)
    if not has_kernel(state):
        if state.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"the state is {state.dtype}; the whole-loop op runs float32, float64, float16 and bfloat16"
        return f"this build has no quadratic_descent kernel for {state.device.type}"
    groups = module.iteration_optimizer.param_groups
    if len(groups) != 1:
        return f"the iteration optimizer has {len(groups)} param groups; the whole-loop op takes one"
    group = groups[0]
    if group["momentum"] != 0:
        return f"the iteration optimizer has momentum {group['momentum']}; the whole-loop op runs plain SGD"
    if group.get("differentiable", False):
        return "the optimizer's param group is differentiable"
    return None


def eager_path(module: Any, base_iteration: Callable) -> Tuple[str, Optional[str]]:
    """``(path, path_reason)`` of a forward that ran the Python loop
    (``base_iteration``: ``IterationLossModule.iteration``)."""
    attrs = module.__dict__
    fast = attrs.get("_it_fast")
    own_iteration = "iteration" in attrs or type(module).iteration is not base_iteration
    if own_iteration or fast is None or attrs.get("_it_declined"):
        path = GENERIC
    else:
        path = FUSED_STEP
    # A model's or a compiled loop's reason comes first: the faster loop it
    # names was the one the module could have had.
    reason = attrs.get("_it_loop_reason") or attrs.get("_it_compile_reason")
    if reason is None:
        if own_iteration:
            reason = f"{type(module).__name__} overrides iteration()"
        elif fast is None:
            reason = attrs.get("_it_fast_reason")
        elif attrs.get("_it_declined"):
            reason = fused_step_declined(module, fast)
        elif fast.projection is not None and fast.fused_projection is None:
            reason = projection_reason(fast.projection)
    return path, reason


class _Declined:
    def __repr__(self) -> str:
        return "DECLINED"


#: What a strategy's ``run`` returns when its loop cannot take the forward.
DECLINED: Any = _Declined()


class Strategy:
    """One inner loop. Subclasses set ``path`` and implement :meth:`run`."""

    path = ""
    # Whether the loop differentiates the loss, and so needs the autograd
    # modes IterationLossModule._in_loop_modes sets up.
    uses_autograd = True

    def run(self, module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """Runs the forward's whole inner loop; returns its ``IterationStats``
        (or None), or :data:`DECLINED` with nothing changed."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<torchiter loop strategy {self.path!r}>"


class QuadraticDescentLoop(Strategy):
    """A model's whole loop as one ``quadratic_descent_ex`` call
    (``torchiter.models``: modules with ``_fused_loop_args`` and
    ``_run_fused_loop``, whose loop methods come from ``module._LOOP_MODULES``)."""

    path = QUADRATIC_DESCENT
    uses_autograd = False

    def run(self, module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        reason = quadratic_loop_reason(module)
        if reason is None:
            fused = module._fused_loop_args()
            if not isinstance(fused, str):
                module._run_fused_loop(*fused)
                return module.__dict__.get("iteration_stats")
            reason = fused
        # The per-iteration loop runs; its statistics name this reason.
        module.__dict__["_it_loop_reason"] = reason
        return DECLINED


class CompiledLoop(Strategy):
    """Blocks of iterations compiled by ``torchiter.compile_iterations``."""

    path = COMPILED

    def run(self, module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        compiled = module.__dict__.get("_it_compiled")
        if compiled is None or not compiled.run(module, args, kwargs):
            return DECLINED
        return module.__dict__.get("iteration_stats")


class EagerLoop(Strategy):
    """The Python loop: ``fused_step`` while the forward's fused-step plan
    holds at every step, else ``generic`` (decided step by step, named after
    the loop by :func:`eager_path`). It takes every forward."""

    path = FUSED_STEP

    def run(self, module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        module._eager_loop(*args, **kwargs)
        return module.__dict__.get("iteration_stats")


QUADRATIC_DESCENT_LOOP = QuadraticDescentLoop()
COMPILED_LOOP = CompiledLoop()
EAGER_LOOP = EagerLoop()


def strategies(module: Any) -> Tuple[Strategy, ...]:
    """The loops ``module``'s forward may take, fastest first; the last takes any forward."""
    if getattr(type(module), "_LOOP_MODULES", None) is not None:
        return (QUADRATIC_DESCENT_LOOP, COMPILED_LOOP, EAGER_LOOP)
    return (COMPILED_LOOP, EAGER_LOOP)


def run(module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """Runs a forward's inner loop: the first of ``module``'s strategies that
    takes it, those that differentiate the loss under the autograd modes of
    ``module._in_loop_modes``. Returns the forward's ``IterationStats`` (or None)."""
    todo = strategies(module)
    while not todo[0].uses_autograd:
        out = todo[0].run(module, args, kwargs)
        if out is not DECLINED:
            return out
        todo = todo[1:]

    def run_first(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        for strategy in todo:
            out = strategy.run(module, args, kwargs)
            if out is not DECLINED:
                return out
        raise AssertionError("the eager loop takes every forward")

    return module._in_loop_modes(run_first, args, kwargs)


def stamp(stats: Any, path: str, reason: Optional[str]) -> None:
    if stats is not None:
        stats.path = path
        stats.path_reason = reason
