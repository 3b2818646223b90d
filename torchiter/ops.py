"""Typed, documented wrappers of the ``torch.ops.torchiter`` ops.

The wrappers add keyword defaults and docstrings only; they call
``torch.ops.torchiter.<name>`` (not ``.default``) so that they stay scriptable
and resolve the ``Tensor lr`` overload of :func:`sgd_step_` by type. The raw
ops work the same in TorchScript: scripted calls of ``sgd_step_`` bind to
entry points with side effects, so a graph never drops the step.
"""

from typing import List, NamedTuple, Optional, Tuple, Union

import torch

__all__ = ["sgd_step_", "quadratic_descent", "quadratic_descent_ex", "QuadraticDescentResult"]


def sgd_step_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    momentum_buffers: List[torch.Tensor],
    lr: Union[float, torch.Tensor],
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    shrink: float = 0.0,
    min: Optional[float] = None,
    max: Optional[float] = None,
) -> None:
    """One fused projected-SGD step over lists of tensors, in place.

    Per element (in float32 for float16/bfloat16, else in the tensor's dtype),
    exactly ``torch.optim.SGD``'s update followed by the projection::

        g = -grad if maximize else grad
        g = g + weight_decay * p
        buf = g if first_step else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf       (if momentum != 0)
        v = p - lr * g
        v = sign(v) * max(|v| - shrink, 0)                (if shrink > 0)
        p = clamp(v, min, max)                            (bounds that are given)

    Args:
        params: tensors updated in place; float32, float64, float16 or
            bfloat16, any shape, all on one device (CPU or CUDA). Non-contiguous
            params are updated through their strides.
        grads: one per param, same shape, dtype and device.
        momentum_buffers: empty when ``momentum == 0``, else one per param
            (same shape, dtype, device), updated in place.
        lr: learning rate, ``>= 0``; a float or a 0-dim floating tensor on the
            params' device (the tensor form needs no host synchronisation and
            can be captured in a CUDA graph).
        momentum, dampening, weight_decay, nesterov, maximize: as in
            ``torch.optim.SGD``.
        first_step: initialise the momentum buffer to the gradient (SGD's
            first step) instead of blending it.
        shrink: soft-threshold width, ``>= 0`` (0 disables it).
        min, max: optional clamp bounds (``min=0`` is a ReLU projection).

    Raises:
        RuntimeError: on bad input, naming the argument; raised before any
            tensor is written. Rejected too: a written tensor (param or
            buffer) that shares memory with any other tensor of the call or
            with itself, an inference tensor outside inference mode, and a
            param or buffer that requires grad while grad mode is on (call the
            step under ``torch.no_grad()``, as optimizers do).
    """
    # A tensor lr must reach the Tensor overload, never be read as a float (a
    # host synchronisation on CUDA). TorchScript refines lr's Union type per
    # branch and matches the overload by type; eager Python tries overloads in
    # order (float first), so it names the overload.
    if isinstance(lr, torch.Tensor):
        if torch.jit.is_scripting():
            torch.ops.torchiter.sgd_step_(
                params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                nesterov, maximize, first_step, shrink, min, max,
            )
        else:
            torch.ops.torchiter.sgd_step_.tensor_lr(
                params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                nesterov, maximize, first_step, shrink, min, max,
            )
    elif torch.jit.is_scripting():
        torch.ops.torchiter.sgd_step_(
            params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
            nesterov, maximize, first_step, shrink, min, max,
        )
    else:
        torch.ops.torchiter.sgd_step_.default(
            params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
            nesterov, maximize, first_step, shrink, min, max,
        )


def quadratic_descent(
    y0: torch.Tensor,
    A: torch.Tensor,
    b: torch.Tensor,
    lr: float,
    max_iterations: int,
    tol: float = 0.0,
    check_every: int = 1,
    lrs: Optional[torch.Tensor] = None,
    shrink: float = 0.0,
    min: Optional[float] = None,
    max: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A whole projected-gradient loop on ``f(y) = ½ yᵀAy − bᵀy`` in one call.

    Each iteration ``k`` computes ``y ← project(y − lr_k · (A·y − b))`` where
    ``A·y`` mixes channels (dim 1) at every sample and spatial position, i.e.
    ``einsum("ij,bj...->bi...", A, y)``. After iteration ``k ≥ 1`` with
    ``k % check_every == 0`` the loop stops if ``max |y_k − y_{k−1}| < tol``.

    Args:
        y0: start point, shape ``(B, C, *spatial)``, float32, float64,
            float16 or bfloat16, CPU or CUDA. Not modified. float16 and
            bfloat16 run the loop in float32 (the state too, between
            iterations) and round ``y`` to the dtype once, at the end.
        A: ``(C, C)`` matrix, same dtype and device as ``y0``.
        b: linear term, same shape, dtype and device as ``y0``.
        lr: step size used when ``lrs`` is None, ``>= 0``.
        max_iterations: iteration budget, ``>= 0``.
        tol: stop threshold on the largest change; 0 never stops early (nor
            does an empty ``y0``, which has no change to test).
        check_every: test for convergence only every this many iterations.
        lrs: optional 1-D floating tensor (any device) of at least
            ``max_iterations`` step sizes, e.g. a scheduler's sequence.
        shrink, min, max: the projection, as in :func:`sgd_step_`.

    Returns:
        ``(y, iterations)``: the final ``y`` (a new contiguous tensor with
        ``y0``'s shape, dtype and device) and the number of iterations run as a
        0-dim int64 tensor on the same device.

    ``y`` is differentiable in ``A`` and ``b`` by implicit differentiation at
    the projected fixed point: entries the projection holds get no gradient,
    the others solve ``A_SSᵀ x_S = grad_y_S`` per sample and position, and
    ``grad_b = x``, ``grad_A = −Σ x yᵀ``. Memory does not grow with the
    iterations. The gradient is evaluated at the returned ``y`` also when the
    loop stopped before converging (``iterations`` tells). ``y0``, ``lr`` and
    ``lrs`` get none: the fixed point does not depend on them.
    """
    return torch.ops.torchiter.quadratic_descent(
        y0, A, b, lr, max_iterations, tol, check_every, lrs, shrink, min, max
    )


class QuadraticDescentResult(NamedTuple):
    """What :func:`quadratic_descent_ex` returns; every tensor on ``y``'s device.

    Statistics have shape ``()`` for the whole batch, or ``(B,)`` (one per
    sample) with ``per_sample=True``.

    Attributes:
        y: the final state, ``y0``'s shape, dtype and device (contiguous).
        iterations: int64, iterations run (per sample: until its stop).
        converged: bool, the stop test was met (never with ``tol=0``).
        change: ``max |y_k − y_{k−1}|`` of the last iteration run, ``y``'s
            dtype; 0 when no iteration ran.
        growth: ``change`` over the first iteration's change (0 when both are
            0). A projected gradient step within ``2/L`` on a convex quadratic
            never makes the change grow, so ``growth > 1`` means the step size
            is too large; NaN or inf means the loop diverged.
        change_trace: with ``trace=True`` the (batch-wide) change of every
            iteration, shape ``(max_iterations,)``, NaN past the last one;
            else shape ``(0,)``.
    """

    y: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    change: torch.Tensor
    growth: torch.Tensor
    change_trace: torch.Tensor


def quadratic_descent_ex(
    y0: torch.Tensor,
    A: torch.Tensor,
    b: torch.Tensor,
    lr: float,
    max_iterations: int,
    tol: float = 0.0,
    check_every: int = 1,
    lrs: Optional[torch.Tensor] = None,
    shrink: float = 0.0,
    min: Optional[float] = None,
    max: Optional[float] = None,
    per_sample: bool = False,
    trace: bool = False,
) -> QuadraticDescentResult:
    """:func:`quadratic_descent` with the loop's statistics, and per-sample stops.

    Arguments and ``y`` are those of :func:`quadratic_descent` (same results,
    bit for bit, with ``per_sample=False``), plus:

    Args:
        per_sample: each sample (index along dim 0) stops on its own test:
            after iteration ``k ≥ 1`` with ``k % check_every == 0`` it stops
            updating once its own ``max |y_k − y_{k−1}|`` is below ``tol``, and
            the loop ends when every sample has stopped. A sample's result and
            count equal those of running it alone; stopped samples leave the
            working batch, so they cost nothing. Off by default: the stock
            test is one global test over the batch.
        trace: also record every iteration's change (``change_trace``).

    Returns:
        A :class:`QuadraticDescentResult`. No statistic is read on the host
        inside the loop (the stop test aside, once per check, as in
        :func:`quadratic_descent`); read them when needed.
    """
    return QuadraticDescentResult(
        *torch.ops.torchiter.quadratic_descent_ex(
            y0, A, b, lr, max_iterations, tol, check_every, lrs, shrink, min, max, per_sample, trace
        )
    )
