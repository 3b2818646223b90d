"""Pure-PyTorch reference implementations of the torchiter ops.

They follow the op definitions of ``docs/ops.md`` literally, one tensor op at a time, and are
what the tests compare the fused kernels against (in float64) and what the
benchmarks time as the "plain PyTorch" baseline.
"""

import builtins
import math
from typing import List, Optional, Tuple

import torch

__all__ = [
    "project",
    "sgd_step_reference",
    "quadratic_descent_reference",
    "quadratic_descent_backward_reference",
    "original_nsm_loop",
    "original_nsm_loss",
]


def project(
    v: torch.Tensor, shrink: float = 0.0, min: Optional[float] = None, max: Optional[float] = None
) -> torch.Tensor:
    """The projection of both ops: soft threshold, then clamp. Any shape/dtype."""
    if shrink > 0:
        v = torch.sign(v) * torch.clamp(v.abs() - shrink, min=0)
    if min is not None:
        v = torch.clamp(v, min=min)
    if max is not None:
        v = torch.clamp(v, max=max)
    return v


def sgd_step_reference(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    momentum_buffers: List[torch.Tensor],
    lr: float,
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
    """``torchiter.ops.sgd_step_`` written with ordinary tensor ops, in place."""
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g + momentum * buf if nesterov else buf
        p.copy_(project(p - lr * g, shrink, min, max))


def quadratic_descent_reference(
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
) -> Tuple[torch.Tensor, int]:
    """``torchiter.quadratic_descent`` as a plain per-iteration loop.

    Returns ``(y, iterations)`` with ``iterations`` a Python int. An empty
    ``y`` has no change to test, so it runs ``max_iterations`` (as the op does).
    """
    y = y0.clone()
    for k in range(max_iterations):
        step = float(lrs[k]) if lrs is not None else lr
        grad = torch.einsum("ij,bj...->bi...", A, y) - b
        y_new = project(y - step * grad, shrink, min, max)
        done = (
            tol > 0 and k >= 1 and k % check_every == 0 and y.numel() > 0 and bool((y_new - y).abs().max() < tol)
        )
        y = y_new
        if done:
            return y, k + 1
    return y, max_iterations


def quadratic_descent_ex_reference(
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
) -> dict:
    """``torchiter.quadratic_descent_ex`` as a plain per-iteration loop.

    With ``per_sample`` every sample runs the loop of
    :func:`quadratic_descent_reference` alone. Returns a dict of Python
    values: ``y`` (tensor), ``iterations``, ``converged``, ``change``,
    ``growth`` (lists per sample, or scalars), ``trace`` (the batch-wide
    change of every iteration, over the samples still running).
    """
    if per_sample:
        runs = [quadratic_descent_ex_reference(y0[i : i + 1], A, b[i : i + 1], lr, max_iterations, tol,
                                               check_every, lrs, shrink, min, max) for i in range(y0.shape[0])]
        n = builtins.max([r["iterations"] for r in runs], default=0)
        trace = [builtins.max([r["trace"][k] for r in runs if k < r["iterations"]], default=0.0) for k in range(n)]
        return {
            "y": torch.cat([r["y"] for r in runs]) if runs else y0.clone(),
            "iterations": [r["iterations"] for r in runs],
            "converged": [r["converged"] for r in runs],
            "change": [r["change"] for r in runs],
            "growth": [r["growth"] for r in runs],
            "trace": trace,
        }
    y = y0.clone()
    trace: List[float] = []
    converged = False
    for k in range(max_iterations):
        step = float(lrs[k]) if lrs is not None else lr
        grad = torch.einsum("ij,bj...->bi...", A, y) - b
        y_new = project(y - step * grad, shrink, min, max)
        change = float((y_new - y).abs().max()) if y.numel() > 0 else 0.0
        trace.append(change)
        y = y_new
        if tol > 0 and k >= 1 and k % check_every == 0 and y.numel() > 0 and change < tol:
            converged = True
            break
    first = trace[0] if trace else 0.0
    last = trace[-1] if trace else 0.0
    growth = 0.0 if first == 0 and last == 0 else (math.inf if first == 0 else last / first)
    return {"y": y, "iterations": len(trace), "converged": converged, "change": last, "growth": growth,
            "trace": trace}


def quadratic_descent_backward_reference(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    shrink: float = 0.0,
    min: Optional[float] = None,
    max: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torchiter.quadratic_descent_backward``, one small solve per sample and position.

    Active entries of a row are those the projection does not hold (not at a
    clamp bound, not zeroed by the soft threshold); on them ``A_SSᵀ x_S =
    grad_y_S``, elsewhere ``x = 0``. Returns ``(grad_A, grad_b)`` with
    ``grad_A = −Σ x yᵀ`` and ``grad_b = x``.
    """
    C = y.shape[1]
    yr = y.movedim(1, -1).reshape(-1, C)
    gr = grad_y.movedim(1, -1).reshape(-1, C)
    x = torch.zeros_like(yr)
    for n in range(yr.shape[0]):
        active = torch.ones(C, dtype=torch.bool, device=y.device)
        if shrink > 0:
            active &= yr[n] != 0
        if min is not None:
            active &= yr[n] > min
        if max is not None:
            active &= yr[n] < max
        idx = active.nonzero()[:, 0]
        if len(idx):
            x[n, idx] = torch.linalg.solve(A[idx][:, idx].T, gr[n, idx])
    grad_b = x.reshape(y.movedim(1, -1).shape).movedim(-1, 1)
    return -(x.T @ yr), grad_b


def original_nsm_loop(
    M: torch.Tensor, Wx: torch.Tensor, iterations: int, lr: float, tol: float, relu: bool
) -> Tuple[torch.Tensor, int]:
    """Similarity matching's inner loop as the original library runs it.

    One Python step per iteration: the gradient ``M·y − Wx`` along dim 1
    (einsum), a ``torch.optim.SGD`` step, the ReLU by reassigning ``.data``,
    and a ``max |y_k − y_{k−1}| < tol`` test read back to the host after each
    iteration. The baseline the benchmarks and the MNIST example time
    ``quadratic_descent`` against; same result to float rounding.

    Args:
        M: competitor, ``(C, C)``.
        Wx: encoded input, ``(B, C, *spatial)``, ``M``'s dtype and device.
        iterations: iteration budget.
        lr: step size.
        tol: convergence threshold (0: run every iteration).
        relu: project onto ``y >= 0`` after each step.

    Returns:
        ``y`` (detached, ``Wx``'s shape) and the number of iterations run.
    """
    y = torch.zeros_like(Wx, requires_grad=True)
    opt = torch.optim.SGD([y], lr=lr)
    last = None
    for k in range(iterations):
        opt.zero_grad()
        with torch.no_grad():
            y.grad = torch.einsum("ij,bj...->bi...", M, y) - Wx
        opt.step()
        if relu:
            with torch.no_grad():
                y.data = torch.relu(y)
        done = last is not None and tol > 0 and (y.detach() - last).abs().max().item() < tol
        last = y.detach().clone()
        if done:
            return y.detach(), k + 1
    return y.detach(), iterations


def original_nsm_loss(model: torch.nn.Module, *args: Optional[torch.Tensor]) -> torch.Tensor:
    """A similarity-matching model's training loss as its formula reads, one tensor op at a time.

    ``loss(*xs, y)`` of ``torchiter.models.MultiSimilarityMatching`` (and its
    subclasses) written out as the original library computes it: ``M·y`` by
    einsum, autograd through it for ``M``'s gradient, and every encoder's
    output at ``y``'s full shape (a label code ``(B, C)`` expanded over the
    spatial dims) before the sums. The baseline the MNIST notebook benchmarks
    time the model's ``loss`` against; same value and gradients to float
    rounding.

    Args:
        model: a ``MultiSimilarityMatching``.
        *args: the model's inputs (None where absent), then ``y``, the
            forward's output ``(B, C, *spatial)``.

    Returns:
        The loss, a 0-dim tensor in ``y``'s dtype, differentiable in the
        encoders and the competitor.
    """
    *xs, y = args
    M = model.competitor.weight
    C = model.out_channels
    full = []
    for w in model._encode(*xs):
        if w is not None and w.shape != y.shape:
            w = w.reshape(w.shape + (1,) * (y.dim() - w.dim())).expand(y.shape)
        full.append(w)
    Wx = builtins.sum(w for w in full if w is not None)
    loss = (2 * (y * torch.einsum("ij,bj...->bi...", M, y)).sum() - 4 * (y * Wx).sum()) / y.numel() - (M**2).sum() / C
    # The same terms as the model's, "whiten" here over the expanded outputs.
    return model._regularized(loss, full)
