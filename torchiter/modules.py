"""Modules whose forward pass is an iteration: ``IterationModule`` and ``IterationLossModule``.

The API is that of the iteration modules of pynsm, the similarity-matching
library these modules come from (https://github.com/Shagesh/pytorch-NSM; see
``docs/iteration-modules.md``): code written for it runs unchanged. The loop is
faster: no host-device synchronisation per iteration, gradients cleared
without the optimizer's profiling wrapper, and, when the optimizer is SGD and
the projection is one the kernel expresses, the step and the projection run
as one ``torchiter.ops.sgd_step_`` call.
"""

import math
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import _internals, _loops
from . import stats as _stats
from .optim import FastStep, fused_sgd_step
from .projections import project_

__all__ = ["IterationModule", "IterationLossModule"]

_HOOK_KINDS = ("pre", "iteration", "post")


# Seed gradients d(loss)/d(loss) = 1, one per (dtype, device), made once.
_ONES: Dict[Any, torch.Tensor] = {}


def _backward(loss: Any, module: nn.Module) -> None:
    """``loss.backward()`` for a scalar loss, without its Python wrapper.

    ``Tensor.backward`` spends about 5 µs in Python (argument handling, a new
    seed gradient) before it reaches the autograd engine, a tenth of a small
    iteration; the engine is called directly with a cached seed. Anything
    unusual (a tensor subclass, a one-element loss) takes ``loss.backward()``
    itself; a loss that is not a scalar tensor differentiable in the iteration
    parameters is an error naming ``iteration_loss``.
    """
    if type(loss) is torch.Tensor and loss.grad_fn is not None and loss.dim() == 0:
        key = (loss.dtype, loss.device)
        one = _ONES.get(key)
        if one is None:
            one = _ONES[key] = torch.ones((), dtype=loss.dtype, device=loss.device)
        _internals.run_backward(loss, one)
        return
    name = f"{type(module).__name__}.iteration_loss()"
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{name} must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name} must return a scalar tensor, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            f"{name} does not depend on the iteration parameters (its result does not "
            "require grad): compute it from the tensors of iteration_parameters()"
        )
    loss.backward()


def _without_graph(x: Any) -> Any:
    """``x`` detached if it is a tensor with an autograd graph, else ``x``."""
    if isinstance(x, torch.Tensor) and x.grad_fn is not None:
        return x.detach()
    return x


def _normal_tensor(x: Any) -> Any:
    """``x``, or a normal copy of it if it is an inference tensor (autograd refuses those)."""
    if isinstance(x, torch.Tensor) and x.is_inference():
        return x.clone()
    return x


def _normal_tensors(xs: Any) -> Any:
    return tuple(_normal_tensor(x) for x in xs)


class _DefaultLr(float):
    """1.0, told apart by identity from a learning rate the caller passed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "1.0"


_DEFAULT_LR = _DefaultLr(1.0)
_OPTIMIZER_ZERO_GRAD = torch.optim.Optimizer.zero_grad
_FUSED_SGD_TYPES = _loops.SGD_TYPES


def _growth_limit(optimizer: Any) -> float:
    """Growth of the change beyond which a loop counts as diverging.

    Plain SGD's projected gradient steps never grow on a convex loss with
    ``lr <= 2/L``. Heavy-ball momentum ``β`` grows them while the velocity
    builds up, by up to ``1/(1−β)``; other optimizers have no such bound, so
    only non-finite values are reported for them.
    """
    if not isinstance(optimizer, _FUSED_SGD_TYPES) or len(optimizer.param_groups) == 0:
        return math.inf
    beta = optimizer.param_groups[0].get("momentum", 0) or 0
    if not isinstance(beta, (int, float)) or not 0 <= beta < 1:
        return math.inf
    return 1.0 if beta == 0 else 2.0 / (1.0 - beta)


def _stats_lr(optimizer: Any) -> Optional[float]:
    """The step size that ``2/L`` applies to: SGD's learning rate, else None."""
    if not isinstance(optimizer, _FUSED_SGD_TYPES):
        return None
    return _stats._lr_of(optimizer)


class _IterationHookHandle:
    """Takes one registered iteration hook off its module.

    Attributes:
        kind: the hook's kind, ``"pre"``, ``"iteration"`` or ``"post"``.
        hook: the registered callable.
    """

    __slots__ = ("_hooks", "kind", "hook")

    def __init__(self, hooks: List[Callable], kind: str, hook: Callable) -> None:
        self._hooks: Optional[List[Callable]] = hooks
        self.kind = kind
        self.hook = hook

    def remove(self) -> None:
        """Removes the hook; calling it again does nothing.

        If the same callable was registered several times, one registration
        is removed per handle.
        """
        hooks, self._hooks = self._hooks, None
        if hooks is None:
            return
        for i, h in enumerate(hooks):
            if h is self.hook:
                del hooks[i]
                return

    def __enter__(self) -> "_IterationHookHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class IterationModule(nn.Module):
    """A module whose forward pass calls ``iteration()`` repeatedly.

    ``forward(*args, **kwargs)`` sets ``iteration_idx = -1``, calls the
    ``"pre"`` hooks and ``pre_iteration(*args, **kwargs)``, then for ``i`` in
    ``0 .. max_iterations - 1`` sets ``iteration_idx = i`` and calls
    ``iteration(*args, **kwargs)``, the ``"iteration"`` hooks (the first
    truthy return ends the loop) and ``converged(*args, **kwargs)`` (truthy
    ends the loop). Finally it returns ``post_iteration(*args, **kwargs)``
    after calling the ``"post"`` hooks.

    Subclasses implement ``iteration()`` and, as needed, ``pre_iteration()``,
    ``post_iteration()`` and ``converged()``.

    Args:
        max_iterations: largest number of ``iteration()`` calls in one
            forward pass, ``>= 0``; 0 runs only pre and post.
        **kwargs: passed to ``nn.Module``.

    Attributes:
        max_iterations: as above.
        hooks: ``{kind: [hook, ...]}`` for the kinds ``"pre"``,
            ``"iteration"`` and ``"post"``.
        iteration_idx: index of the current iteration; -1 before the first.

    Raises:
        ValueError: if ``max_iterations`` is negative.
    """

    def __init__(self, max_iterations: int = 1000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_iterations < 0:
            raise ValueError(
                f"{type(self).__name__}: max_iterations must be >= 0, got {max_iterations}"
            )
        self.max_iterations = max_iterations
        self.hooks: Dict[str, List[Callable]] = defaultdict(list)
        self.iteration_idx = -1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the iteration; returns what ``post_iteration()`` returns.

        All arguments are passed to ``pre_iteration()``, ``iteration()``,
        ``converged()`` and ``post_iteration()``. If anything raises,
        ``_abort_iteration()`` undoes the setup before the error propagates.
        """
        # Plain attribute writes through __dict__ skip nn.Module.__setattr__,
        # which costs about a microsecond per call.
        attrs = self.__dict__
        # One forward at a time per instance: a nested call (from a hook) or
        # a second thread would overwrite the saved flags and optimizer state
        # of the running one. setdefault is atomic under the GIL.
        token = object()
        if attrs.setdefault("_it_running", token) is not token:
            raise RuntimeError(
                f"{type(self).__name__}.forward is already running on this instance (called "
                "again from one of its hooks or iteration methods, or from another thread); "
                "iteration modules keep per-forward state: use one instance per thread "
                "(copy.deepcopy) and do not call forward from inside its own loop"
            )
        try:
            attrs["iteration_idx"] = -1
            self._call_hooks(self.hooks["pre"])
            try:
                self.pre_iteration(*args, **kwargs)
                self._run_iterations(*args, **kwargs)
                retval = self.post_iteration(*args, **kwargs)
            except BaseException:
                self._abort_iteration()
                raise
            self._call_hooks(self.hooks["post"])
            return retval
        finally:
            del attrs["_it_running"]

    def __getstate__(self) -> Dict[str, Any]:
        # A copy made during a forward (by a hook) is a module at rest.
        state = dict(super().__getstate__())
        state.pop("_it_running", None)
        return state

    def _run_iterations(self, *args: Any, **kwargs: Any) -> None:
        """The loop of ``forward``: iteration, hooks, convergence test.

        Subclasses whose whole loop can run in one op (``torchiter.models``)
        override this, and call it when they cannot.
        """
        attrs = self.__dict__
        iteration = self.iteration
        iteration_hooks = self.hooks["iteration"]
        converged = None if type(self).converged is IterationModule.converged else self.converged
        for i in range(self.max_iterations):
            attrs["iteration_idx"] = i
            iteration(*args, **kwargs)
            if iteration_hooks and self._call_hooks(iteration_hooks, check_output=True):
                break
            if converged is not None and converged(*args, **kwargs):
                break

    def _call_hooks(self, hooks: List[Callable], check_output: bool = False) -> bool:
        # A copy, so a hook may remove itself (or others) while running.
        for hook in tuple(hooks):
            if hook(self) and check_output:
                return True
        return False

    def _abort_iteration(self) -> None:
        """Undoes ``pre_iteration()``'s setup after a failure; nothing by default."""

    def iteration(self, *args: Any, **kwargs: Any) -> None:
        """Runs one iteration. Abstract.

        Raises:
            NotImplementedError: always, naming the class.
        """
        raise NotImplementedError(
            f'Module [{type(self).__name__}] is missing the required "iteration" function'
        )

    def converged(self, *args: Any, **kwargs: Any) -> bool:
        """Whether to stop iterating; always False unless overridden."""
        return False

    def pre_iteration(self, *args: Any, **kwargs: Any) -> None:
        """Sets up the iteration; does nothing unless overridden."""

    def post_iteration(self, *args: Any, **kwargs: Any) -> Any:
        """Finishes the iteration and returns forward's result; None unless overridden."""
        return None

    def register_iteration_hook(self, kind: str, hook: Callable) -> _IterationHookHandle:
        """Registers ``hook(module)`` for an event of the iteration.

        Kinds: ``"pre"`` (before ``pre_iteration()``), ``"iteration"`` (after
        every ``iteration()``, before ``converged()``; a truthy return ends
        the loop and skips the later hooks of that round; the index is in
        ``module.iteration_idx``) and ``"post"`` (after ``post_iteration()``).
        Several hooks per kind run in order of registration.

        Args:
            kind: ``"pre"``, ``"iteration"`` or ``"post"``.
            hook: the callable.

        Returns:
            A handle whose ``.remove()`` takes the hook off again.

        Raises:
            ValueError: for any other kind.
        """
        if kind not in _HOOK_KINDS:
            raise ValueError(f"Unknown event type in register_iteration_hook: {kind}")
        hooks = self.hooks[kind]
        hooks.append(hook)
        return _IterationHookHandle(hooks, kind, hook)


class IterationLossModule(IterationModule):
    """An iteration that minimises a loss over some tensors with an optimizer.

    Subclasses implement ``iteration_parameters()`` (the tensors to optimise,
    usually registered buffers so they are saved but not trained by an outer
    optimizer) and either ``iteration_loss(*args, **kwargs)`` (a scalar
    tensor) or an override of ``iteration_set_gradients()``.

    ``pre_iteration()`` builds ``iteration_optimizer(params, **it_optim_kwargs)``
    and, if given, ``iteration_scheduler(optimizer, **it_sched_kwargs)``.
    Each ``iteration()`` sets the gradients, steps the optimizer and the
    scheduler, and projects every iteration parameter in place.

    Fast path: when the optimizer is exactly ``torch.optim.SGD`` or
    :class:`torchiter.optim.SGD` and the projection is None, ``nn.ReLU()``,
    ``F.relu``, ``torch.relu`` or a :mod:`torchiter.projections` object, the
    step and the projection run as one ``torchiter.ops.sgd_step_`` call with the
    optimizer's current options and state. The results equal the generic
    path's to float rounding.

    Args:
        iteration_optimizer: optimizer class or factory
            ``f(params, **it_optim_kwargs)``, e.g. ``torch.optim.SGD``.
        iteration_scheduler: optional scheduler class or factory
            ``f(optimizer, **it_sched_kwargs)``, e.g. ``StepLR``.
        iteration_lr: learning rate. When passed explicitly it overrides
            ``it_optim_kwargs["lr"]``; otherwise that is used if present,
            else 1.0.
        it_optim_kwargs: keyword arguments of the optimizer (copied; the
            caller's dict is not changed).
        it_sched_kwargs: keyword arguments of the scheduler (copied).
        iteration_projection: optional callable ``tensor -> tensor`` applied
            to every iteration parameter after each step; it must keep shape,
            dtype and device.
        fixed_point_gradient: None (the default: forward's result carries no
            gradient) or a :class:`torchiter.implicit.FixedPointGradient`,
            which makes the returned iteration parameters differentiable with
            respect to the module's parameters and inputs (implicitly at the
            fixed point, or through the last iterations); see
            :mod:`torchiter.implicit`. Used only when grad mode is enabled.
        stats_trace: keyword only; also record every iteration's change and
            loss in ``iteration_stats`` (one copy of the state and one
            reduction per iteration, on the device). Off by default.
        divergence: keyword only; what a diverging loop (non-finite state or
            loss, or a change that keeps growing; see
            :class:`torchiter.stats.IterationStats`) does at the end of the
            forward: ``"warn"`` (the default) issues a
            :class:`torchiter.DivergenceWarning` naming the step size and
            ``2/L``, ``"error"`` raises :class:`torchiter.DivergenceError`,
            ``"ignore"`` skips the check (and its one synchronisation).
        **kwargs: passed to :class:`IterationModule` (e.g. ``max_iterations``).

    Attributes:
        it_construct_optim, it_construct_sched: the factories above.
        it_optim_kwargs, it_sched_kwargs: the resolved keyword arguments.
        iteration_optimizer, iteration_scheduler: built in ``pre_iteration()``.
        iteration_projection: the projection.
        last_iteration_loss: the last loss as a Python float (None before
            the first iteration), synchronised only when read.
        iteration_stats: the :class:`torchiter.stats.IterationStats` of the
            last forward (None before the first): iterations run, whether the
            stopping test was met, the last change of the state, its growth,
            traces with ``stats_trace``; tensors on the state's device, read
            lazily.
        stats_trace, divergence: as above.

    Raises:
        ValueError: for an unknown ``divergence``.
    """

    def __init__(
        self,
        iteration_optimizer: Callable = torch.optim.SGD,
        iteration_scheduler: Optional[Callable] = None,
        iteration_lr: float = _DEFAULT_LR,
        it_optim_kwargs: Optional[Dict[str, Any]] = None,
        it_sched_kwargs: Optional[Dict[str, Any]] = None,
        iteration_projection: Optional[Callable] = None,
        fixed_point_gradient: Any = None,
        *,
        stats_trace: bool = False,
        divergence: str = "warn",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fixed_point_gradient = fixed_point_gradient
        self.stats_trace = bool(stats_trace)
        self.divergence = _stats.check_divergence_mode(type(self).__name__, divergence)
        self.iteration_stats: Optional[_stats.IterationStats] = None
        self._fp_pending: Any = None
        self.it_construct_optim = iteration_optimizer
        self.it_construct_sched = iteration_scheduler

        self.it_optim_kwargs = dict(it_optim_kwargs) if it_optim_kwargs is not None else {}
        if iteration_lr is not _DEFAULT_LR:
            self.it_optim_kwargs["lr"] = iteration_lr
        else:
            self.it_optim_kwargs.setdefault("lr", 1.0)
        self.it_sched_kwargs = dict(it_sched_kwargs) if it_sched_kwargs is not None else {}

        self.iteration_optimizer: Any = None
        self.iteration_scheduler: Any = None
        self.iteration_projection = iteration_projection
        self.last_iteration_loss = None
        self._pre_requires_grad_state: List[bool] = []
        # (iteration params, module params) whose flags pre_iteration changed
        # and that still need restoring; None when nothing is pending.
        self._it_restore: Any = None
        # The fused-step plan of this forward, or None.
        self._it_fast: Optional[FastStep] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """As :meth:`IterationModule.forward`; with ``fixed_point_gradient``
        set (and grad mode on) the returned iteration parameters are
        differentiable (see :mod:`torchiter.implicit`). Afterwards
        ``iteration_stats`` describes the loop, and a diverging loop is
        reported as ``divergence`` says.

        Raises:
            DivergenceError: with ``divergence="error"``, when the loop diverged.
        """
        attrs = self.__dict__
        try:
            if attrs.get("fixed_point_gradient") is None or not torch.is_grad_enabled():
                out = super().forward(*args, **kwargs)
            else:
                from . import implicit

                out = implicit.run_forward(self, super().forward, args, kwargs)
        finally:
            # The loop keeps the last loss as autograd returned it (detaching
            # every iteration costs more than a microsecond); between forwards
            # the module holds it without a graph, which would keep the loop's
            # tensors alive and refuses deepcopy.
            attrs["_last_iteration_loss"] = _without_graph(attrs.get("_last_iteration_loss"))
        self._report_divergence(args, kwargs)
        return out

    def _report_divergence(self, args: Tuple, kwargs: Dict[str, Any], readable: bool = False) -> None:
        """Reports this forward's loop as ``divergence`` says, then drops the
        initial state its statistics kept for the step-size hint.

        ``readable``: the loop's statistics are known to be plain CPU or
        device values outside tracing, so the test runs directly and
        ``check_divergence`` is called only to report.
        """
        attrs = self.__dict__
        stats = attrs.get("iteration_stats")
        if stats is None:
            return
        mode = attrs.get("divergence", "warn")
        try:
            if not readable or mode != "ignore" and (mode not in _stats.DIVERGENCE_MODES or stats._any_diverging()):
                _stats.check_divergence(
                    stats, mode, type(self).__name__, lambda: self._divergence_hint(stats, args, kwargs)
                )
        finally:
            stats._initial = None

    def __getstate__(self) -> Dict[str, Any]:
        # A copy made during a forward (by a hook) gets the loss without its graph.
        state = super().__getstate__()
        state["_last_iteration_loss"] = _without_graph(state.get("_last_iteration_loss"))
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Modules pickled by earlier versions kept the optimizer under its own name.
        if "iteration_optimizer" in state:
            state = dict(state)
            state.setdefault("_it_optimizer", state.pop("iteration_optimizer"))
        super().__setstate__(state)

    @property
    def iteration_optimizer(self) -> Any:
        """The optimizer ``pre_iteration()`` built for the last forward (None before it).

        A model's replayed forward (see ``torchiter.models``) never steps its
        optimizer, so there it is built when first read: the same optimizer,
        over the same state."""
        attrs = self.__dict__
        optimizer = attrs.get("_it_optimizer")
        if optimizer is None:
            pending = attrs.get("_it_optim_pending")
            if pending is not None:
                construct, params, kwargs = pending
                optimizer = attrs["_it_optimizer"] = construct(params, **kwargs)
                attrs["_it_optim_pending"] = None
        return optimizer

    @iteration_optimizer.setter
    def iteration_optimizer(self, value: Any) -> None:
        # Stored under another name: TorchDynamo (torch 2.11) reads an
        # instance-dict entry named like a property through the property.
        attrs = self.__dict__
        attrs["_it_optimizer"] = value
        attrs["_it_optim_pending"] = None

    def _divergence_hint(self, stats: "_stats.IterationStats", args: Tuple, kwargs: Dict[str, Any]) -> Optional[str]:
        """The likely cause of a divergence: the step size against ``2/L``.

        ``L`` is estimated by power iteration on Hessian-vector products of
        ``iteration_loss`` at the state before the first iteration (exact for
        a quadratic loss); the state is put back afterwards. Called only once
        divergence has been seen. Subclasses that know their curvature (the
        models) override it.
        """
        initial = stats._initial
        if (
            initial is None
            or type(self).iteration_loss is IterationLossModule.iteration_loss
            or not self._loop_uses_autograd()
        ):
            # No loss, or not the one the loop follows (gradients set by hand).
            return _stats.step_size_hint(stats.lr, None)
        params = [p for p in self.iteration_parameters() if isinstance(p, torch.Tensor) and p.numel() > 0]
        if len(params) != len(initial):
            return _stats.step_size_hint(stats.lr, None)
        finals = [p.detach().clone() for p in params]
        flags = [p.requires_grad for p in params]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                args, kwargs = _normal_tensors(args), {k: _normal_tensor(v) for k, v in kwargs.items()}
                with torch.no_grad():
                    for p, q in zip(params, initial):
                        p.copy_(q)
                for p in params:
                    p.requires_grad_(True)
                L = _stats.estimate_lipschitz_hvp(lambda: self.iteration_loss(*args, **kwargs), params, iters=50)
        except Exception:
            L = None
        finally:
            with torch.no_grad():
                for p, q, flag in zip(params, finals, flags):
                    p.copy_(q)
                    p.requires_grad_(flag)
        return _stats.step_size_hint(stats.lr, L, how="estimated from Hessian-vector products at the start")

    @property
    def last_iteration_loss(self) -> Optional[float]:
        """The last iteration's loss as a Python float, or None.

        The loss is kept as a detached tensor and converted on reading, so
        the loop never waits for the device. Assigning a float, a tensor or
        None also works.
        """
        value = self.__dict__["_last_iteration_loss"]
        if isinstance(value, torch.Tensor):
            value = value.detach().item()
            self.__dict__["_last_iteration_loss"] = value
        return value

    @last_iteration_loss.setter
    def last_iteration_loss(self, value: Union[float, torch.Tensor, None]) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self.__dict__["_last_iteration_loss"] = value

    def iteration_parameters(self) -> List[torch.Tensor]:
        """Returns the tensors optimised by the iteration. Abstract.

        Returns:
            A list of floating leaf tensors (usually buffers), not parameters
            trained by an outer optimizer.

        Raises:
            NotImplementedError: unless overridden, naming the class.
        """
        raise NotImplementedError(
            f"Module [{type(self).__name__}] is missing the required "
            f'"iteration_parameters" function'
        )

    def iteration_loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Returns the loss minimised by the iteration. Abstract.

        Not needed when ``iteration_set_gradients()`` is overridden.

        Returns:
            A scalar tensor, differentiable in the iteration parameters.

        Raises:
            NotImplementedError: unless overridden, naming the class.
        """
        raise NotImplementedError(
            f"Module [{type(self).__name__}] is missing the required "
            f'"iteration_loss" function'
        )

    def iteration_set_gradients(self, *args: Any, **kwargs: Any) -> None:
        """Sets ``.grad`` of the iteration parameters.

        Clears the gradients, runs ``iteration_loss(*args, **kwargs).backward()``
        and records the loss in ``last_iteration_loss``. Override to compute
        gradients by hand.
        """
        optimizer = self.iteration_optimizer
        # getattr: a mock optimizer has zero_grad on the instance only.
        if getattr(type(optimizer), "zero_grad", None) is _OPTIMIZER_ZERO_GRAD:
            # What zero_grad(set_to_none=True) does, without its profiler scope.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        else:
            optimizer.zero_grad()
        loss = self.iteration_loss(*args, **kwargs)
        _backward(loss, self)
        # Kept as is (its graph is already freed by backward): detaching
        # costs more than a microsecond per iteration; reading it converts.
        # A loss that shares memory with the state (a view of it, or the state
        # itself) would change with the step, so that one is copied.
        if loss.is_leaf or _internals.is_view(loss):
            loss = loss.detach().clone()
        self.__dict__["_last_iteration_loss"] = loss

    def iteration(self, *args: Any, **kwargs: Any) -> None:
        """Runs one iteration: gradients, optimizer step, scheduler step, projection."""
        self.iteration_set_gradients(*args, **kwargs)
        attrs = self.__dict__
        optimizer = attrs["_it_optimizer"]
        # A module projection (nn.ReLU()) lives in _modules: reading it there
        # skips nn.Module.__getattr__'s search, once per iteration.
        projection = _internals.module_attr(self, "iteration_projection")
        fast = attrs["_it_fast"]
        if not (
            fast is not None
            and fast.optimizer is optimizer
            and fast.projection is projection
            and fused_sgd_step(optimizer, fast.fused_projection, fast.kernel_args)
        ):
            if fast is not None:
                # Planned but declined (diagnosed after the loop, for path_reason).
                attrs["_it_declined"] = True
            optimizer.step()
            fast = None
        scheduler = self.iteration_scheduler
        if scheduler is not None:
            scheduler.step()
        if projection is not None and (fast is None or fast.fused_projection is None):
            project_(self.iteration_parameters(), projection)

    def _run_iterations(self, *args: Any, **kwargs: Any) -> None:
        """The inner loop: the fastest one this forward may take (see
        :func:`torchiter._loops.run`), recording ``iteration_stats``."""
        _loops.run(self, args, kwargs)

    def _in_loop_modes(self, run: Callable, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        """``run(args, kwargs)`` (the forward's) with the autograd modes a
        loop needs whatever the caller's.

        The loss is differentiated in every iteration, so under
        ``torch.no_grad()`` or ``torch.inference_mode()`` (evaluation code)
        gradients are enabled for the loop alone; inference-tensor inputs are
        then copied to normal tensors for it. Autocast's cache of
        low-precision copies is off during the loop: it would keep serving the
        first iteration's copy of parameters that change in place.
        """
        autocast_cache = torch.is_autocast_cache_enabled()
        if autocast_cache:
            torch.set_autocast_cache_enabled(False)
        try:
            if torch.is_grad_enabled() or not self._loop_uses_autograd():
                return run(args, kwargs)
            if torch.is_inference_mode_enabled():
                with torch.inference_mode(False):
                    args, kwargs = _normal_tensors(args), {k: _normal_tensor(v) for k, v in kwargs.items()}
                    with torch.enable_grad():
                        return run(args, kwargs)
            with torch.enable_grad():
                return run(args, kwargs)
        finally:
            if autocast_cache:
                torch.set_autocast_cache_enabled(True)

    def _stats_recorder(self, total: int, per_call: int = 1) -> "_stats.StatsRecorder":
        """A recorder of this forward's statistics over ``total`` steps."""
        attrs = self.__dict__
        optimizer = attrs.get("_it_optimizer")
        return _stats.StatsRecorder(
            list(self.iteration_parameters()),
            total,
            trace=attrs.get("stats_trace", False),
            keep_initial=attrs.get("divergence", "warn") != "ignore",
            optimizer=optimizer,
            growth_limit=_growth_limit(optimizer),
            per_call=per_call,
        )

    def _eager_loop(self, *args: Any, **kwargs: Any) -> None:
        """:meth:`IterationModule._run_iterations`, recording ``iteration_stats``.

        Without a trace the state is copied before the first, the middle and
        the last two iterations only; when a hook or ``converged()`` may end
        the loop, before every iteration (the last one is not known in
        advance). Divergence is checked once, after the loop (in ``forward``).
        """
        attrs = self.__dict__
        iteration = self.iteration
        iteration_hooks = self.hooks["iteration"]
        converged = None if type(self).converged is IterationModule.converged else self.converged
        total = self.max_iterations
        rec = self._stats_recorder(total)
        wants = rec.wants
        loss_before = rec.loss_seen = attrs.get("_last_iteration_loss")
        lr = _stats_lr(attrs.get("_it_optimizer"))
        stopped = False
        i = -1
        for i in range(total):
            attrs["iteration_idx"] = i
            record = wants(i) or converged is not None or bool(iteration_hooks)
            if record:
                rec.before(i, converged is not None or bool(iteration_hooks))
            iteration(*args, **kwargs)
            if record:
                rec.after(i, attrs.get("_last_iteration_loss"))
            if iteration_hooks and self._call_hooks(iteration_hooks, check_output=True):
                stopped = True
                break
            if converged is not None and converged(*args, **kwargs):
                stopped = True
                break
        loss = attrs.get("_last_iteration_loss")
        stats = attrs["iteration_stats"] = rec.finish(i + 1, stopped, loss if loss is not loss_before else None, lr)
        _loops.stamp(stats, *_loops.eager_path(self, IterationLossModule.iteration))

    def _loop_uses_autograd(self) -> bool:
        # Subclasses that set gradients by hand need no autograd mode.
        return type(self).iteration_set_gradients is IterationLossModule.iteration_set_gradients

    def pre_iteration(self, *args: Any, **kwargs: Any) -> None:
        """Prepares the iteration parameters, the flags and the optimizer.

        Sets ``requires_grad=False`` on every module parameter (recording
        the old flags in ``_pre_requires_grad_state``) and ``True`` on every
        iteration parameter, then builds the optimizer and the scheduler.

        Raises:
            TypeError: if an iteration parameter is not a floating tensor.
            ValueError: if an iteration parameter is not a leaf, or is a
                module parameter with ``requires_grad=True`` (one an outer
                optimizer trains).
        """
        super().pre_iteration(*args, **kwargs)
        # This forward's statistics replace the last one's when the loop ends.
        self.__dict__["iteration_stats"] = None
        params = list(self.iteration_parameters())
        module_params = list(self.parameters())
        self._check_iteration_parameters(params, module_params)

        set_plain = self._set_plain_attribute
        set_plain("_pre_requires_grad_state", [p.requires_grad for p in module_params])
        self.__dict__["_it_restore"] = (params, module_params)
        # Module parameters first: a frozen parameter that is also an
        # iteration parameter must end up requiring grad.
        for p in module_params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)

        optimizer = self.it_construct_optim(params, **self.it_optim_kwargs)
        attrs = self.__dict__
        attrs["_it_optimizer"] = optimizer
        attrs["_it_optim_pending"] = None
        if self.it_construct_sched is not None:
            set_plain("iteration_scheduler", self.it_construct_sched(optimizer, **self.it_sched_kwargs))
        else:
            set_plain("iteration_scheduler", None)
        # The loop's choice, decided once per forward: the fused-step plan, or
        # why the step cannot be fused (iteration_stats.path_reason).
        plan = _loops.fused_step_plan(self, params)
        if isinstance(plan, str):
            attrs["_it_fast"], attrs["_it_fast_reason"] = None, plan
        else:
            attrs["_it_fast"], attrs["_it_fast_reason"] = plan, None
        attrs["_it_declined"] = attrs["_it_loop_reason"] = attrs["_it_compile_reason"] = None

    def _set_plain_attribute(self, name: str, value: Any) -> None:
        # An attribute already stored as a plain one (not a parameter,
        # buffer or submodule) is replaced in __dict__: nn.Module.__setattr__
        # would search its three registries first, a few microseconds per
        # forward. Anything else (a module assigned by a user) takes the
        # normal path.
        attrs = self.__dict__
        if name in attrs and not isinstance(value, (nn.Module, torch.Tensor)):
            attrs[name] = value
        else:
            setattr(self, name, value)

    def post_iteration(self, *args: Any, **kwargs: Any) -> Any:
        """Restores the flags: iteration parameters to ``requires_grad=False``,
        module parameters to what they were before ``pre_iteration()``."""
        self._restore_requires_grad()
        pending = self.__dict__.get("_fp_pending")
        if pending is not None:
            # While the forward's state is still there (subclasses clear it
            # after this call): the differentiable copies of the result.
            pending.attach(self, args, kwargs)
        return super().post_iteration(*args, **kwargs)

    def _abort_iteration(self) -> None:
        self._restore_requires_grad()
        super()._abort_iteration()

    def _restore_requires_grad(self) -> None:
        pending = self.__dict__.get("_it_restore")
        if pending is None:
            return
        params, module_params = pending
        for p in params:
            p.requires_grad_(False)
        for p, old in zip(module_params, self._pre_requires_grad_state):
            p.requires_grad_(old)
        self.__dict__["_it_restore"] = None

    def _check_iteration_parameters(
        self, params: List[torch.Tensor], module_params: List[torch.Tensor]
    ) -> None:
        trained = {id(p) for p in module_params if p.requires_grad}
        name = type(self).__name__
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"{name}.iteration_parameters()[{i}] is a {type(p).__name__}; "
                    "tensors are expected"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"{name}.iteration_parameters()[{i}] has dtype {p.dtype}; "
                    "iteration parameters must be floating tensors"
                )
            if id(p) in trained:
                raise ValueError(
                    f"{name}.iteration_parameters()[{i}] is also a trainable parameter of "
                    "the module (requires_grad=True), so the outer optimizer would train "
                    "it too; register it as a buffer instead"
                )
            if p.is_inference() and (self._loop_uses_autograd() or not torch.is_inference_mode_enabled()):
                raise ValueError(
                    f"{name}.iteration_parameters()[{i}] is an inference tensor (made under "
                    "torch.inference_mode()), which cannot be updated in place outside inference "
                    "mode nor differentiated; create it outside inference mode (e.g. register it "
                    "as a buffer in __init__)"
                )
            if not p.is_leaf:
                raise ValueError(
                    f"{name}.iteration_parameters()[{i}] is not a leaf tensor (it was "
                    "computed from tensors that require grad); detach it or register "
                    "it as a buffer"
                )
