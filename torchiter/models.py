"""Similarity-matching and sparse-coding networks on the iteration modules.

Each model's inner loop is projected gradient descent on a quadratic,
``y ← project(y − lr·(A·y − b))``, so when nothing forbids it the whole loop
runs as one ``torch.ops.torchiter.quadratic_descent`` call. It falls back to
the per-iteration path (one fused SGD step per iteration) when an iteration
hook is registered, a subclass overrides the loop, the optimizer is not a
momentum-free SGD, the projection is not one the op expresses, or the dtype or
device has no kernel. Both paths give the same results to float rounding.
After a forward, ``iteration_stats.path`` names the loop that ran and
``iteration_stats.path_reason`` why it was not the whole-loop op.

With ``fixed_point_gradient=FixedPointGradient(...)`` (see
:mod:`torchiter.implicit`) the returned state is differentiable in the
model's parameters and inputs, through ``quadratic_descent``'s implicit
backward at the fixed point (or through the last iterations, unrolled).

See ``docs/models.md`` for the definitions.
"""

import functools
import math
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _internals, _loops
from . import stats as _stats
from ._internals import active_ddp_module
from .modules import IterationLossModule, _without_graph
from .projections import SoftThreshold, fused_projection_args

__all__ = ["MultiSimilarityMatching", "SimilarityMatching", "SupervisedSimilarityMatching", "SparseCoding", "TrainingLoss"]

_REGULARIZATIONS = ("weight", "whiten", "none")


def _mix(A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``A·y`` along dim 1: A (C, C), y (B, C, *spatial)."""
    return torch.einsum("ij,bj...->bi...", A, y)


def _gram(y: torch.Tensor) -> torch.Tensor:
    """``Σ yᵢ yⱼ`` over the batch and spatial positions: y (B, C, *spatial) -> (C, C)."""
    B, C = y.shape[0], y.shape[1]
    positions = y.numel() // (B * C)
    if positions > C:
        # Per-sample Grams (B, C, C) are smaller than y, and a batched product
        # needs no transposed copy of y.
        y3 = y.reshape(B, C, positions)
        return torch.bmm(y3, y3.transpose(1, 2)).sum(0)
    # Without spatial dims this is a view: yᵀ·y straight from y.
    yt = y.transpose(0, 1).reshape(C, -1)
    return yt @ yt.T


class _SimilarityFit(torch.autograd.Function):
    """``2·Σ y⊙(M·y) − 4·Σ y⊙Wx`` for an output ``y`` without a graph.

    Computed as ``2·⟨M, G⟩ − 4·⟨y, Wx⟩`` with ``G = Σ y yᵀ``: the one
    ``C × C × y.numel()`` product gives both the value and ``M``'s gradient
    (``2·G``), where autograd through ``M·y`` would run a second one in the
    backward. ``Wx``'s gradient is ``−4·y``. ``G`` is a second, non-differentiable
    output so that ``setup_context`` can keep it: torch.func's transforms need
    that form.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(M: torch.Tensor, y: torch.Tensor, Wx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        G = _gram(y)
        return 2 * (M * G).sum() - 4 * torch.dot(y.reshape(-1), Wx.reshape(-1)), G

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[torch.Tensor, ...], output: Tuple[torch.Tensor, torch.Tensor]) -> None:
        G = output[1]
        ctx.mark_non_differentiable(G)
        ctx.save_for_backward(G, inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_G: Any) -> Tuple[Optional[torch.Tensor], None, Optional[torch.Tensor]]:
        G, y = ctx.saved_tensors
        grad_M = (2 * grad) * G if ctx.needs_input_grad[0] else None
        grad_Wx = (-4 * grad) * y if ctx.needs_input_grad[2] else None
        return grad_M, None, grad_Wx


def _detached(t: torch.Tensor) -> torch.Tensor:
    # Testing the flag costs a tenth of a detach.
    return t.detach() if t.requires_grad else t


def _has_kernel(y: torch.Tensor) -> bool:
    if y.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return False
    if y.device.type == "cpu":
        return True
    key = {"cuda": "CUDA"}.get(y.device.type)
    return key is not None and _internals.has_kernel_for("torchiter::quadratic_descent", key)


def _check_tol(owner: str, tol: Any) -> float:
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0 or math.isinf(tol):
        raise ValueError(f"{owner}: tol must be a finite number >= 0 (0 disables the stop test), got {tol!r}")
    return float(tol)


def _check_positive(owner: str, name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_nonempty(owner: str, y: torch.Tensor) -> None:
    if y.numel() == 0:
        raise ValueError(f"{owner}: the batch is empty (y has shape {tuple(y.shape)}); the loss of no samples is undefined")


# Up to this many elements the statistics keep the loop's result to compute
# its noise floor when read (256 KiB in float32); larger ones compute it at
# once, which costs little next to their loop and holds no second copy.
_LAZY_NOISE_NUMEL = 1 << 16


def _noise(y: torch.Tensor) -> torch.Tensor:
    """A change below this is float rounding of ``y`` (0-dim, on ``y``'s device)."""
    return _stats.noise_floor([y], y.dtype)


class _ScaleGrad:
    """Tensor hook multiplying the competitor's gradient by ``-1 / model.tau``.

    Reads ``tau`` at call time (through a weak reference, so the hook does
    not keep its model alive), so assigning ``model.tau`` takes effect.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = weakref.ref(model)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        model = self.model()
        return grad if model is None else grad * (-1.0 / model.tau)


# Where the loop methods the fused loop reproduces are defined.
_LOOP_MODULES = (__name__, IterationLossModule.__module__)


# What a forward runs besides the loop; a configuration is replayed (see
# _QuadraticLoopModule.forward) only while each is the library's own.
_REPLAYED_METHODS = (
    "forward", "pre_iteration", "_prepare", "post_iteration", "iteration", "iteration_set_gradients",
    "converged", "iteration_parameters", "_state", "_quadratic", "_run_iterations", "_in_loop_modes",
    "_run_fused_loop", "_encode", "_sum", "_check_encoded",
)
_REPLAYED_SET = frozenset(_REPLAYED_METHODS)


class _Plan:
    """A model configuration whose forward ran the whole-loop op with nothing
    held back, and the optimizer settings that forward folded into the op."""

    __slots__ = ("cls", "optim", "kwargs", "lr", "maximize", "weight_decay", "dtype", "device")

    @staticmethod
    def of(module: "_QuadraticLoopModule") -> Optional["_Plan"]:
        """The plan of the forward that just ended, or None if it cannot be replayed."""
        attrs = module.__dict__
        stats = attrs.get("iteration_stats")
        if stats is None or stats.path != _loops.QUADRATIC_DESCENT or stats.path_reason is not None:
            return None
        if not _Plan._replayable(attrs):
            return None
        optimizer = attrs.get("_it_optimizer")
        if type(optimizer) not in _loops.SGD_TYPES:
            return None
        if getattr(optimizer, "projection", None) is not None or len(optimizer.param_groups) != 1:
            return None
        cls = type(module)
        if any(
            getattr(getattr(cls, name, None), "__module__", None) not in _LOOP_MODULES
            for name in _REPLAYED_METHODS
            if hasattr(cls, name)
        ):
            return None
        kwargs = attrs["it_optim_kwargs"]
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            # A tensor option (a tensor lr) can change in place, unseen by the
            # comparison that keeps a plan.
            return None
        group = optimizer.param_groups[0]
        state = module._state()
        plan = _Plan()
        plan.cls, plan.optim, plan.kwargs = cls, attrs["it_construct_optim"], dict(kwargs)
        plan.lr, plan.maximize, plan.weight_decay = float(group["lr"]), bool(group["maximize"]), group["weight_decay"]
        plan.dtype, plan.device = state.dtype, state.device
        return plan

    def holds(self, module: "_QuadraticLoopModule", attrs: Dict[str, Any]) -> bool:
        """Whether ``module``'s configuration is still this plan's (the
        tensors' dtype and device are checked once they exist)."""
        if type(module) is not self.cls or not _Plan._replayable(attrs):
            return False
        if attrs.get("it_construct_optim") is not self.optim or attrs.get("it_optim_kwargs") != self.kwargs:
            return False
        return attrs.get("fixed_point_gradient") is None or not torch.is_grad_enabled()

    @staticmethod
    def _replayable(attrs: Dict[str, Any]) -> bool:
        """What a plan needs of a module's settings, whichever they are: no
        hooks, no compiled iterations, no scheduler, no method replaced on
        the instance."""
        hooks = attrs["hooks"]
        if hooks.get("pre") or hooks.get("iteration") or hooks.get("post"):
            return False
        if attrs.get("_it_compiled") is not None or attrs.get("it_construct_sched") is not None:
            return False
        return _REPLAYED_SET.isdisjoint(attrs)


class _QuadraticLoopModule(IterationLossModule):
    """An iteration module whose loop is projected descent on ``½yᵀAy − bᵀy``.

    Subclasses provide ``_state()`` (the iterated tensor, ``(B, C, *spatial)``)
    and ``_quadratic()`` (``A`` of shape ``(C, C)`` and ``b`` shaped like the
    state), both valid after ``pre_iteration``; their ``iteration_set_gradients``
    sets ``state.grad = A·state − b``.
    """

    # Where the loop methods the whole-loop op reproduces are defined; its
    # presence gives the module the quadratic_descent strategy (torchiter._loops).
    _LOOP_MODULES = _LOOP_MODULES

    def __init__(self, *, per_sample_stopping: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.per_sample_stopping = per_sample_stopping

    @property
    def per_sample_stopping(self) -> bool:
        """Whether each sample stops on its own ``tol`` test (opt-in).

        Off (the stock behaviour), the loop stops when the largest change
        over the whole batch is below ``tol``. On, each sample (index along
        dim 0 of the state) stops updating once its own largest change is
        below ``tol``, and the loop ends when all have stopped: a sample's
        result is the one it gets alone, and stopped samples cost nothing on
        the fused path. ``iteration_stats`` is then per sample, shape ``(B,)``.
        """
        return self.__dict__["_per_sample_stopping"]

    @per_sample_stopping.setter
    def per_sample_stopping(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"{type(self).__name__}: per_sample_stopping must be a bool, got {value!r}")
        self.__dict__["_per_sample_stopping"] = value

    @property
    def tol(self) -> float:
        """Stop threshold on ``max |y_k − y_{k−1}|``; 0 disables the test."""
        return self.__dict__["_tol"]

    @tol.setter
    def tol(self, value: float) -> None:
        self.__dict__["_tol"] = _check_tol(type(self).__name__, value)

    # The attribute holding the state (what _state() returns).
    _STATE_NAME = ""

    def _state(self) -> torch.Tensor:
        raise NotImplementedError

    def _prepare(self, *args: Any) -> None:
        """Computes what the loop needs from the inputs and sets the state to zeros."""
        raise NotImplementedError

    def pre_iteration(self, *args: Any) -> None:
        """``_prepare()`` (the model's own setup: encoding, zero state), then
        :meth:`IterationLossModule.pre_iteration` (flags, optimizer, scheduler)."""
        self._prepare(*args)
        super().pre_iteration(*args)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """As :meth:`IterationLossModule.forward`.

        The first forward of a configuration decides its loop; while nothing
        it depends on changes (hooks, optimizer class and options, scheduler,
        ``fixed_point_gradient``, the class's methods, the state's dtype and
        device, a projection the op expresses), later forwards replay that
        decision: the same steps with the same results, without deciding again.
        """
        attrs = self.__dict__
        if kwargs or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return super().forward(*args, **kwargs)
        plan = attrs.get("_it_plan")
        if plan is None or not plan.holds(self, attrs):
            out = super().forward(*args)
            attrs["_it_plan"] = _Plan.of(self)
            return out
        return self._replay(plan, args)

    def __getstate__(self) -> Dict[str, Any]:
        # The plan is a cache; a copy decides its own.
        state = super().__getstate__()
        state.pop("_it_plan", None)
        return state

    def _replay(self, plan: "_Plan", args: Tuple[Any, ...]) -> Any:
        """One forward of ``plan``'s configuration.

        The steps of :meth:`IterationLossModule.forward` with no hooks to call:
        ``_prepare``, the whole-loop op, ``post_iteration``, the divergence
        report. Where this forward's tensors or projection differ from the
        plan's, the loop is decided again as in any forward.
        """
        attrs = self.__dict__
        token = object()
        if attrs.setdefault("_it_running", token) is not token:
            # Raises that a forward is already running.
            return super().forward(*args)
        planned = False
        # Nothing in a replayed forward is differentiated but what _prepare
        # decides to record (it runs in the caller's grad mode); grad mode is
        # switched off after it, here.
        grad = torch.is_grad_enabled()
        try:
            attrs["iteration_idx"] = -1
            try:
                self._prepare(*args)
                _internals.set_grad_enabled(False)
                state = self._state()
                projection = fused_projection_args(_internals.module_attr(self, "iteration_projection"))
                if (
                    projection is not None
                    and type(state) is torch.Tensor
                    and not state.is_meta
                    and state.dtype == plan.dtype
                    and state.device == plan.device
                ):
                    self._run_planned(plan, state, projection)
                    planned = True
                else:
                    attrs["_it_plan"] = None
                    _internals.set_grad_enabled(grad)
                    IterationLossModule.pre_iteration(self, *args)
                    self._run_iterations(*args)
                out = self.post_iteration(*args)
            except BaseException:
                self._abort_iteration()
                raise
        finally:
            _internals.set_grad_enabled(grad)
            del attrs["_it_running"]
            attrs["_last_iteration_loss"] = _without_graph(attrs.get("_last_iteration_loss"))
        # A planned loop's values are readable (a plain tensor, no tracing).
        self._report_divergence(args, {}, readable=planned)
        if attrs.get("_it_plan") is None:
            attrs["_it_plan"] = _Plan.of(self)
        return out

    def _run_planned(self, plan: "_Plan", state: torch.Tensor, projection: Tuple[Any, ...]) -> None:
        """What ``IterationLossModule.pre_iteration`` and ``_run_iterations``
        do for the planned configuration: the optimizer (for users who read
        it), the loop as one op, the statistics. No ``requires_grad`` flags
        are toggled: nothing in this forward differentiates."""
        attrs = self.__dict__
        attrs["iteration_stats"] = attrs["_stopped"] = None
        attrs["iteration_scheduler"] = None
        A, b = self._quadratic()
        curvature = A
        if plan.maximize:
            A, b = -A, -b
        if plan.weight_decay != 0:
            A = A + plan.weight_decay * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        # Nothing but this forward holds the zero state: the op's output replaces it.
        self._run_fused_loop(state, A, b, plan.lr, *projection, rebind=True)
        attrs["_it_optimizer"] = None
        attrs["_it_optim_pending"] = (plan.optim, [attrs[self._STATE_NAME]], plan.kwargs)
        if attrs.get("divergence", "warn") != "ignore":
            attrs["iteration_stats"]._curvature = curvature.detach()

    def _note_ddp(self) -> None:
        """Remembers the DistributedDataParallel module running this forward, if any."""
        ddp = active_ddp_module()
        if ddp is not None and any(m is self for m in ddp.module.modules()):
            self.__dict__["_it_ddp"] = weakref.ref(ddp)

    def _check_loss_inside_ddp(self) -> None:
        """Refuses a differentiable loss computed outside the DDP forward that ran this model.

        DDP synchronises gradients only for what its own forward computed:
        a loss computed after it returns is averaged over nothing with
        ``static_graph=True`` (the replicas silently drift apart) and fails
        with ``find_unused_parameters=True``.
        """
        ref = self.__dict__.get("_it_ddp")
        ddp = ref() if ref is not None else None
        if ddp is not None and torch.is_grad_enabled() and active_ddp_module() is not ddp:
            raise RuntimeError(
                f"{type(self).__name__}.loss is called outside the forward of the DistributedDataParallel "
                "module that wraps this model, so DDP cannot synchronise its gradients. Wrap a module "
                "whose forward runs the model and returns model.loss(...) (see the README's "
                "'Distributed training'), or compute the loss under torch.no_grad() for evaluation."
            )

    def _quadratic(self) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def converged(self, *args: Any, **kwargs: Any) -> bool:
        """``max |y_k − y_{k−1}| < tol`` of the state from the second iteration on (needs ``tol > 0``)."""
        y = self._state().detach()
        if self.tol <= 0 or y.numel() == 0:
            # An empty batch has no change to test (the op runs it to the end too).
            return False
        last = self._last_state
        if last is None:
            self._last_state = y.clone()
            return False
        if self.per_sample_stopping:
            return self._per_sample_converged(y, last)
        done = bool((y - last).abs().max() < self.tol)
        last.copy_(y)
        return done

    def _per_sample_converged(self, y: torch.Tensor, last: torch.Tensor) -> bool:
        """The per-sample test on the per-iteration path: a stopped sample is
        put back to its value at its stop after every later step (samples do
        not interact), so its result is the one it gets alone."""
        attrs = self.__dict__
        stopped = self._per_sample_flags(y)
        view = (-1,) + (1,) * (y.dim() - 1)
        state = self._state()
        with torch.no_grad():
            state.copy_(torch.where(stopped.view(view), last, state))
        y = state.detach()
        change = (y - last).abs().flatten(1).amax(1)
        newly = ~stopped & (change < self.tol)
        attrs["_stopped_at"] = torch.where(newly, self.iteration_idx + 1, attrs["_stopped_at"])
        stopped |= newly
        last.copy_(y)
        return bool(stopped.all())

    def _per_sample_flags(self, y: torch.Tensor) -> torch.Tensor:
        """This forward's per-sample stop flags ``(B,)`` (made on first use, with
        ``_stopped_at``, the iteration count of each stopped sample)."""
        attrs = self.__dict__
        stopped = attrs.get("_stopped")
        if stopped is None:
            stopped = attrs["_stopped"] = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
            attrs["_stopped_at"] = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
        return stopped

    def _fused_loop_args(self) -> Union[Tuple[Any, ...], str]:
        """``quadratic_descent`` arguments for this forward, or why there are none."""
        # The fused-step plan of IterationLossModule (a torchiter.optim.FastStep).
        fast = self._it_fast
        reason = _loops.quadratic_args_reason(self, fast, self._state(), _has_kernel)
        if reason is not None:
            return reason
        state = self._state()
        optimizer = self.iteration_optimizer
        group = optimizer.param_groups[0]
        A, b = self._quadratic()
        # For the step-size hint of a diverged loop (see _run_iterations).
        self.__dict__["_it_curvature"] = A
        # SGD's own transformations of the gradient A·y − b, folded into A, b.
        if group["maximize"]:
            A, b = -A, -b
        if group["weight_decay"] != 0:
            A = A + group["weight_decay"] * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        shrink, lo, hi = fast.kernel_args
        return state, A, b, float(group["lr"]), shrink, lo, hi

    def _step_scheduler(self, steps: int) -> List[float]:
        """Steps the scheduler; returns the learning rate before each step."""
        group = self.iteration_optimizer.param_groups[0]
        seq = []
        with warnings.catch_warnings():
            # The optimizer's step is the op's, so the scheduler cannot see it.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for _ in range(steps):
                seq.append(float(group["lr"]))
                self.iteration_scheduler.step()
        return seq

    def _scheduled_rates(self, steps: int) -> Tuple[torch.Tensor, Tuple[Any, float]]:
        """The next ``steps`` rates of the scheduler, and its state before them."""
        snapshot = (self.iteration_scheduler.state_dict(), float(self.iteration_optimizer.param_groups[0]["lr"]))
        return torch.tensor(self._step_scheduler(steps), dtype=torch.float64), snapshot

    def _rewind_scheduler(self, snapshot: Tuple[Any, float], steps: int) -> None:
        """Leaves scheduler and learning rate as ``steps`` steps after ``snapshot``."""
        self.iteration_scheduler.load_state_dict(snapshot[0])
        self.iteration_optimizer.param_groups[0]["lr"] = snapshot[1]
        self._step_scheduler(steps)

    def _run_iterations(self, *args: Any, **kwargs: Any) -> None:
        attrs = self.__dict__
        attrs["_stopped"] = None
        attrs["_it_curvature"] = None
        # The strategies of torchiter._loops: the whole-loop op first.
        IterationLossModule._run_iterations(self, *args, **kwargs)
        stats = attrs.get("iteration_stats")
        curvature = attrs.pop("_it_curvature", None)
        if stats is not None and attrs.get("divergence", "warn") != "ignore":
            # For the step-size hint, read only if the loop diverged (A is
            # released at post_iteration).
            stats._curvature = (curvature if curvature is not None else self._quadratic()[0]).detach()
        if self.per_sample_stopping and stats is not None and stats.iterations.dim() == 0:
            # Per-sample stops on the per-iteration path: counts per sample
            # (the changes stay batch-wide there).
            state = self._state()
            stopped = self._per_sample_flags(state)
            stats.iterations = torch.where(stopped, attrs["_stopped_at"], stats.iterations.to(state.device))
            stats.converged = stopped.clone()
        attrs["_stopped"] = None

    def _run_fused_loop(self, state, A, b, lr, shrink, lo, hi, rebind: bool = False) -> None:
        """The loop as one ``quadratic_descent_ex`` call; the result lands in
        the state (``rebind``: the state attribute is set to the op's output
        instead of copied into, for a forward whose state nothing else holds)."""
        attrs = self.__dict__
        op = torch.ops.torchiter.quadratic_descent_ex
        K = attrs["max_iterations"]
        tol = attrs["_tol"]
        per_sample = attrs["_per_sample_stopping"]
        trace = bool(attrs.get("stats_trace", False))
        # The op is differentiable: nothing here may record a graph.
        y, A, b = _detached(state), _detached(A), _detached(b)
        snapshot = None
        if attrs.get("iteration_scheduler") is None:
            r = op(y, A, b, lr, K, tol, 1, None, shrink, lo, hi, per_sample, trace)
        elif tol <= 0 or per_sample:
            # Every rate up front: all iterations run, or (per sample) the
            # scheduler is put back to where the longest-running sample left
            # it once the counts are known.
            lrs, snapshot = self._scheduled_rates(K)
            r = op(y, A, b, 0.0, K, tol, 1, lrs, shrink, lo, hi, per_sample, trace)
            lr = float(lrs[0]) if K > 0 else lr
        else:
            r = self._run_scheduled_chunks(op, y, A, b, K, tol, shrink, lo, hi, trace)
            lr = None
        y, counts = r[0], r[1]
        # Not while a graph is traced (torch.compile, torch.export) nor for
        # meta tensors, which have no values: the graph returns the counts itself.
        readable = _internals.values_readable(y)
        # Reading a count waits for the device, so only when it is not known.
        if tol <= 0 or not readable:
            count = K
        else:
            count = int(counts) if counts.dim() == 0 else int(counts.max()) if counts.numel() else K
        if snapshot is not None and count < K:
            self._rewind_scheduler(snapshot, count)
        if rebind:
            attrs[self._STATE_NAME] = y
        elif state.requires_grad:
            with torch.no_grad():
                state.copy_(y)
        else:
            state.copy_(y)
        attrs["iteration_idx"] = count - 1
        # A small CPU y is kept for a noise floor computed on first read; so
        # is a traced one, where testing its size would specialise the batch.
        # Where y is the state itself (rebind), a copy is kept: the tensor
        # returned to the caller shares its storage, and the floor must be
        # the loop's result's even after the caller changes that in place.
        if not readable:
            noise = functools.partial(_noise, y)
        elif y.is_cpu and y.numel() <= _LAZY_NOISE_NUMEL:
            noise = functools.partial(_noise, y.clone() if rebind else y)
        else:
            noise = _noise(y)
        attrs["iteration_stats"] = _stats.IterationStats(
            counts, r[2], r[3], r[4], noise,
            change_trace=r[5][:count] if trace else None,
            lr=lr,
            path=_loops.QUADRATIC_DESCENT,
        )

    def _run_scheduled_chunks(self, op, y, A, b, K, tol, shrink, lo, hi, trace) -> Tuple[torch.Tensor, ...]:
        """The loop with a scheduler and a stop test, in chunks of growing length.

        A scheduler's rates are only known by stepping it, and the loop may
        stop early, so the rates are made a chunk at a time and the work
        follows the iterations run, not ``max_iterations``. The op never tests
        its first iteration; at each chunk boundary that test is made here,
        on one extra iteration, so the stop is the per-iteration loop's.
        Returns ``quadratic_descent_ex``'s outputs for the whole loop.
        """
        count, chunk = 0, 64
        first = last = torch.zeros((), dtype=y.dtype, device=y.device)
        traces: List[torch.Tensor] = []
        converged = False
        while count < K:
            n = min(chunk, K - count)
            lrs, snapshot = self._scheduled_rates(n)
            if count > 0 and y.numel() > 0:
                y1, _ = torch.ops.torchiter.quadratic_descent(y, A, b, 0.0, 1, tol, 1, lrs[:1], shrink, lo, hi)
                change = (y1 - y).abs().max()
                if bool(change < tol):
                    self._rewind_scheduler(snapshot, 1)
                    y, last, converged = y1, change, True
                    traces.append(change.reshape(1))
                    count += 1
                    break
            # The chunk reruns the iteration just tested: its own test starts
            # at its second iteration.
            r = op(y, A, b, 0.0, n, tol, 1, lrs, shrink, lo, hi, False, True)
            y, ran = r[0], int(r[1])
            if count == 0:
                first = r[5][0]
            last = r[3]
            traces.append(r[5][:ran])
            count += ran
            if ran < n or bool(r[2]):
                self._rewind_scheduler(snapshot, ran)
                converged = bool(r[2])
                break
            chunk *= 2
        trace = torch.cat(traces) if traces else torch.zeros(0, dtype=y.dtype, device=y.device)
        growth = _stats.growth_ratio(first, last)
        return (
            y,
            torch.tensor(count, device=y.device),
            torch.tensor(converged, device=y.device),
            last,
            growth,
            trace,
        )

    def _divergence_hint(self, stats: Any, args: Tuple, kwargs: Any) -> Optional[str]:
        """The step size against ``2/L``, ``L`` the largest eigenvalue of the quadratic's ``A``."""
        A = getattr(stats, "_curvature", None)
        L = _stats.estimate_lipschitz_matrix(A) if A is not None and A.numel() > 0 else None
        return _stats.step_size_hint(stats.lr, L, how="from the loop's matrix A")


# Encoder modules whose call is a pure function of its input, parameters and
# buffers: no random draw, no buffer written, no other effect (an exact type:
# a subclass may override forward).
_PURE_ENCODER_TYPES = frozenset({
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.Sequential, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
})


# Inputs of fewer elements than this are encoded again by the loss: recording
# the forward's encoding and checking it costs 20-30 us per training step,
# more than a small encoder's second forward (the pca and clustering
# workloads'); an MNIST batch of 100 digits has 78,400.
_KEEP_MIN_NUMEL = 1 << 16


class _KeptEncoding:
    """The encoders' outputs of a training forward and their sum, with their
    graph, for the ``loss`` of that forward's output (see
    ``MultiSimilarityMatching._prepare``).

    Valid while the loss gets the very output (``y``), the same input tensors
    and the same encoder parameters and buffers, none changed in place since.
    """

    __slots__ = ("inputs", "tensors", "versions", "flags", "Wx", "Wx_sum", "y")

    def __init__(
        self, inputs: Tuple[Any, ...], tensors: List[torch.Tensor], Wx: List[Optional[torch.Tensor]], Wx_sum: torch.Tensor
    ) -> None:
        self.inputs = inputs
        self.tensors = tensors
        self.versions = self._versions(inputs, tensors)
        self.flags = [t.requires_grad for t in tensors]
        self.Wx = Wx
        # With several encoders their sum is a pass over the state's size:
        # the loss takes it from here too.
        self.Wx_sum = Wx_sum
        self.y: Optional[weakref.ref] = None

    @staticmethod
    def _versions(inputs: Tuple[Any, ...], tensors: List[torch.Tensor]) -> List[int]:
        return [t._version for t in inputs if t is not None] + [t._version for t in tensors]

    def matches(self, inputs: Tuple[Any, ...], tensors: List[torch.Tensor], y: torch.Tensor) -> bool:
        if self.y is None or self.y() is not y or len(inputs) != len(self.inputs) or len(tensors) != len(self.tensors):
            return False
        if any(a is not b for a, b in zip(inputs, self.inputs)) or any(a is not b for a, b in zip(tensors, self.tensors)):
            return False
        return self._versions(inputs, tensors) == self.versions and [t.requires_grad for t in tensors] == self.flags


def _forget_kept(model_ref: "weakref.ref", output_ref: "weakref.ref") -> None:
    # Its output is gone, so no loss can use the kept encoding: free it now.
    # (Found through the model, not held here: a reference from this
    # callback would make a cycle through the encoding's weak reference to
    # the output, and its graph would wait for the garbage collector.)
    model = model_ref()
    if model is not None:
        kept = model.__dict__.get("_kept_encoding")
        if kept is not None and kept.y is output_ref:
            del model.__dict__["_kept_encoding"]


class MultiSimilarityMatching(_QuadraticLoopModule):
    """Non-negative similarity matching with several encoded inputs.

    ``forward(*xs)`` encodes every input that is not None, ``Wx = Σᵢ
    encoders[i](xs[i])`` (shape ``(B, C, *spatial)``, detached), and runs the
    inner loop on ``y`` (starting at zeros): gradient ``M·y − Wx`` along dim 1,
    an SGD step with ``iteration_lr``, then ``iteration_projection`` (commonly
    ``nn.ReLU()``). With ``tol > 0`` the loop stops after iteration ``k ≥ 1``
    when ``max |y_k − y_{k−1}| < tol``. Returns ``y`` detached, on the
    encoders' device and dtype.

    ``M = competitor.weight`` (``(C, C)``, initialised to the identity) is a
    parameter for the outer optimizer; its gradient is multiplied by
    ``-1/tau`` so the outer optimizer ascends in ``M`` at a rate ``1/tau``.

    Args:
        encoders: modules mapping each input to ``(B, C, *spatial)``.
        out_channels: ``C``.
        tau: ratio of learning rates of the encoders and the competitor.
        tol: convergence threshold on the largest change of ``y``; 0 disables.
        max_iterations: iteration budget of one forward.
        regularization: ``"weight"``, ``"whiten"`` or ``"none"``, or one per
            encoder (see :meth:`loss`).
        **iteration_kwargs: passed to :class:`IterationLossModule`
            (``iteration_lr``, ``iteration_projection``, ...).

    Raises:
        ValueError: for an unknown regularization or a count that does not
            match the encoders.
    """

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        out_channels: int,
        tau: float = 0.1,
        tol: float = 0.0,
        max_iterations: int = 40,
        regularization: Union[str, Sequence[str]] = "weight",
        **iteration_kwargs: Any,
    ) -> None:
        super().__init__(max_iterations=max_iterations, **iteration_kwargs)
        self.encoders = nn.ModuleList(encoders)
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"{type(self).__name__}: out_channels must be a positive int, got {out_channels!r}")
        self.out_channels = out_channels
        self.tau = tau
        self.tol = tol
        regs = [regularization] * len(self.encoders) if isinstance(regularization, str) else list(regularization)
        if len(regs) != len(self.encoders):
            raise ValueError(
                f"{type(self).__name__}: {len(regs)} regularizations given for {len(self.encoders)} encoders"
            )
        for r in regs:
            if r not in _REGULARIZATIONS:
                raise ValueError(f"{type(self).__name__}: unknown regularization {r!r}; expected one of {_REGULARIZATIONS}")
        self.regularization = regs

        self.competitor = nn.Linear(out_channels, out_channels, bias=False)
        nn.init.eye_(self.competitor.weight)
        self._hook_competitor()

        self.y = torch.tensor([])
        self._Wx_sum: Optional[torch.Tensor] = None
        self._last_state: Optional[torch.Tensor] = None

    @property
    def tau(self) -> float:
        """Ratio of the encoders' and the competitor's learning rates, ``> 0``."""
        return self.__dict__["_tau"]

    @tau.setter
    def tau(self, value: float) -> None:
        self.__dict__["_tau"] = _check_positive(type(self).__name__, "tau", value)

    def _hook_competitor(self) -> None:
        weight = self.competitor.weight
        if not any(isinstance(h, _ScaleGrad) for h in _internals.tensor_backward_hooks(weight).values()):
            weight.register_hook(_ScaleGrad(self))

    def __getstate__(self) -> Dict[str, Any]:
        # A kept encoding belongs to this module's last forward (and holds
        # its graph, which cannot be copied).
        state = super().__getstate__()
        state.pop("_kept_encoding", None)
        state.pop("_kept_pending", None)
        return state

    def __setstate__(self, state: dict) -> None:
        # Tensor hooks do not survive copy.deepcopy or pickling: put it back.
        super().__setstate__(state)
        self._hook_competitor()

    def _encode(self, *xs: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Each encoder's output, or None where its input is None or missing."""
        encoders = _internals.module_attr(self, "encoders")
        if len(xs) > len(encoders):
            raise ValueError(f"{type(self).__name__}: got {len(xs)} inputs for {len(encoders)} encoders")
        return [enc(x) if x is not None else None for enc, x in zip(encoders, xs)] + [None] * (len(encoders) - len(xs))

    def _check_encoded(self, Wx: torch.Tensor) -> torch.Tensor:
        """Wx itself, after checking it is ``(B, out_channels, *spatial)``."""
        if Wx.dim() < 2 or Wx.shape[1] != self.out_channels:
            raise ValueError(
                f"{type(self).__name__}: the encoders' output has shape {tuple(Wx.shape)}, but "
                f"(batch, out_channels={self.out_channels}, *spatial) is expected; "
                "out_channels must equal the encoders' number of output channels"
            )
        return Wx

    @staticmethod
    def _sum(Wx: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        active = [w for w in Wx if w is not None]
        if not active:
            raise ValueError("at least one input must be given (not None)")
        # Out of place: the encoders' outputs are never modified.
        total = active[0]
        for w in active[1:]:
            total = total + w
        return total

    def _prepare(self, *xs: Optional[torch.Tensor]) -> None:
        """Encodes the inputs once (detached) and sets ``y`` to zeros.

        In a training forward (grad mode on, CPU) whose encoders are pure
        (``_PURE_ENCODER_TYPES``, no forward hooks), the encoding keeps its
        graph for the ``loss`` of this forward's output, which then does not
        run the encoders again: the same computation on the same tensors
        gives the same values, and the loss's backward goes through it once.
        """
        # Plain attributes are written through __dict__: nn.Module.__setattr__
        # costs microseconds per call, a visible share of a small forward.
        attrs = self.__dict__
        self._note_ddp()
        attrs.pop("_kept_encoding", None)
        attrs["_kept_pending"] = None
        grad = torch.is_grad_enabled()
        tensors = self._keepable_encoders(xs) if grad else None
        if tensors is not None:
            Wx = self._encode(*xs)
            Wx_sum = self._check_encoded(self._sum(Wx))
            attrs["_kept_pending"] = _KeptEncoding(tuple(xs), tensors, Wx, Wx_sum)
        elif grad:
            # The plain switch: torch.no_grad()'s context manager costs
            # microseconds, a visible share of a small forward.
            _internals.set_grad_enabled(False)
            try:
                Wx_sum = self._check_encoded(self._sum(self._encode(*xs)))
            finally:
                _internals.set_grad_enabled(True)
        else:
            Wx_sum = self._check_encoded(self._sum(self._encode(*xs)))
        attrs["_Wx_sum"] = _detached(Wx_sum)
        attrs["_last_state"] = None
        attrs["y"] = torch.zeros_like(Wx_sum)

    _STATE_NAME = "y"

    def _keepable_encoders(self, xs: Tuple[Any, ...]) -> Optional[List[torch.Tensor]]:
        """The encoders' parameters and buffers where this forward may keep its
        encoding for ``loss`` (see ``_prepare``), else None: CPU tensor inputs,
        pure encoders without hooks, no autocast, tracing, inference mode or
        DistributedDataParallel, and inputs of at least ``_KEEP_MIN_NUMEL``
        elements."""
        # Tracing first: reading a traced input's size would specialise it.
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        numel = 0
        for x in xs:
            if type(x) is torch.Tensor:
                numel += x.numel()
        if numel < _KEEP_MIN_NUMEL:
            return None
        if (
            torch.is_inference_mode_enabled()
            or torch.is_autocast_enabled("cpu")
            or self.__dict__.get("_it_ddp") is not None
        ):
            return None
        # (At least one input is a tensor: the size test above needs one.)
        if any(x is not None and (type(x) is not torch.Tensor or not x.is_cpu) for x in xs):
            return None
        encoders = _internals.module_attr(self, "encoders")
        for enc in encoders:
            for m in enc.modules():
                if type(m) not in _PURE_ENCODER_TYPES or _internals.module_has_forward_hooks(m):
                    return None
        tensors = self._encoder_tensors(encoders)
        if any(type(t) is not torch.Tensor and type(t) is not nn.Parameter or not t.is_cpu for t in tensors):
            return None
        return tensors

    @staticmethod
    def _encoder_tensors(encoders: nn.ModuleList) -> List[torch.Tensor]:
        """Every parameter and buffer of ``encoders``, in a fixed order: what a
        kept encoding was computed from."""
        tensors: List[torch.Tensor] = []
        for enc in encoders:
            tensors.extend(enc.parameters())
            tensors.extend(enc.buffers())
        return tensors

    def _take_kept_encoding(self, xs: Tuple[Any, ...], y: torch.Tensor) -> Optional[_KeptEncoding]:
        """The encoding ``_prepare`` kept for this loss, if it still applies.

        Used once: a second loss of the same output encodes again (the first
        one's backward may have freed the kept graph)."""
        attrs = self.__dict__
        kept = attrs.get("_kept_encoding")
        if kept is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        if torch.is_autocast_enabled("cpu"):
            return None
        tensors = self._encoder_tensors(_internals.module_attr(self, "encoders"))
        if not kept.matches(tuple(xs), tensors, y):
            return None
        del attrs["_kept_encoding"]
        return kept

    def _state(self) -> torch.Tensor:
        return self.y

    def _quadratic(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return _internals.module_attr(self, "competitor").weight.detach(), self._Wx_sum

    def _fixed_point_quadratic(self, *xs: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(M, Wx)`` with their graphs (encoders run again), for ``fixed_point_gradient``.

        The competitor's gradient hook scales every gradient reaching ``M``,
        also one through the fixed point, by ``-1/tau``.
        """
        return self.competitor.weight, self._sum(self._encode(*xs))

    def iteration_set_gradients(self, *xs: Optional[torch.Tensor]) -> None:
        """Sets ``y.grad = M·y − Wx`` directly (no autograd)."""
        with torch.no_grad():
            self.y.grad = _mix(self.competitor.weight, self.y) - self._Wx_sum

    def iteration_loss(self, *xs: Optional[torch.Tensor]) -> torch.Tensor:
        """``(2·Σ y⊙(M·y) − 4·Σ y⊙Wx) / 4``, whose gradient in ``y`` the loop uses."""
        return self._fit(self.y, self._Wx_sum) / 4

    def post_iteration(self, *xs: Optional[torch.Tensor]) -> torch.Tensor:
        """Restores the flags and returns ``y`` detached."""
        super().post_iteration(*xs)
        attrs = self.__dict__
        attrs["_Wx_sum"] = attrs["_last_state"] = None
        out = self.y.detach()
        kept = attrs.pop("_kept_pending", None)
        if kept is not None:
            kept.y = weakref.ref(out, functools.partial(_forget_kept, weakref.ref(self)))
            attrs["_kept_encoding"] = kept
        return out

    def iteration_parameters(self) -> List[torch.Tensor]:
        """``[y]``, the network's output state."""
        return [self.y]

    def _fit(self, y: torch.Tensor, Wx_sum: torch.Tensor) -> torch.Tensor:
        M = self.competitor.weight
        if (
            not y.requires_grad
            and y.dtype in (torch.float32, torch.float64)
            and y.dtype == M.dtype == Wx_sum.dtype
            and y.device == M.device == Wx_sum.device
            and y.shape == Wx_sum.shape
            and y.dim() >= 2
        ):
            # The training loss: y is the forward's detached output. Half
            # dtypes keep the formula (the per-sample Grams would be rounded).
            return _SimilarityFit.apply(M, y, Wx_sum)[0]
        return 2 * (y * _mix(M, y)).sum() - 4 * (y * Wx_sum).sum()

    def loss(self, *args: Optional[torch.Tensor]) -> torch.Tensor:
        """Training loss ``loss(*xs, y)`` with ``y`` the forward's output.

        With ``N = y.numel()`` and ``C = out_channels``:
        ``(2·Σ y⊙(M·y) − 4·Σ y⊙Wx) / N − Σ M² / C``, plus per encoder:
        ``"weight"``: ``Σ w² · 2/C`` over its trainable parameters;
        ``"whiten"``: ``2·mean(Wxᵢ²)`` (encoders whose input is given);
        ``"none"``: nothing. Differentiable in the encoders and ``M``.
        The encoders run on ``xs`` again, unless the training forward that
        returned ``y`` kept its encoding for it (pure encoders on the CPU, the
        same unchanged inputs and parameters: see ``docs/models.md``).
        """
        *xs, y = args
        if y is None:
            raise ValueError(f"{type(self).__name__}.loss: the last argument must be the output y")
        _check_nonempty(f"{type(self).__name__}.loss", y)
        self._check_loss_inside_ddp()
        kept = self._take_kept_encoding(tuple(xs), y)
        if kept is None:
            Wx = self._encode(*xs)
            Wx_sum = self._check_encoded(self._sum(Wx))
        else:
            Wx, Wx_sum = kept.Wx, kept.Wx_sum
        C = self.out_channels
        M = self.competitor.weight
        loss = self._fit(y, Wx_sum) / y.numel() - (M**2).sum() / C
        return self._regularized(loss, Wx)

    def _regularized(self, loss: torch.Tensor, Wx: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """``loss`` plus each encoder's regularization term, ``Wx`` the encoders' outputs (or None)."""
        C = self.out_channels
        for enc, reg, w in zip(self.encoders, self.regularization, Wx):
            if reg == "weight":
                for p in enc.parameters():
                    if p.requires_grad:
                        loss = loss + (p**2).sum() * (2.0 / C)
            elif reg == "whiten" and w is not None:
                loss = loss + 2 * (w**2).mean()
        return loss


class SimilarityMatching(MultiSimilarityMatching):
    """Similarity matching with one encoder: ``forward(x)``.

    Args:
        encoder: module mapping ``x`` to ``(B, C, *spatial)``.
        out_channels: ``C``.
        **kwargs: as for :class:`MultiSimilarityMatching`.
    """

    def __init__(self, encoder: nn.Module, out_channels: int, **kwargs: Any) -> None:
        super().__init__([encoder], out_channels, **kwargs)

    @property
    def encoder(self) -> nn.Module:
        """The single encoder."""
        return self.encoders[0]


class SupervisedSimilarityMatching(MultiSimilarityMatching):
    """Similarity matching with a label input: ``forward(x, labels=None)``.

    The label encoder ``nn.Linear(num_classes, out_channels, bias=label_bias)``
    maps one-hot float labels ``(B, num_classes)`` (integer class indices are
    one-hot encoded first) to ``(B, C)``, broadcast over the spatial dims of
    the first encoder's output. Regularization defaults to
    ``("weight", "whiten")``.

    Args:
        encoder: module mapping ``x`` to ``(B, C, *spatial)``.
        num_classes: number of classes.
        out_channels: ``C``.
        label_bias: give the label encoder a bias.
        **kwargs: as for :class:`MultiSimilarityMatching`.
    """

    def __init__(
        self, encoder: nn.Module, num_classes: int, out_channels: int, label_bias: bool = False, **kwargs: Any
    ) -> None:
        kwargs.setdefault("regularization", ("weight", "whiten"))
        label_encoder = nn.Linear(num_classes, out_channels, bias=label_bias)
        super().__init__([encoder, label_encoder], out_channels, **kwargs)
        self.num_classes = num_classes

    def _encode(self, *xs: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        x = xs[0] if xs else None
        labels = xs[1] if len(xs) > 1 else None
        Wx = self.encoders[0](x) if x is not None else None
        if labels is None:
            return [Wx, None]
        if not labels.is_floating_point():
            labels = nn.functional.one_hot(labels.long(), self.num_classes).to(self.encoders[1].weight.dtype)
        Wl = self.encoders[1](labels)
        if Wx is not None:
            # Left to broadcast in the sum: "whiten"'s mean of Wl² then runs
            # over (B, C), not over a (B, C, *spatial) copy, with the same mean.
            Wl = Wl.reshape(Wl.shape + (1,) * (Wx.dim() - 2))
        return [Wx, Wl]


class SparseCoding(_QuadraticLoopModule):
    """ISTA sparse coding: ``forward(x)`` returns codes ``a`` of shape ``(B, K)``.

    The inner loop minimises ``½‖x − D·a‖² + sparsity·‖a‖₁`` over ``a``
    (starting at zeros) by proximal gradient steps, i.e. ``quadratic_descent``
    with ``A = DᵀD``, ``b = Dᵀx``, ``shrink = iteration_lr · sparsity`` (and
    ``min = 0`` when ``nonnegative``). The dictionary ``D`` of shape
    ``(input_size, dictionary_size)`` is a parameter for the outer optimizer;
    :meth:`loss` gives its training loss.

    Args:
        dictionary_size: number of atoms ``K``.
        input_size: dimension of ``x``.
        sparsity: weight of the L1 penalty, ``>= 0``.
        nonnegative: constrain codes to be non-negative.
        max_iterations: iteration budget of one forward.
        tol: convergence threshold on the largest change of ``a``; 0 disables.
        **iteration_kwargs: passed to :class:`IterationLossModule`; an explicit
            ``iteration_projection`` replaces the soft threshold.
    """

    def __init__(
        self,
        dictionary_size: int,
        input_size: int,
        sparsity: float = 0.1,
        nonnegative: bool = False,
        max_iterations: int = 100,
        tol: float = 0.0,
        **iteration_kwargs: Any,
    ) -> None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < math.inf:
            raise ValueError(f"SparseCoding: sparsity must be a finite number >= 0, got {sparsity!r}")
        for name, size in (("dictionary_size", dictionary_size), ("input_size", input_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"SparseCoding: {name} must be a positive int, got {size!r}")
        # None (given or not) means the soft threshold of models.md.
        self._user_projection = iteration_kwargs.get("iteration_projection") is not None
        super().__init__(max_iterations=max_iterations, **iteration_kwargs)
        self.dictionary_size = dictionary_size
        self.input_size = input_size
        self.sparsity = sparsity
        self.nonnegative = nonnegative
        self.tol = tol
        D = torch.randn(input_size, dictionary_size)
        self.dictionary = nn.Parameter(D / D.norm(dim=0, keepdim=True))
        self.codes = torch.tensor([])
        self._b: Optional[torch.Tensor] = None
        self._A: Optional[torch.Tensor] = None
        self._last_state: Optional[torch.Tensor] = None

    def normalize_dictionary_(self) -> None:
        """Rescales every atom (column of ``D``) to unit norm, in place."""
        with torch.no_grad():
            self.dictionary /= self.dictionary.norm(dim=0, keepdim=True).clamp_min(1e-12)

    def _prepare(self, x: torch.Tensor) -> None:
        """Computes ``A = DᵀD`` and ``b = Dᵀx`` once and sets the codes to zeros."""
        if not self._user_projection:
            lr = float(self.it_optim_kwargs["lr"])
            self.iteration_projection = SoftThreshold(lr * self.sparsity, min=0.0 if self.nonnegative else None)
        attrs = self.__dict__  # plain attributes: see MultiSimilarityMatching
        self._note_ddp()
        if x.dim() != 2 or x.shape[1] != self.input_size:
            raise ValueError(
                f"SparseCoding: x has shape {tuple(x.shape)}, but (batch, input_size={self.input_size}) is expected"
            )
        with torch.no_grad():
            D = self.dictionary.detach()
            attrs["_A"] = D.T @ D
            b = attrs["_b"] = x.detach() @ D
        attrs["_last_state"] = None
        attrs["codes"] = torch.zeros_like(b)

    _STATE_NAME = "codes"

    def _state(self) -> torch.Tensor:
        return self.codes

    def _quadratic(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._A, self._b

    def iteration_parameters(self) -> List[torch.Tensor]:
        """``[codes]``."""
        return [self.codes]

    def _fixed_point_quadratic(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(DᵀD, Dᵀx)`` with their graphs, for ``fixed_point_gradient``."""
        D = self.dictionary
        return D.T @ D, x @ D

    def iteration_set_gradients(self, x: torch.Tensor) -> None:
        """Sets ``codes.grad = DᵀD·a − Dᵀx``, the gradient of the smooth part."""
        with torch.no_grad():
            self.codes.grad = self.codes @ self._A - self._b

    def iteration_loss(self, x: torch.Tensor) -> torch.Tensor:
        """``½‖x − D·a‖²`` summed over the batch (the smooth part of the objective)."""
        return 0.5 * ((x - self.codes @ self.dictionary.T) ** 2).sum()

    def post_iteration(self, x: torch.Tensor) -> torch.Tensor:
        """Restores the flags and returns the codes detached, ``(B, K)``."""
        super().post_iteration(x)
        attrs = self.__dict__
        attrs["_A"] = attrs["_b"] = attrs["_last_state"] = None
        return self.codes.detach()

    def loss(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``½‖x − D·a‖² + sparsity·‖a‖₁`` at the given codes.

        Differentiable in ``D``; ``x`` is ``(B, input_size)``, ``codes`` ``(B, K)``.
        """
        _check_nonempty("SparseCoding.loss", codes)
        self._check_loss_inside_ddp()
        recon = 0.5 * ((x - codes @ self.dictionary.T) ** 2).sum(dim=1)
        return (recon + self.sparsity * codes.abs().sum(dim=1)).mean()


class TrainingLoss(nn.Module):
    """A model and its training loss as one module: ``forward(*xs)`` returns ``model.loss(*xs, model(*xs))``.

    This is the module to wrap in ``DistributedDataParallel`` (or to compile
    as a whole): DDP synchronises only the gradients of what its own forward
    computes, so the loss must be computed inside it.

    Args:
        model: one of this module's models (anything with ``forward`` and
            ``loss(*inputs, output)``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *xs: Any) -> torch.Tensor:
        """The scalar training loss of the model on inputs ``xs``."""
        return self.model.loss(*xs, self.model(*xs))
