"""Compiled iterations: the inner loop of a user's ``iteration_loss`` without Python or autograd.

:func:`compile_iterations` switches an :class:`~torchiter.IterationLossModule`
to a loop in which the gradient of ``iteration_loss`` with respect to the
iteration parameters is taken functionally (``torch.func.grad_and_value`` over
``torch.func.functional_call``), and that gradient, the SGD update and the
projection of one or several iterations run as one ``torch.compile``'d
function (``fullgraph=True``). Anything that cannot be compiled falls back to
the module's eager loop, with one warning naming the reason.
"""

import itertools
import types
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import _internals, _loops
from .modules import IterationLossModule, IterationModule, _stats_lr
from .optim import SGD

__all__ = ["compile_iterations", "CompiledIterationsWarning"]

_SGD_TYPES = _loops.SGD_TYPES
# Compiled variants one module may build (shapes, dtypes, devices, options,
# iterations per call) before it stays on the eager loop.
MAX_COMPILATIONS = 8
# Iterations per compiled call when chosen automatically: enough to make the
# per-call overhead small, few enough to keep compilation (the loop is
# unrolled) to seconds.
_AUTO_MAX_K = 10
# Iteration-parameter elements below which the compiled CPU code is serial.
_PARALLEL_MIN_NUMEL = 1 << 16
_BLOCK_IDS = itertools.count()


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own.

    TorchDynamo keeps its compiled variants per code object, at most
    ``recompile_limit`` (8 by default) of them, and with ``fullgraph=True``
    one more is an error. Every block of every module is a closure of the
    same ``run``: without this, the ninth block compiled in a process (other
    modules, shapes or ``k``) would fail instead of compiling.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}_block{next(_BLOCK_IDS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class CompiledIterationsWarning(UserWarning):
    """A module switched to compiled iterations runs a forward pass on the eager loop."""


class _Untraceable(Exception):
    """Raised while tracing when the loss cannot be compiled faithfully."""


class _LossCall(nn.Module):
    """``module.iteration_loss`` as a forward, so ``functional_call`` can substitute tensors."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        # Not a registered submodule of the module itself: the wrapper holds it.
        self.inner = module

    def forward(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> torch.Tensor:
        return self.inner.iteration_loss(*args, **kwargs)


def _sgd_update(p, g, buf, fresh, lr, opts):
    """``torch.optim.SGD``'s update of one param, out of place; returns (p, buf)."""
    momentum, dampening, weight_decay, nesterov, maximize = opts
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if momentum != 0:
        step = buf.mul(momentum).add(g, alpha=1 - dampening)
        # SGD starts the buffer as a copy of the gradient.
        buf = step if fresh is None else torch.where(fresh, g, step)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    return p - lr * g, buf


def _signature(values: Any) -> Tuple:
    """What a compiled variant is specialised on: tensor metadata, other values' types."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((tuple(v.shape), v.stride(), v.dtype, v.device, v.requires_grad))
        else:
            out.append(type(v))
    return tuple(out)


def _overrides_converged(module: nn.Module) -> bool:
    return type(module).converged is not IterationModule.converged or "converged" in module.__dict__


class _Plan:
    """What one forward's compiled loop needs, derived from the module and its optimizer."""

    __slots__ = ("names", "params", "groups", "opts", "projections", "momentum")


class _CompiledIterations:
    """The compiled-iteration state of one module: options, cache, counters.

    Attributes:
        iterations_per_call: k requested, or None (chosen per forward).
        compilations: compiled variants built so far (each a graph compile).
        fallbacks: forwards run on the eager loop.
    """

    def __init__(self, iterations_per_call: Optional[int]) -> None:
        self.iterations_per_call = iterations_per_call
        self.compilations = 0
        self.fallbacks = 0
        self._cache: Dict[Any, "_Entry"] = {}
        self._warned: set = set()
        self._wrapper: Optional[_LossCall] = None
        # (k, groups, device, dtype) -> (rates, the tensor holding them)
        self._lr_buffers: Dict[Any, Tuple[Tuple, torch.Tensor]] = {}

    def __getstate__(self) -> Dict[str, Any]:
        # A copy (deepcopy, pickle) is switched on too, with nothing compiled.
        return {"iterations_per_call": self.iterations_per_call}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["iterations_per_call"])  # type: ignore[misc]

    # ----------------------------------------------------------------- fallback

    def fallback(self, module: IterationLossModule, reason: str) -> bool:
        self.fallbacks += 1
        # The same words as the warning, for iteration_stats.path_reason.
        module.__dict__["_it_compile_reason"] = f"compiled iterations fall back to the eager loop: {reason}"
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"{type(module).__name__}: compiled iterations fall back to the eager loop: {reason}",
                CompiledIterationsWarning,
                stacklevel=5,
            )
        return False

    # ----------------------------------------------------------------- the plan

    def plan(self, module: IterationLossModule, args: Tuple, kwargs: Dict) -> Any:
        """A :class:`_Plan`, or a string naming why this forward cannot be compiled."""
        cls = type(module)
        for name in ("iteration", "iteration_set_gradients"):
            if getattr(cls, name) is not getattr(IterationLossModule, name) or name in module.__dict__:
                return f"{cls.__name__} overrides {name}()"
        if torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu"):
            return "autocast is enabled"
        optimizer = module.iteration_optimizer
        if type(optimizer) not in _SGD_TYPES:
            return f"the optimizer is {type(optimizer).__name__}; only torch.optim.SGD and torchiter.SGD are compiled"
        if not _internals.optimizer_step_is_plain(optimizer):
            return "optimizer.step has been replaced or has step hooks"
        for values in (args, kwargs.values()):
            for a in values:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return (
                        "an argument requires grad (the eager loop's backward() would also "
                        "accumulate gradients into its graph)"
                    )
        params = list(module.iteration_parameters())
        named: Dict[int, str] = {}
        for name, t in list(module.named_buffers(remove_duplicate=False)) + list(
            module.named_parameters(remove_duplicate=False)
        ):
            named.setdefault(id(t), name)
        names = []
        for i, p in enumerate(params):
            name = named.get(id(p))
            if name is None:
                return (
                    f"iteration_parameters()[{i}] is not a registered buffer or parameter of the "
                    "module (functional_call substitutes tensors by name)"
                )
            names.append("inner." + name)
        index = {id(p): i for i, p in enumerate(params)}
        groups: List[List[int]] = []
        opts = []
        for group in optimizer.param_groups:
            if group.get("differentiable", False):
                return "an optimizer param group is differentiable"
            o = (group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"], group["maximize"])
            if not all(isinstance(v, (int, float)) for v in o[:3]):
                return "an optimizer option other than lr is a tensor"
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and (lr.requires_grad or lr.dim() != 0):
                return "the learning rate is a tensor that is not a 0-dim constant"
            ids = []
            for p in group["params"]:
                if id(p) not in index:
                    return "the optimizer's params are not the iteration parameters"
                ids.append(index[id(p)])
            groups.append(ids)
            opts.append(tuple(float(v) if not isinstance(v, bool) else v for v in o))
        if sorted(i for g in groups for i in g) != list(range(len(params))):
            return "the optimizer's params are not the iteration parameters"
        projections = []
        if type(optimizer) is SGD and optimizer.projection is not None:
            projections.append(optimizer.projection)
        projection = module.iteration_projection
        if projection is not None:
            projections.append(projection)
        plan = _Plan()
        plan.names = names
        plan.params = params
        plan.groups = groups
        plan.opts = tuple(opts)
        plan.projections = tuple(projections)
        plan.momentum = any(o[0] != 0 for o in opts)
        return plan

    # ----------------------------------------------------------------- the compiled block

    def block(self, module: IterationLossModule, plan: _Plan, k: int, args: Tuple, kwargs: Dict) -> "_Entry":
        key = (
            k,
            plan.opts,
            tuple(map(tuple, plan.groups)),
            tuple(plan.names),
            tuple(id(f) for f in plan.projections),
            _signature(plan.params),
            _signature(args),
            _signature(tuple(kwargs.values())),
            tuple(kwargs),
        )
        entry = self._cache.get(key)
        if entry is not None:
            if entry.failed is not None:
                raise _Untraceable(entry.failed)
            return entry
        if len(self._cache) >= MAX_COMPILATIONS:
            raise _Untraceable(
                f"{MAX_COMPILATIONS} compiled variants exist already (shapes, dtypes, devices or "
                "options keep changing)"
            )
        if self._wrapper is None or self._wrapper.inner is not module:
            self._wrapper = _LossCall(module)
        wrapper = self._wrapper
        names = plan.names
        groups = plan.groups
        opts = plan.opts
        projections = plan.projections
        n = len(names)

        def loss_of(values, args, kwargs):
            return torch.func.functional_call(wrapper, dict(zip(names, values)), (args, kwargs), strict=False)

        grad_and_loss = torch.func.grad_and_value(loss_of)

        def run(params, bufs, fresh, lrs, args, kwargs):
            values = list(params)
            new_bufs = list(bufs)
            loss = None
            for j in range(k):
                grads, loss = grad_and_loss(tuple(values), args, kwargs)
                for gi, ids in enumerate(groups):
                    lr = lrs[j, gi]
                    for i in ids:
                        values[i], new_bufs[i] = _sgd_update(
                            values[i], grads[i], new_bufs[i], fresh if j == 0 else None, lr, opts[gi]
                        )
                for proj in projections:
                    for i in range(n):
                        out = proj(values[i])
                        if not isinstance(out, torch.Tensor) or out.shape != values[i].shape or out.dtype != values[i].dtype:
                            # The eager loop names the problem (project_ checks it).
                            raise _Untraceable("the projection changes shape or dtype")
                        values[i] = out
            if cuda_graph:
                # A CUDA graph replays only graphs that do not write their
                # inputs: the caller copies the results back.
                return loss, tuple(values), tuple(b for b in new_bufs if b is not None)
            # Written back once per call; the graph in between is functional.
            for p, v in zip(params, values):
                p.copy_(v)
            for b, v in zip(bufs, new_bufs):
                if b is not None:
                    b.copy_(v)
            return loss

        cuda_graph = plan.params[0].device.type == "cuda"
        backend = self._counting_backend(plan, cuda_graph)
        entry = _Entry(torch.compile(_own_code(run), fullgraph=True, dynamic=False, backend=backend), cuda_graph)
        self._cache[key] = entry
        return entry

    def _counting_backend(self, plan: _Plan, cuda_graph: bool) -> Callable:
        numel = sum(p.numel() for p in plan.params)
        # Small states run each kernel on one thread: a parallel region costs
        # more than the work of a few thousand elements, and on a busy machine
        # it waits for every thread, every kernel (measured: 100x slower
        # forwards at state 4096 with 2 threads beside other jobs).
        threads = 1 if numel < _PARALLEL_MIN_NUMEL else None
        inductor = _internals.inductor_backend(cuda_graphs=cuda_graph, cpu_threads=threads)
        storages = [p.untyped_storage().data_ptr() for p in plan.params]

        def backend(gm, example_inputs):
            # The loss must read each iteration parameter through its registered
            # name only; a second alias (a view kept in an attribute) would be a
            # constant to the functional gradient and give a wrong result.
            seen = [0] * len(storages)
            for t in example_inputs:
                if isinstance(t, torch.Tensor):
                    try:
                        ptr = t.untyped_storage().data_ptr()
                    except (RuntimeError, NotImplementedError):
                        continue
                    for i, s in enumerate(storages):
                        if ptr == s:
                            seen[i] += 1
            for i, c in enumerate(seen):
                if c > 1:
                    raise _Untraceable(
                        f"iteration_loss reads iteration parameter {i} other than through its "
                        f"registered name ({plan.names[i][len('inner.'):]})"
                    )
            if self.compilations >= MAX_COMPILATIONS:
                raise _Untraceable(
                    f"{MAX_COMPILATIONS} graphs were compiled already (shapes, dtypes, devices or "
                    "module attributes keep changing)"
                )
            self.compilations += 1
            return inductor(gm, example_inputs)

        return backend

    # ----------------------------------------------------------------- the loop

    def run(self, module: IterationLossModule, args: Tuple, kwargs: Dict) -> bool:
        """Runs the forward's iterations compiled; False (nothing run) to take the eager loop."""
        if module.max_iterations == 0:
            return False
        plan = self.plan(module, args, kwargs)
        if isinstance(plan, str):
            return self.fallback(module, plan)
        per_iteration = bool(module.hooks["iteration"]) or _overrides_converged(module)
        scheduler = module.iteration_scheduler
        if per_iteration or (scheduler is not None and not _internals.scheduler_is_precomputable(scheduler)):
            k = 1
        else:
            k = self._choose_k(module.max_iterations)
        return self._loop(module, plan, k, per_iteration, args, kwargs)

    def _choose_k(self, max_iterations: int) -> int:
        if self.iterations_per_call is not None:
            return min(self.iterations_per_call, max_iterations)
        best = max(d for d in range(1, _AUTO_MAX_K + 1) if max_iterations % d == 0)
        if best * 2 <= _AUTO_MAX_K and max_iterations > _AUTO_MAX_K:
            # No good divisor: blocks of the maximum, one compiled remainder.
            return _AUTO_MAX_K
        return best

    def _loop(self, module, plan, k, per_iteration, args, kwargs) -> bool:
        attrs = module.__dict__
        optimizer = module.iteration_optimizer
        scheduler = module.iteration_scheduler
        param_groups = optimizer.param_groups
        detached = [p.detach() for p in plan.params]
        device = detached[0].device if detached else torch.device("cpu")
        dtype = detached[0].dtype if detached else torch.float32
        state = optimizer.state
        bufs: List[Any] = [None] * len(detached)
        fresh = None
        created: List[torch.Tensor] = []
        if plan.momentum:
            missing = [state[p].get("momentum_buffer") is None for p in plan.params]
            if any(missing) and not all(missing):
                return self.fallback(module, "some momentum buffers exist and others do not")
            for p, m in zip(plan.params, missing):
                if m:
                    state[p]["momentum_buffer"] = torch.zeros_like(p)
                    created.append(p)
            bufs = [state[p]["momentum_buffer"].detach() for p in plan.params]
            fresh = torch.tensor(bool(created), device=device)
        total = module.max_iterations
        hooks = module.hooks["iteration"]
        converged = module.converged if _overrides_converged(module) else None
        # Per forward: the variant and, when nothing can change them between
        # calls (no scheduler, no Python between iterations), the rates, per
        # iteration count (at most two: k and the remainder).
        entries: Dict[int, _Entry] = {}
        fixed_lrs: Dict[int, torch.Tensor] = {}
        # Statistics per compiled call (k iterations): the state between the
        # iterations of a call is never materialised.
        calls = -(-total // k)
        rec = module._stats_recorder(calls, per_call=k)
        lr0 = _stats_lr(optimizer)
        loss_before = rec.loss_seen = attrs.get("_last_iteration_loss")
        stopped = False
        call = 0
        i = 0
        while i < total:
            kk = min(k, total - i)
            record = per_iteration or rec.wants(call)
            if record:
                rec.before(call, per_iteration)
            try:
                entry = entries.get(kk)
                if entry is None:
                    entry = entries[kk] = self.block(module, plan, kk, args, kwargs)
            except _Untraceable as e:
                return self._eager_rest(module, plan, i, created, str(e), args, kwargs)
            snapshot = None
            if not entry.ready and scheduler is not None:
                snapshot = (scheduler.state_dict(), [g["lr"] for g in param_groups])
            lrs = fixed_lrs.get(kk)
            if lrs is None:
                lrs = self._learning_rates(param_groups, scheduler, optimizer, kk, device, dtype)
                if scheduler is None and not per_iteration:
                    fixed_lrs[kk] = lrs
            try:
                with torch.no_grad():
                    loss = entry.fn(detached, bufs, fresh, lrs, args, kwargs)
                    if entry.cuda_graph:
                        # The replayed graph's outputs live in its static
                        # memory, overwritten by the next replay.
                        loss, values, new_bufs = loss
                        for p, v in zip(detached, values):
                            p.copy_(v)
                        for b, v in zip([b for b in bufs if b is not None], new_bufs):
                            b.copy_(v)
                        loss = loss.clone()
            except Exception as e:
                reason = _internals.compile_error_reason(e, _Untraceable)
                if reason is None or entry.ready:
                    raise
                if snapshot is not None:
                    scheduler.load_state_dict(snapshot[0])
                    for g, lr in zip(param_groups, snapshot[1]):
                        g["lr"] = lr
                entry.failed = reason
                return self._eager_rest(module, plan, i, created, reason, args, kwargs)
            entry.ready = True
            if fresh is not None and i == 0:
                fresh.fill_(False)
            attrs["_last_iteration_loss"] = loss
            attrs["iteration_idx"] = i + kk - 1
            if record:
                rec.after(call, loss)
            i += kk
            call += 1
            if per_iteration:
                if hooks and module._call_hooks(hooks, check_output=True):
                    stopped = True
                    break
                if converged is not None:
                    with torch.enable_grad():
                        if converged(*args, **kwargs):
                            stopped = True
                            break
        stats = rec.finish(call, stopped, loss if loss is not loss_before else None, lr0)
        # The last call may be a shorter remainder.
        stats.iterations.fill_(i)
        _loops.stamp(stats, _loops.COMPILED, attrs.get("_it_loop_reason"))
        attrs["iteration_stats"] = stats
        return True

    def _eager_rest(self, module, plan, start, created, reason, args, kwargs) -> bool:
        """Falls back; when iterations already ran compiled, runs the rest eagerly here."""
        self.fallback(module, reason)
        if start == 0:
            state = module.iteration_optimizer.state
            for p in created:
                del state[p]["momentum_buffer"]
            return False
        # Only blocks of several iterations get here (no hooks, default converged()).
        attrs = module.__dict__
        with torch.enable_grad():
            for j in range(start, module.max_iterations):
                attrs["iteration_idx"] = j
                module.iteration(*args, **kwargs)
        return True

    def _learning_rates(self, groups, scheduler, optimizer, k, device, dtype) -> torch.Tensor:
        """The (k, groups) learning rates of the next k steps; steps the scheduler k times.

        One tensor per (k, groups, device, dtype), refilled only when the rates
        change, so a constant rate costs no copy and a scheduled one never
        recompiles.
        """
        rows = []
        for _ in range(k):
            rows.append(tuple(float(g["lr"]) for g in groups))
            if scheduler is not None:
                _internals.mark_optimizer_stepped(optimizer)
                scheduler.step()
        rows_t = tuple(rows)
        key = (k, len(groups), device, dtype)
        cached = self._lr_buffers.get(key)
        if cached is None or cached[0] != rows_t:
            t = torch.tensor(rows, dtype=dtype)
            if device.type == "cuda":
                # Pinned and asynchronous: no host synchronisation in the loop
                # (the caching host allocator keeps the page until the copy ran).
                t = t.pin_memory().to(device, non_blocking=True)
            else:
                t = t.to(device)
            if cached is None:
                self._lr_buffers[key] = (rows_t, t)
            else:
                cached[1].copy_(t)
                self._lr_buffers[key] = (rows_t, cached[1])
        return self._lr_buffers[key][1]


class _Entry:
    """One compiled variant: the function, whether it has run, why it failed."""

    __slots__ = ("fn", "cuda_graph", "ready", "failed")

    def __init__(self, fn: Callable, cuda_graph: bool) -> None:
        self.fn = fn
        self.cuda_graph = cuda_graph
        self.ready = False
        self.failed: Optional[str] = None


class CompiledIterationsInfo(NamedTuple):
    """What :func:`compile_iterations` has done for a module so far.

    Attributes:
        iterations_per_call: the ``iterations_per_call`` asked for, or None
            (chosen per forward).
        compilations: compiled variants built (each one graph compilation;
            a count that keeps growing means shapes, dtypes or options that
            keep changing).
        fallbacks: forwards that ran the eager loop instead (each reason is
            warned once and named in ``iteration_stats.path_reason``).
    """

    iterations_per_call: Optional[int]
    compilations: int
    fallbacks: int


def compiled_iterations_info(module: nn.Module) -> Optional[CompiledIterationsInfo]:
    """The counters of ``module``'s compiled iterations, or None when
    :func:`compile_iterations` has not switched it on. A copy (deepcopy,
    pickle) starts from zero: it compiles its own."""
    state = module.__dict__.get("_it_compiled")
    if state is None:
        return None
    return CompiledIterationsInfo(state.iterations_per_call, state.compilations, state.fallbacks)


def compile_iterations(module: IterationLossModule, *, iterations_per_call: Optional[int] = None) -> IterationLossModule:
    """Switches ``module`` to compiled iterations, in place; returns it.

    Each forward then computes the gradient of ``iteration_loss`` with respect
    to the iteration parameters functionally and runs the gradient, the SGD
    update (every ``torch.optim.SGD`` option; a scheduler's learning rates as a
    tensor, so they never cause a recompilation) and the projection as one
    ``torch.compile(fullgraph=True)`` function, cached per shape, dtype and
    device. With no ``"iteration"`` hooks and the default ``converged()``,
    ``k`` iterations run per compiled call; otherwise one, with the hooks and
    ``converged()`` called between calls as on the eager loop.

    Whatever cannot be compiled (an optimizer other than SGD, an override of
    ``iteration()``, a loss with Python control flow on tensor values or side
    effects, more than ``MAX_COMPILATIONS`` variants) runs the eager
    loop instead, with one :class:`CompiledIterationsWarning` naming the reason.

    Args:
        module: an :class:`~torchiter.IterationLossModule` (subclass) instance.
        iterations_per_call: iterations per compiled call, ``>= 1``; None picks
            the largest divisor of ``max_iterations`` up to 10 (or 10 with one
            compiled remainder when that divisor is small).

    Returns:
        ``module``.

    Raises:
        TypeError: if ``module`` is not an ``IterationLossModule``.
        ValueError: if ``iterations_per_call`` is not a positive integer.
    """
    if not isinstance(module, IterationLossModule):
        raise TypeError(f"compile_iterations: module must be an IterationLossModule, got {type(module).__name__}")
    if iterations_per_call is not None and (
        not isinstance(iterations_per_call, int) or isinstance(iterations_per_call, bool) or iterations_per_call < 1
    ):
        raise ValueError(f"compile_iterations: iterations_per_call must be an integer >= 1, got {iterations_per_call!r}")
    module.__dict__["_it_compiled"] = _CompiledIterations(iterations_per_call)
    return module
