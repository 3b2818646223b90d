"""Pure-PyTorch reference implementations of the torchiter ops.

They follow the op definitions of ``docs/ops.md`` literally, one tensor op at a time, and are
what the tests compare the fused kernels against (in float64) and what the
benchmarks time as the "plain PyTorch" baseline.
"""

from typing import List, Optional, Tuple

import torch

__all__ = ["project", "sgd_step_reference", "quadratic_descent_reference"]


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
    """``torchiter.sgd_step_`` written with ordinary tensor ops, in place."""
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

    Returns ``(y, iterations)`` with ``iterations`` a Python int.
    """
    y = y0.clone()
    for k in range(max_iterations):
        step = float(lrs[k]) if lrs is not None else lr
        grad = torch.einsum("ij,bj...->bi...", A, y) - b
        y_new = project(y - step * grad, shrink, min, max)
        done = tol > 0 and k >= 1 and k % check_every == 0 and bool((y_new - y).abs().max() < tol)
        y = y_new
        if done:
            return y, k + 1
    return y, max_iterations
