"""Gradients of an iteration module's fixed point with respect to its parameters.

The forward pass of an :class:`~torchiter.IterationLossModule` minimises
``iteration_loss`` over the iteration parameters ``z`` with the module's
parameters ``θ`` (and the inputs) held fixed, and returns ``z`` detached. With
``fixed_point_gradient`` set, the returned ``z`` carries gradients with
respect to ``θ`` and to the inputs that require grad, so the module can sit
inside a larger network trained by backpropagation:

* ``FixedPointGradient("implicit")`` differentiates the fixed point itself.
  At ``z*`` the loss is stationary, ``∇_z L(z*, θ) = 0``, on the entries the
  projection does not hold (the *active set*; held entries are locally
  constant and get no gradient). For an upstream gradient ``v`` the backward
  solves ``H u = v`` on the active set with ``H = ∇²_zz L`` by conjugate
  gradient, each step one Hessian-vector product (a double backward through
  ``iteration_loss``), then returns ``-(∂∇_z L / ∂θ)ᵀ u``. Cost: one
  differentiable gradient of the loss at the end of the forward (its graph is
  kept until the output is freed) and up to ``cg_max_iterations`` Hessian-
  vector products in the backward (CG reads its residual on the host once
  per step: the backward is not the hot loop); memory independent of the
  number of forward iterations. Appropriate when the loop converges and the loss is
  strictly convex in ``z`` on the active set (``H`` positive definite there,
  as CG needs).
* ``FixedPointGradient("unrolled", unroll=k)`` runs the loop for
  ``max_iterations - k`` iterations as usual, then the last ``k`` projected
  SGD steps ``z ← P(z − lr·∇_z L)`` with autograd recording them (from the
  point the loop reached, also when it stopped early), and differentiates
  those ``k`` steps exactly (truncated backpropagation, the "phantom
  gradient" of deep-equilibrium models). Memory and time grow with ``k``;
  no convexity is assumed and no linear solve can fail, so it suits loops that
  do not fully converge, non-convex losses or a cheap approximate gradient.
  Needs SGD without momentum as the iteration optimizer.

The models of :mod:`torchiter.models` (quadratic loops) take both modes too;
``"implicit"`` then uses ``torch.ops.torchiter.quadratic_descent``'s own
backward (an exact batched solve on each sample's active set) and needs no
conjugate gradient.

What the forward returns is matched to the iteration parameters by identity
or shared memory (the usual ``return self.state.detach()``): each returned
tensor that is an iteration parameter, or a view of one with the same shape,
is replaced by its differentiable copy. The module's own state is not
changed. Projections must act elementwise (clamps, ReLU, soft thresholds).

Example::

    model = torchiter.models.SparseCoding(64, 32, fixed_point_gradient=FixedPointGradient("implicit"))
    codes = model(x)                  # differentiable in model.dictionary and x
"""

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import stats as _stats
from .projections import fused_projection_args
from .reference import project

__all__ = ["FixedPointGradient"]

_MODES = ("implicit", "unrolled")


class FixedPointGradient:
    """How the fixed point an iteration module returns is differentiated.

    Args:
        mode: ``"implicit"`` (differentiate the fixed point by a linear solve)
            or ``"unrolled"`` (differentiate the last ``unroll`` iterations).
        unroll: ``k`` of ``"unrolled"``, ``>= 1``; iterations differentiated.
        cg_max_iterations: conjugate-gradient steps at most, per backward
            (``"implicit"`` on generic modules).
        cg_tol: CG stops when the residual norm falls below ``cg_tol`` times
            the norm of the upstream gradient.

    Raises:
        ValueError: for an unknown mode or a non-positive count.
    """

    def __init__(
        self, mode: str = "implicit", unroll: int = 10, cg_max_iterations: int = 100, cg_tol: float = 1e-10
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"FixedPointGradient: mode must be one of {_MODES}, got {mode!r}")
        if unroll < 1:
            raise ValueError(f"FixedPointGradient: unroll must be >= 1, got {unroll}")
        if cg_max_iterations < 1:
            raise ValueError(f"FixedPointGradient: cg_max_iterations must be >= 1, got {cg_max_iterations}")
        if not cg_tol >= 0:
            raise ValueError(f"FixedPointGradient: cg_tol must be >= 0, got {cg_tol}")
        self.mode = mode
        self.unroll = unroll
        self.cg_max_iterations = cg_max_iterations
        self.cg_tol = cg_tol

    def __repr__(self) -> str:
        extra = f", unroll={self.unroll}" if self.mode == "unrolled" else f", cg_max_iterations={self.cg_max_iterations}, cg_tol={self.cg_tol}"
        return f"FixedPointGradient({self.mode!r}{extra})"


def run_forward(module: nn.Module, run: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """``module.forward`` with its result made differentiable (called by the module).

    ``run`` is the plain forward; the module's ``post_iteration`` calls
    :meth:`_Plan.attach` through ``module._fp_pending`` while the state of
    the forward is still there.
    """
    cfg = module.fixed_point_gradient
    if not isinstance(cfg, FixedPointGradient):
        raise TypeError(
            f"{type(module).__name__}.fixed_point_gradient must be None or a FixedPointGradient, got {cfg!r}"
        )
    attrs = module.__dict__
    if attrs.get("_fp_pending") is not None or attrs.get("_it_running") is not None:
        # A forward of this instance is already running: leave its state
        # alone and let the plain forward report the nested call.
        return run(*args, **kwargs)
    plan = _Plan(cfg)
    max_iterations = module.max_iterations
    attrs["_fp_pending"] = plan
    if cfg.mode == "unrolled":
        attrs["max_iterations"] = max(0, max_iterations - cfg.unroll)
    try:
        out = run(*args, **kwargs)
    finally:
        attrs["max_iterations"] = max_iterations
        attrs["_fp_pending"] = None
    if plan.states is None:
        raise RuntimeError(
            f"{type(module).__name__}: fixed_point_gradient is set but post_iteration() did not reach "
            "IterationLossModule.post_iteration (call super().post_iteration() in overrides)"
        )
    replaced = [False]
    out = _substitute(out, plan.states, plan.outputs, replaced)
    if not replaced[0]:
        raise RuntimeError(
            f"{type(module).__name__}: fixed_point_gradient is set but forward returned none of the "
            "iteration parameters (or views of them with their shape), so there is nothing to differentiate"
        )
    return out


class _Plan:
    """One forward's differentiable outputs, made in post_iteration."""

    def __init__(self, cfg: FixedPointGradient) -> None:
        self.cfg = cfg
        self.states: Optional[List[torch.Tensor]] = None
        self.outputs: List[torch.Tensor] = []

    def attach(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        states = list(module.iteration_parameters())
        with torch.enable_grad():
            quadratic = getattr(module, "_fixed_point_quadratic", None)
            if quadratic is not None:
                outputs = _attach_quadratic(module, self.cfg, states, quadratic(*args, **kwargs))
            elif self.cfg.mode == "implicit":
                outputs = _attach_implicit(module, self.cfg, states, args, kwargs)
            else:
                outputs = _attach_unrolled(module, self.cfg, states, args, kwargs)
        self.states, self.outputs = states, outputs


def _substitute(out: Any, states: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], replaced: List[bool]) -> Any:
    if isinstance(out, torch.Tensor):
        for s, o in zip(states, outputs):
            if out is s or (
                out.shape == s.shape
                and out.dtype == s.dtype
                and out.device == s.device
                and out.numel() > 0
                and out.data_ptr() == s.data_ptr()
                and out.stride() == s.stride()
            ):
                replaced[0] = True
                return o
        return out
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_substitute(o, states, outputs, replaced) for o in out))
    if isinstance(out, (list, tuple)):
        return type(out)(_substitute(o, states, outputs, replaced) for o in out)
    if isinstance(out, dict):
        return {k: _substitute(v, states, outputs, replaced) for k, v in out.items()}
    return out


def _sgd_step_options(module: nn.Module, need_plain: bool) -> Tuple[float, float, bool]:
    """(lr, weight_decay, maximize) of the iteration optimizer's single group."""
    opt = module.iteration_optimizer
    groups = _stats.param_groups(opt)
    name = type(module).__name__
    if not groups or len(groups) != 1:
        raise ValueError(f"{name}: fixed_point_gradient needs an iteration optimizer with one param group")
    g = groups[0]
    if need_plain and (
        not isinstance(opt, torch.optim.SGD) or g.get("momentum", 0) != 0 or g.get("nesterov", False)
    ):
        raise ValueError(
            f"{name}: FixedPointGradient('unrolled') differentiates projected SGD steps; the iteration "
            f"optimizer must be SGD without momentum, got {type(opt).__name__} with momentum {g.get('momentum')}"
        )
    return float(g["lr"]), float(g.get("weight_decay", 0.0)), bool(g.get("maximize", False))


def _projection(module: nn.Module) -> Optional[Callable]:
    proj = module.iteration_projection
    opt_proj = getattr(module.iteration_optimizer, "projection", None)
    return proj if proj is not None else opt_proj


# ------------------------------------------------------------- quadratic loops


def _attach_quadratic(module, cfg, states, quad) -> List[torch.Tensor]:
    """Models: y = argmin ½yᵀAy − bᵀy over the projection, through the op."""
    (y,) = states
    A, b = quad
    name = type(module).__name__
    lr, wd, maximize = _sgd_step_options(module, need_plain=cfg.mode == "unrolled")
    if maximize:
        A, b = -A, -b
    if wd != 0:
        A = A + wd * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    proj = _projection(module)
    args = fused_projection_args(proj)
    if args is None:
        raise ValueError(
            f"{name}: fixed_point_gradient needs a projection the op expresses (None, ReLU, a "
            f"torchiter.projections object), got {proj!r}"
        )
    shrink, lo, hi = args
    if cfg.mode == "implicit":
        # Zero iterations from the fixed point: the op returns y itself, and
        # its autograd kernel differentiates the fixed point at y.
        out, _ = torch.ops.torchiter.quadratic_descent(y.detach(), A, b, 0.0, 0, 0.0, 1, None, shrink, lo, hi)
        return [out]
    z = y.detach()
    for _ in range(cfg.unroll):
        z = project(z - lr * (torch.einsum("ij,bj...->bi...", A, z) - b), shrink, lo, hi)
        lr = _next_lr(module, lr)
    return [z]


def _next_lr(module: nn.Module, lr: float) -> float:
    """Steps the scheduler, as the loop would, and returns the next rate."""
    sched = module.iteration_scheduler
    if sched is None:
        return lr
    sched.step()
    return float(module.iteration_optimizer.param_groups[0]["lr"])


# ------------------------------------------------------------- generic modules


def _bindings(module: nn.Module, states: Sequence[torch.Tensor]) -> List[Tuple[nn.Module, str, str]]:
    """Where each iteration parameter is stored: (owner, "_buffers"/"__dict__", name)."""
    found: List[Optional[Tuple[nn.Module, str, str]]] = [None] * len(states)
    for owner in module.modules():
        for kind, table in (("_buffers", owner._buffers), ("__dict__", owner.__dict__)):
            for key, value in table.items():
                if isinstance(value, torch.Tensor):
                    for i, s in enumerate(states):
                        if value is s and found[i] is None:
                            found[i] = (owner, kind, key)
    for i, f in enumerate(found):
        if f is None:
            raise ValueError(
                f"{type(module).__name__}: fixed_point_gradient needs each iteration parameter stored as a "
                f"buffer or attribute of the module (or a submodule); iteration_parameters()[{i}] was not found"
            )
    return found  # type: ignore[return-value]


class _Bound:
    """Temporarily stores other tensors where the iteration parameters live,
    so ``iteration_loss`` reads them (as ``torch.func.functional_call`` does
    for parameters and buffers, extended to plain attributes)."""

    def __init__(self, bindings, tensors) -> None:
        self.bindings, self.tensors = bindings, tensors

    def __enter__(self) -> None:
        self.saved = []
        for (owner, kind, key), t in zip(self.bindings, self.tensors):
            table = owner._buffers if kind == "_buffers" else owner.__dict__
            self.saved.append(table[key])
            table[key] = t

    def __exit__(self, *exc: Any) -> None:
        for (owner, kind, key), old in zip(self.bindings, self.saved):
            (owner._buffers if kind == "_buffers" else owner.__dict__)[key] = old


def _leaves(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.requires_grad and all(x is not o for o in out):
                out.append(x)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)

    visit(args)
    visit(kwargs)
    return out


def _differentiated(module: nn.Module, args, kwargs) -> List[torch.Tensor]:
    """Module parameters and inputs that the output's gradient reaches."""
    params = [p for p in module.parameters() if p.requires_grad]
    inputs = [x for x in _leaves(args, kwargs) if all(x is not p for p in params)]
    return params + inputs


def _loss_gradient(module, bindings, z, args, kwargs) -> List[torch.Tensor]:
    """``∇_z iteration_loss`` at ``z``, with its graph (create_graph)."""
    with _Bound(bindings, z):
        loss = module.iteration_loss(*args, **kwargs)
    return list(torch.autograd.grad(loss, z, create_graph=True))


def _attach_implicit(module, cfg, states, args, kwargs) -> List[torch.Tensor]:
    bindings = _bindings(module, states)
    theta = _differentiated(module, args, kwargs)
    z = [s.detach().clone().requires_grad_(True) for s in states]
    g = _loss_gradient(module, bindings, z, args, kwargs)
    proj = _projection(module)
    masks: List[Optional[torch.Tensor]] = [None] * len(z)
    if proj is not None:
        lr, wd, maximize = _sgd_step_options(module, need_plain=False)
        for i, (zi, gi) in enumerate(zip(z, g)):
            step = -gi if maximize else gi
            w = (zi - lr * (step + wd * zi)).detach().requires_grad_(True)
            # The projection's slope at the pre-projection point: 1 on the
            # active set, 0 where it holds the entry. For an elementwise
            # projection the gradient of its sum is that diagonal (reverse
            # mode: torch.func.jvp would load TorchScript decompositions).
            (slope,) = torch.autograd.grad(proj(w).sum(), w)
            masks[i] = (slope != 0).to(w.dtype)
    solver = _CGSolver(cfg, z, g, theta, masks)
    return list(_ImplicitFixedPoint.apply(solver, *theta))


class _CGSolver:
    """Backward of the implicit mode: CG on the masked Hessian, then a VJP."""

    def __init__(self, cfg, z, g, theta, masks) -> None:
        self.cfg, self.z, self.g, self.theta, self.masks = cfg, z, g, theta, masks

    def _mask(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [x if m is None else x * m for x, m in zip(xs, self.masks)]

    def _hvp(self, p: List[torch.Tensor]) -> List[torch.Tensor]:
        hp = torch.autograd.grad(self.g, self.z, self._mask(p), retain_graph=True, allow_unused=True)
        return self._mask([torch.zeros_like(z) if h is None else h for z, h in zip(self.z, hp)])

    def solve(self, v: List[torch.Tensor]) -> List[torch.Tensor]:
        """``u`` with ``H_SS u_S = v_S`` and ``u = 0`` off the active set."""
        dot = lambda a, b: sum((x * y).sum() for x, y in zip(a, b))  # noqa: E731
        b = self._mask(v)
        u = [torch.zeros_like(x) for x in b]
        r = [x.clone() for x in b]
        p = [x.clone() for x in r]
        rr = dot(r, r)
        norm_b = float(rr) ** 0.5
        residual = norm_b
        for _ in range(self.cfg.cg_max_iterations):
            if residual <= norm_b * self.cfg.cg_tol or residual == 0:
                break
            hp = self._hvp(p)
            alpha = rr / dot(p, hp)
            u = [ui + alpha * pi for ui, pi in zip(u, p)]
            r = [ri - alpha * hi for ri, hi in zip(r, hp)]
            rr_new = dot(r, r)
            p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]
            rr = rr_new
            residual = float(rr) ** 0.5
        if residual > norm_b * self.cfg.cg_tol:
            warnings.warn(
                f"FixedPointGradient('implicit'): conjugate gradient stopped after {self.cfg.cg_max_iterations} "
                f"iterations at relative residual {residual / norm_b:.3g} > cg_tol {self.cfg.cg_tol:g}; raise "
                "cg_max_iterations, or check that the loss is strictly convex in the state",
                RuntimeWarning,
                stacklevel=2,
            )
        return u

    def backward(self, v: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        with torch.enable_grad():
            u = self.solve(v)
            if not self.theta:
                return []
            grads = torch.autograd.grad(self.g, self.theta, [-x for x in u], retain_graph=True, allow_unused=True)
        return list(grads)


class _ImplicitFixedPoint(torch.autograd.Function):
    """Returns copies of the fixed point; their gradient is the solver's."""

    @staticmethod
    def forward(ctx, solver: _CGSolver, *theta: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.solver = solver
        return tuple(z.detach().clone() for z in solver.z)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *v: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        return (None, *ctx.solver.backward(list(v)))


def _attach_unrolled(module, cfg, states, args, kwargs) -> List[torch.Tensor]:
    bindings = _bindings(module, states)
    lr, wd, maximize = _sgd_step_options(module, need_plain=True)
    proj = _projection(module)
    z = [s.detach().clone().requires_grad_(True) for s in states]
    for _ in range(cfg.unroll):
        g = _loss_gradient(module, bindings, z, args, kwargs)
        new = []
        for zi, gi in zip(z, g):
            step = -gi if maximize else gi
            if wd != 0:
                step = step + wd * zi
            zi = zi - lr * step
            new.append(zi if proj is None else proj(zi))
        z = new
        lr = _next_lr(module, lr)
    return z
