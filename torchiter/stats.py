"""Statistics of an inner loop, kept on the device, and divergence reports.

After every forward, :class:`~torchiter.IterationLossModule` (and the models
built on it) leaves an :class:`IterationStats` in ``module.iteration_stats``:
how many iterations ran, whether the stopping test was met, the last change
``max |y_k − y_{k−1}|`` of the state and how it grew over the loop. Every
field is a tensor on the state's device, written by device ops without any
host synchronisation; reading a value (``bool``, ``float``, ``print``) waits
for the device, as reading any tensor does.

A projected gradient step with a step size ``lr <= 2/L`` on a convex loss
whose largest curvature is ``L`` never makes the change grow, so a change that
keeps growing, or a non-finite state or loss, means the loop diverges: most
often the step size is above ``2/L``. :func:`check_divergence` reports it
(one synchronisation per forward) with :class:`DivergenceWarning` or, in
strict mode, :class:`DivergenceError`, naming the step size and ``2/L`` with
``L`` estimated cheaply (:func:`estimate_lipschitz_hvp`,
:func:`estimate_lipschitz_matrix`) once divergence has been seen.
"""

import functools
import math
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from . import _internals

__all__ = [
    "IterationStats",
    "DivergenceError",
    "DivergenceWarning",
    "DIVERGENCE_MODES",
    "check_divergence",
    "check_divergence_mode",
    "estimate_lipschitz_hvp",
    "estimate_lipschitz_matrix",
    "step_size_hint",
    "StatsRecorder",
]

DIVERGENCE_MODES = ("warn", "error", "ignore")

# A change below NOISE_ULPS * eps * max(1, max|y|) is float rounding, not a step.
NOISE_ULPS = 16
# Two steps in opposite directions count as a non-decaying oscillation when the
# second is at least this close to the first's length (relative).
REVERSAL_TOLERANCE = 1e-3
# Growth must pass its limit by more than this (relative): a constant step
# (a linear loss, a gradient set by hand) has growth 1 up to rounding.
GROWTH_TOLERANCE = 1e-3


class DivergenceWarning(RuntimeWarning):
    """An inner loop diverged (non-finite state or loss, or a change that kept growing)."""


class DivergenceError(RuntimeError):
    """An inner loop diverged and the module was asked to fail (``divergence="error"``)."""


def check_divergence_mode(owner: str, mode: Any) -> str:
    """Returns ``mode`` if it is ``"warn"``, ``"error"`` or ``"ignore"``.

    Raises:
        ValueError: otherwise, naming ``owner``.
    """
    if not isinstance(mode, str) or mode not in DIVERGENCE_MODES:
        raise ValueError(
            f"{owner}: divergence must be one of {DIVERGENCE_MODES} ('warn' reports a diverging "
            f"inner loop with a DivergenceWarning, 'error' raises DivergenceError), got {mode!r}"
        )
    return mode


def _abs_max(t: torch.Tensor) -> torch.Tensor:
    if t.numel() <= 1 << 16:
        return t.abs().amax()
    # No |t| temporary: for a conv layer's state its allocation and page
    # faults cost several times the reduction. aminmax reads t once where
    # amax and amin read it twice (NaN propagates through it);
    # linalg.vector_norm(t, inf) is slower still on the CPU.
    lo, hi = torch.aminmax(t)
    return torch.maximum(hi, lo.neg())


def noise_floor(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype, eps: Optional[float] = None, device: Any = None
) -> torch.Tensor:
    """``NOISE_ULPS · eps · max(1, max |t|)`` over ``tensors``: a change below it
    is float rounding, not a step (``max |t|`` of no elements is 0). 0-dim,
    ``dtype``, on ``device`` (default: the first tensor's). ``eps`` defaults
    to ``dtype``'s. Every loop's statistics use this one definition."""
    scale = NOISE_ULPS * (torch.finfo(dtype).eps if eps is None else eps)
    if device is None and tensors:
        device = tensors[0].device
    full = [t.detach() for t in tensors if t.numel() > 0]
    if not full:
        return torch.full((), scale, dtype=dtype, device=device)
    with torch.no_grad():
        maxima = [_abs_max(t).to(dtype) for t in full]
        ymax = maxima[0] if len(maxima) == 1 else torch.stack(maxima).amax()
        return ymax.clamp(min=1.0).mul_(scale)


def growth_ratio(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``last / first`` elementwise: 0 where both are 0 (no change at all), inf
    where only ``first`` is 0, NaN where either is NaN.

    The one rule for ``growth`` on every path: the whole-loop op computes it
    alike in C++ (``make_ex_result``), and a NaN is never read as "not growing"
    by anything but the divergence test, which reports a NaN change anyway.
    """
    return torch.where((first == 0) & (last == 0), torch.zeros_like(last), last / first)


def _cpu_scalar(t: torch.Tensor) -> bool:
    return t.is_cpu and t.dim() == 0


@functools.lru_cache(maxsize=64)
def _rounded(value: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


class IterationStats:
    """Statistics of one forward's inner loop; every tensor on the state's device.

    Nothing here is synchronised with the device until read. The shape ``S``
    is ``()`` for a loop over the whole state, ``(B,)`` when every sample has
    its own stopping test (the models' per-sample stopping).

    Attributes:
        iterations: int64 ``S``, iterations run.
        converged: bool ``S``, the stopping test (``converged()``, an
            ``"iteration"`` hook, the models' ``tol``) ended the loop before
            ``max_iterations`` ran out.
        change: floating ``S``, ``max |y_k − y_{k−1}|`` of the last iteration
            over all iteration parameters; 0 when no iteration ran.
        growth: floating ``S``, change of the last iteration over that of the
            first (0 when both are 0, inf when only the first is 0, NaN when
            either is NaN: :func:`growth_ratio`, on every path); scaled by
            the ratio of the two iterations' learning rates when a scheduler
            changed it, so it measures the gradient step, not the schedule.
        late_growth: None, or floating ``S``: the same ratio from the middle
            iteration to the last; when given, a change counts as growing
            only if it grew over the whole loop and over its second half (it
            *keeps* growing).
        reversal: None, or bool ``S``: the last two steps point in opposite
            directions (negative inner product) and the last is no shorter
            than the one before: an oscillation that does not decay, which a
            projected gradient step with ``lr < 2/L`` on a convex loss never
            makes (plain SGD only; None otherwise).
        growth_limit: float, the growth above which the change counts as
            growing: 1 for plain SGD, more with momentum (whose steps grow
            while it builds up), inf for optimizers without a bound.
        change_trace: None, or a 1-D floating tensor of every iteration's
            change (``stats_trace=True``).
        loss_trace: None, or a 1-D tensor of every iteration's loss, detached
            (``stats_trace=True``, when the loop computes a loss).
        loss: None, or the last iteration's loss, a detached 0-dim tensor.
        noise: floating 0-dim tensor: a change below it is float rounding
            (``16 · eps(dtype) · max(1, max |y|)`` at the end).
        lr: the step size used at the first iteration (a Python float), or
            None when the optimizer has none that ``2/L`` applies to.
        per_call: 1, or ``k`` when ``torchiter.compile_iterations`` ran ``k``
            iterations per compiled call: ``change``, ``growth`` and
            ``change_trace`` are then per call (``k`` iterations each).
        path: the loop that ran: ``"quadratic_descent"`` (a model's whole
            loop as one op call), ``"compiled"`` (``compile_iterations``),
            ``"fused_step"`` (the Python loop, each step one fused SGD
            kernel call) or ``"generic"`` (``optimizer.step()`` and the
            projection as written).
        path_reason: None when the module ran the fastest loop it can have
            (the whole-loop op for the models, the compiled loop when
            switched on, else the fused step); otherwise one sentence naming
            what kept it from that loop.
    """

    def __init__(
        self,
        iterations: torch.Tensor,
        converged: torch.Tensor,
        change: torch.Tensor,
        growth: torch.Tensor,
        noise: Union[torch.Tensor, Callable[[], torch.Tensor]],
        *,
        late_growth: Optional[torch.Tensor] = None,
        reversal: Optional[torch.Tensor] = None,
        growth_limit: float = 1.0,
        change_trace: Optional[torch.Tensor] = None,
        loss_trace: Optional[torch.Tensor] = None,
        loss: Optional[torch.Tensor] = None,
        lr: Optional[float] = None,
        per_call: int = 1,
        path: str = "generic",
        path_reason: Optional[str] = None,
    ) -> None:
        self.iterations = iterations
        self.converged = converged
        self.change = change
        self.growth = growth
        self.late_growth = late_growth
        self.reversal = reversal
        self.growth_limit = growth_limit
        self.change_trace = change_trace
        self.loss_trace = loss_trace
        self.loss = loss
        # A callable is evaluated on first read (see the noise property).
        self._noise = noise
        self.lr = lr
        self.per_call = per_call
        self.path = path
        self.path_reason = path_reason
        # The state before the first iteration, kept by the module until its
        # divergence check (to estimate the curvature there); then dropped.
        self._initial: Optional[List[torch.Tensor]] = None

    @property
    def noise(self) -> torch.Tensor:
        """Floating 0-dim tensor: a change below it is float rounding.

        A loop may hand a CPU callable instead of the tensor: the reduction
        over the state then runs only when something reads it (the
        divergence check reads it only for a change that grew), not in
        every forward of a small problem, where it would be a visible share
        of the time."""
        noise = self._noise
        if not isinstance(noise, torch.Tensor):
            noise = self._noise = noise()
        return noise

    @noise.setter
    def noise(self, value: torch.Tensor) -> None:
        self._noise = value

    @property
    def diverging(self) -> torch.Tensor:
        """Bool tensor of ``change``'s shape: non-finite change or loss, or,
        without the stopping test met and with a last change above ``noise``,
        a change that grew above ``growth_limit`` (over the whole loop, and
        over its second half when ``late_growth`` is known) or a non-decaying oscillation
        (``reversal``). Computed on the device; no synchronisation."""
        # Out of place throughout: the fields may differ in shape (per-sample
        # counts with batch-wide changes) and broadcast.
        limit = self.growth_limit * (1 + GROWTH_TOLERANCE)
        growing = self.growth > limit
        if self.late_growth is not None:
            growing = growing & (self.late_growth > limit)
        if self.reversal is not None:
            growing = growing | self.reversal
        growing = growing & (self.change > self.noise) & ~self.converged
        finite = torch.isfinite(self.change)
        losses = self.loss_trace if self.loss_trace is not None else self.loss
        if losses is not None and losses.numel() > 0:
            finite = finite & (torch.isfinite(losses) if losses.dim() == 0 else torch.isfinite(losses).all())
        return growing | ~finite

    def _any_diverging(self) -> bool:
        """``bool(diverging.any())``. When every field is a CPU scalar (the
        common case: batch-wide statistics of a CPU loop) the same test runs
        on Python floats, a few microseconds instead of a dozen small tensor
        ops per forward."""
        # A noise not computed yet is a CPU scalar (the contract of a callable
        # noise): only the fields already there decide the path. Written out
        # field by field: this runs after every forward.
        noise = self._noise
        losses = self.loss_trace if self.loss_trace is not None else self.loss
        scalars = (
            _cpu_scalar(self.change)
            and _cpu_scalar(self.growth)
            and _cpu_scalar(self.converged)
            and (not isinstance(noise, torch.Tensor) or _cpu_scalar(noise))
            and (self.late_growth is None or _cpu_scalar(self.late_growth))
            and (self.reversal is None or _cpu_scalar(self.reversal))
            and (losses is None or losses.is_cpu)
        )
        if not scalars:
            if (
                self.late_growth is None
                and self.reversal is None
                and losses is None
                and self.change.numel() > 0
                and self.growth.numel() > 0
            ):
                # Per-sample statistics: two reductions decide the common
                # case (every change finite, no growth past the limit; a NaN
                # growth fails the comparison and takes the full test)
                # instead of the dozen elementwise ops of `diverging`.
                if not math.isfinite(float(self.change.max())):
                    return True
                limit = _rounded(self.growth_limit * (1 + GROWTH_TOLERANCE), self.growth.dtype)
                if float(self.growth.max()) <= limit:
                    return False
            d = self.diverging
            return bool(d if d.dim() == 0 else d.any())
        change = float(self.change)
        if not math.isfinite(change):
            return True
        if losses is not None and losses.numel() > 0:
            if not (math.isfinite(float(losses)) if losses.dim() == 0 else bool(torch.isfinite(losses).all())):
                return True
        # Rounded to the statistics' dtype, as the tensor comparison does.
        limit = _rounded(self.growth_limit * (1 + GROWTH_TOLERANCE), self.growth.dtype)
        # Host reads in the order that ends the test soonest: a converging
        # loop is decided by its growth alone.
        growing = float(self.growth) > limit
        if growing and self.late_growth is not None:
            growing = float(self.late_growth) > limit
        if not growing and self.reversal is not None:
            growing = bool(self.reversal)
        return growing and change > float(self.noise) and not bool(self.converged)

    def to_dict(self) -> Dict[str, Any]:
        """The statistics as Python values (synchronises): scalars for shape ``()``, lists otherwise."""

        def value(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            return x.item() if x.dim() == 0 else x.tolist()

        return {
            "iterations": value(self.iterations),
            "converged": value(self.converged),
            "change": value(self.change),
            "growth": value(self.growth),
            "diverging": value(self.diverging),
            "noise": value(self.noise),
            "lr": self.lr,
            "change_trace": value(self.change_trace),
            "loss_trace": value(self.loss_trace),
            "loss": value(self.loss),
            "path": self.path,
            "path_reason": self.path_reason,
        }

    def summary(self) -> str:
        """One line for people (synchronises), e.g.
        ``"12 iterations, converged, last change 3.1e-07"``."""
        unit = f" ({self.per_call} iterations per compiled call)" if self.per_call != 1 else ""
        if self.iterations.dim() == 0:
            n = int(self.iterations)
            words = [f"{n} iteration{'s' if n != 1 else ''}"]
            words.append("converged" if bool(self.converged) else "not converged (max_iterations reached)")
            words.append(f"last change {float(self.change):.3g}")
            if not bool(self.converged):
                words.append(f"growth {float(self.growth):.3g}")
            if self.loss is not None:
                words.append(f"loss {float(self.loss):.6g}")
            if bool(self.diverging):
                words.append("DIVERGING")
            return ", ".join(words) + unit
        n = self.iterations
        conv = self.converged
        div = self.diverging
        return (
            f"{n.numel()} samples: {int(conv.sum())} converged, {int(div.sum())} diverging; iterations "
            f"{int(n.min())}..{int(n.max())}; largest last change {float(self.change.max()):.3g}" + unit
        )

    def __repr__(self) -> str:
        return f"IterationStats({self.summary()})"


# ----------------------------------------------------------------------------- recording


def param_groups(optimizer: Any) -> Optional[List[Dict[str, Any]]]:
    """``optimizer.param_groups`` when it is a list of dicts (torch.optim's), else None.

    An iteration optimizer is anything with ``step()`` and ``zero_grad()`` (a
    wrapper, a mock, one of the user's own); what needs a learning rate reads
    it from here and does without it when there is none.
    """
    groups = getattr(optimizer, "param_groups", None)
    if isinstance(groups, (list, tuple)) and all(isinstance(g, dict) for g in groups):
        return list(groups)
    return None


def _lr_of(optimizer: Any) -> Optional[float]:
    """The first param group's learning rate as a float, without reading a tensor."""
    groups = param_groups(optimizer)
    if not groups:
        return None
    lr = groups[0].get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    return None


def _max_change(params: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    # torch.dist(.., inf) is max|a − b| in one op, and propagates NaN.
    if len(params) == 1:
        return torch.dist(params[0].detach(), prev[0], math.inf).to(dtype)
    return torch.stack([torch.dist(p.detach(), q, math.inf).to(dtype) for p, q in zip(params, prev)]).amax()


class StatsRecorder:
    """Collects one loop's :class:`IterationStats` with device ops only.

    The loop calls ``before(i)`` before step ``i`` and ``after(i, loss)``
    after it wherever ``wants(i)`` is true, and at every step when the loop
    may stop early (the last step is then not known in advance); then
    ``finish``. Without a trace the state is copied before the first, the
    middle and the last two steps only.

    Args:
        params: the iteration parameters (empty ones are ignored).
        total: the most steps the loop can run.
        trace: record every step's change and loss.
        keep_initial: keep the state before the first step (for a diagnosis).
        optimizer: read for the learning rate at the recorded steps.
        growth_limit: see :class:`IterationStats`.
        per_call: iterations per step (``compile_iterations``).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        total: int,
        *,
        trace: bool = False,
        keep_initial: bool = False,
        optimizer: Any = None,
        growth_limit: float = 1.0,
        per_call: int = 1,
    ) -> None:
        self.params = [p for p in params if isinstance(p, torch.Tensor) and p.numel() > 0]
        first = self.params[0] if self.params else (params[0] if params else None)
        self.device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
        dtype = first.dtype if isinstance(first, torch.Tensor) else torch.float32
        for p in self.params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = torch.promote_types(dtype, torch.float32)
        self.eps = max(torch.finfo(p.dtype).eps for p in self.params) if self.params else torch.finfo(self.dtype).eps
        self.mid = total // 2
        self.marks = frozenset((0, self.mid, total - 2, total - 1))
        self.trace = trace
        self.keep_initial = keep_initial
        self.optimizer = optimizer
        self.growth_limit = growth_limit
        self.per_call = per_call
        self.total = total
        self.may_stop = False
        self.prev: Optional[List[torch.Tensor]] = None
        self.initial: Optional[List[torch.Tensor]] = None
        self.first = self.middle = None
        self.lr_first = self.lr_middle = self.lr_now = None
        # The last two steps: (index, change, lr, difference y_i − y_{i−1}).
        self.steps: List[Any] = []
        self.changes: List[torch.Tensor] = []
        self.losses: List[torch.Tensor] = []
        self.loss_ok = trace
        self.loss_seen: Any = None

    def wants(self, i: int) -> bool:
        return self.trace or i in self.marks

    def before(self, i: int, may_stop: bool = False) -> None:
        """Before step ``i``; ``may_stop``: a stopping test may end the loop after it."""
        if self.params:
            self.prev = [p.detach().clone() for p in self.params]
            self.lr_now = _lr_of(self.optimizer)
            self.may_stop = may_stop

    def after(self, i: int, loss: Any = None) -> None:
        prev = self.prev
        if prev is not None:
            # The differences themselves are kept only where they may be the
            # last two (for the reversal test of plain SGD).
            diff = None
            if self.growth_limit == 1.0 and (self.may_stop or i >= self.total - 2):
                diff = [p.detach() - q for p, q in zip(self.params, prev)]
                norms = [torch.linalg.vector_norm(d, math.inf) for d in diff]
            else:
                # max|a − b| in one op; propagates NaN.
                norms = [torch.dist(p.detach(), q, math.inf) for p, q in zip(self.params, prev)]
            if len(norms) == 1:
                c = norms[0]
            else:
                c = torch.stack([n.to(self.dtype) for n in norms]).amax()
            if c.dtype != self.dtype:
                c = c.to(self.dtype)
            if i == 0:
                self.first, self.lr_first = c, self.lr_now
                if self.keep_initial:
                    self.initial = prev
            if i == self.mid:
                self.middle, self.lr_middle = c, self.lr_now
            self.steps = self.steps[-1:] + [(i, c, self.lr_now, diff)]
            if self.trace:
                self.changes.append(c)
            self.prev = None
        if self.trace and self.loss_ok:
            if isinstance(loss, torch.Tensor) and loss is not self.loss_seen and loss.numel() == 1:
                self.losses.append(loss.detach().reshape(()))
                self.loss_seen = loss
            elif isinstance(loss, float):
                self.losses.append(torch.full((), loss, device=self.device))
            else:
                self.loss_ok = False

    def finish(self, steps: int, stopped: bool, loss: Any = None, lr: Optional[float] = None) -> IterationStats:
        """The statistics of a loop that ran ``steps`` steps; ``stopped``: its stopping test ended it."""
        dev = self.device
        late = reversal = None
        if steps > 0 and self.steps and self.steps[-1][0] == steps - 1 and self.first is not None:
            _, change, lr_last, d2 = self.steps[-1]
            # The ratios of the last change to the first, the middle and the
            # one before it, in one division.
            dens, lrs = [self.first], [self.lr_first]
            has_late = self.middle is not None and steps - 1 > self.mid
            if has_late:
                dens.append(self.middle)
                lrs.append(self.lr_middle)
            has_reversal = len(self.steps) == 2 and self.steps[0][0] == steps - 2 and d2 is not None
            if has_reversal:
                _, c1, lr1, d1 = self.steps[0]
                has_reversal = d1 is not None
            if has_reversal:
                dens.append(c1)
                lrs.append(lr1)
            ratios = growth_ratio(torch.stack(dens), change)
            # A scheduler's rates: compare gradient steps, not step lengths.
            scale = [a / lr_last if a and lr_last else 1.0 for a in lrs]
            if any(x != 1.0 for x in scale):
                ratios = ratios * torch.tensor(scale, dtype=self.dtype).to(dev)
            growth = ratios[0]
            if has_late:
                late = ratios[1]
            if has_reversal:
                dot = torch.dot(d1[0].reshape(-1), d2[0].reshape(-1))
                for a, b in zip(d1[1:], d2[1:]):
                    dot = dot + torch.dot(a.reshape(-1), b.reshape(-1)).to(dot.dtype)
                reversal = (dot < 0) & (ratios[-1] >= 1 - REVERSAL_TOLERANCE)
        else:
            # No step ran or nothing to change (0), or the loop's last step was
            # not recorded (nan: unknown).
            unknown = steps > 0 and bool(self.params)
            change = growth = torch.full((), math.nan if unknown else 0.0, dtype=self.dtype, device=dev)
        if self.params:
            noise = noise_floor(self.params, self.dtype, self.eps)
        else:
            noise = torch.zeros((), dtype=self.dtype, device=dev)
        change_trace = loss_trace = None
        if self.trace:
            with torch.no_grad():
                change_trace = torch.stack(self.changes) if self.changes else noise.new_zeros(0)
                if self.loss_ok and len(self.losses) == steps:
                    loss_trace = torch.stack(self.losses) if self.losses else noise.new_zeros(0)
        last_loss = None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            last_loss = loss.detach().reshape(())
        elif isinstance(loss, float):
            last_loss = torch.full((), loss, device=dev)
        stats = IterationStats(
            torch.full((), steps * self.per_call, dtype=torch.int64, device=dev),
            torch.full((), bool(stopped), dtype=torch.bool, device=dev),
            change,
            growth,
            noise,
            late_growth=late,
            reversal=reversal,
            growth_limit=self.growth_limit,
            change_trace=change_trace,
            loss_trace=loss_trace,
            loss=last_loss,
            lr=lr,
            per_call=self.per_call,
        )
        stats._initial = self.initial
        return stats


# ----------------------------------------------------------------------------- curvature


def estimate_lipschitz_matrix(A: torch.Tensor, iters: int = 30) -> float:
    """Largest curvature ``L = ‖A‖₂`` of the quadratic ``½yᵀAy − bᵀy`` (A symmetric).

    Exact (``torch.linalg.matrix_norm(A, 2)``) for ``A`` up to 64 × 64, power
    iteration otherwise. ``L`` of a least-squares loss ``½‖Ay − b‖²`` is that
    of ``AᵀA``, i.e. ``‖A‖₂²``: pass ``A.T @ A``, or ``A`` itself for a
    rectangular ``A`` (then ``‖A‖₂²`` is returned). Synchronises.

    Args:
        A: ``(n, n)`` (symmetric) or ``(m, n)`` floating tensor, any device.
        iters: power-iteration steps for large ``A``.
    """
    A = A.detach()
    if A.dim() != 2:
        raise ValueError(f"estimate_lipschitz_matrix: A must be 2-D, got shape {tuple(A.shape)}")
    if A.dtype not in (torch.float32, torch.float64):
        A = A.float()
    square = A.shape[0] == A.shape[1]
    if max(A.shape) <= 64:
        s = float(torch.linalg.matrix_norm(A, 2))
        return s if square else s * s
    g = torch.Generator().manual_seed(0)
    v = torch.randn(A.shape[1], generator=g, dtype=A.dtype).to(A.device)
    lam = 0.0
    for _ in range(iters):
        w = A @ v if square else A.T @ (A @ v)
        lam = float(w.norm())
        if lam == 0 or not math.isfinite(lam):
            break
        v = w / lam
    return lam


def estimate_lipschitz_hvp(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], iters: int = 20) -> float:
    """Largest curvature ``L`` of ``loss_fn()`` at the current ``params``.

    Power iteration on Hessian-vector products (double backward), ``iters``
    products; exact for a quadratic (up to the power iteration's
    convergence), the local curvature otherwise. Meant for a diagnosis after
    divergence, not for the loop. Synchronises.

    Args:
        loss_fn: computes a scalar loss from ``params``.
        params: tensors requiring grad that ``loss_fn`` reads.
        iters: Hessian-vector products.
    """
    params = list(params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None and g.requires_grad]
    if not pairs:
        return 0.0
    ps, gs = [p for p, _ in pairs], [g for _, g in pairs]
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in ps]
    norm = math.sqrt(sum(float((x * x).sum()) for x in v)) or 1.0
    v = [x / norm for x in v]
    lam = 0.0
    for _ in range(iters):
        hv = torch.autograd.grad(gs, ps, grad_outputs=v, retain_graph=True, allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(ps, hv)]
        lam = math.sqrt(sum(float((h * h).sum()) for h in hv))
        if lam == 0 or not math.isfinite(lam):
            break
        v = [h / lam for h in hv]
    return lam


def step_size_hint(lr: Optional[float], L: Optional[float], name: str = "iteration_lr", how: str = "estimated") -> str:
    """The sentence naming the likely cause of a divergence: ``lr`` against ``2/L``."""
    if L is None or not math.isfinite(L):
        if lr is None:
            return "the optimizer's step is likely too large for the loss's curvature"
        return (
            f"the step size {name}={lr:g} is likely above 2/L, L being the loss's largest curvature "
            "(it could not be estimated here)"
        )
    if L <= 0:
        return "the loss has no curvature at the starting point (L ≈ 0): it may be unbounded below"
    if lr is None:
        return f"the optimizer's step is likely too large for the loss's largest curvature L ≈ {L:.3g} ({how})"
    if lr > 2.0 / L * (1 + 1e-6):
        return f"{name}={lr:g} is above 2/L = {2.0 / L:.3g} (L ≈ {L:.3g} {how}): use {name} <= 1/L = {1.0 / L:.3g}"
    if lr >= 2.0 / L * (1 - 1e-6):
        return (
            f"{name}={lr:g} equals 2/L = {2.0 / L:.3g} (L ≈ {L:.3g} {how}), where the step no longer "
            f"contracts: use {name} <= 1/L = {1.0 / L:.3g}"
        )
    return (
        f"{name}={lr:g} is below 2/L = {2.0 / L:.3g} at the starting point (L ≈ {L:.3g} {how}), so the step "
        "size alone does not explain it: the curvature may grow away from the start, the loss may be "
        "unbounded below, or the inputs may be non-finite"
    )


# ----------------------------------------------------------------------------- the report


def _fmt(x: torch.Tensor, reduce: str = "max") -> str:
    x = x.detach().float()
    v = float(x.max()) if (reduce == "max" and x.dim() > 0) else float(x.reshape(-1)[0]) if x.dim() > 0 else float(x)
    return f"{v:.3g}"


def divergence_message(stats: IterationStats, owner: str, hint: Optional[str]) -> str:
    """What was seen and the likely cause (synchronises)."""
    diverging = stats.diverging
    where = ""
    if stats.change.dim() > 0:
        where = f" in {int(diverging.sum())} of {diverging.numel()} samples"
    n = int(stats.iterations.max())
    losses = stats.loss_trace if stats.loss_trace is not None else stats.loss
    if not bool(torch.isfinite(stats.change).all()):
        seen = f"the state became non-finite (last change {_fmt(stats.change)} after {n} iterations)"
    elif losses is not None and losses.numel() > 0 and not bool(torch.isfinite(losses).all()):
        seen = f"the loss became non-finite within {n} iterations"
    else:
        zeros = torch.zeros_like(stats.growth)
        grown = torch.where(diverging, stats.growth, zeros)
        last = _fmt(torch.where(diverging, stats.change, torch.zeros_like(stats.change)))
        if float(grown.max()) > stats.growth_limit:
            seen = (
                f"the change max|y_k − y_{{k−1}}| grew by a factor {_fmt(grown)} over {n} iterations "
                f"(last change {last}) and the stopping test was not met"
            )
        else:
            seen = (
                f"the state oscillates without decaying: the last two steps point in opposite directions "
                f"and the last is no shorter (last change {last} after {n} iterations), and the stopping "
                "test was not met"
            )
    msg = f"{owner}: the inner loop diverges{where}: {seen}."
    if hint:
        msg += f" Likely cause: {hint}."
    return msg


def check_divergence(
    stats: Optional[IterationStats],
    mode: str = "warn",
    owner: str = "",
    hint: Union[None, str, Callable[[], Optional[str]]] = None,
) -> bool:
    """Reports a diverging loop; returns whether it diverged.

    Reads ``stats.diverging`` once (one host synchronisation); nothing at all
    when ``mode == "ignore"`` or ``stats`` is None.

    Args:
        stats: one forward's statistics.
        mode: ``"warn"`` (a :class:`DivergenceWarning`), ``"error"``
            (:class:`DivergenceError`) or ``"ignore"``.
        owner: who ran the loop (a class name), first in the message.
        hint: the likely cause, or a callable returning it, called only when
            the loop diverged (e.g. one that estimates ``L``; see
            :func:`step_size_hint`).

    Raises:
        DivergenceError: in ``"error"`` mode, when the loop diverged.
        ValueError: for an unknown ``mode``.
    """
    check_divergence_mode(owner or "check_divergence", mode)
    if mode == "ignore" or stats is None:
        return False
    if not _internals.values_readable(stats.change):
        # Traced (torch.compile, torch.export) or shape-only (meta, fake)
        # forwards have no values to test; the compiled or exported graph
        # holds no check either (docs/deployment.md's torch.export section says
        # what a compiled or exported model reports).
        return False
    if not stats._any_diverging():
        return False
    if callable(hint):
        try:
            hint = hint()
        except Exception as e:  # the diagnosis must never hide the report
            hint = f"the step size is likely above 2/L (estimating L failed: {type(e).__name__}: {e})"
    msg = divergence_message(stats, owner, hint)
    if mode == "error":
        raise DivergenceError(msg)
    warnings.warn(
        msg + " (divergence='error' makes this an error, 'ignore' silences it)",
        DivergenceWarning,
        stacklevel=_caller_stacklevel(),
    )
    return True


_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.nn.modules.module.__file__)) + os.sep,
)


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside torchiter and nn.Module's call machinery."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    return level
