"""Scriptable modules built on the torchiter ops, for TorchScript, export and C++.

The modules here call the ops (``torch.ops.torchiter.quadratic_descent``, and
``sgd_step_`` through :func:`torchiter.ops.sgd_step_`, which keeps an in-place
step on a list built in the graph alive in TorchScript) and keep every option
as a typed attribute, so the same object runs eagerly, under
``torch.jit.script`` (and, saved with ``torch.jit.save``, from a LibTorch C++
program that links the op library), under ``torch.compile(fullgraph=True)`` and
through ``torch.export``.

They implement non-negative similarity matching (NSM; Pehlevan & Chklovskii):
the output ``y`` of an input ``x`` minimises ``½ yᵀMy − yᵀWx`` subject to
``y ≥ 0``, found by projected gradient descent in one
``quadratic_descent`` call, and the synapses learn with local Hebbian rules,
``W ← W + η (y xᵀ − W)`` and ``M ← M + η (y yᵀ − M)``, which are one
``sgd_step_`` on ``[W, M]`` with the gradients ``W − yᵀx / B`` and
``M − yᵀy / B``.
"""

from typing import Optional

import torch
from torch import nn

from . import ops

__all__ = ["ScriptableNSM", "ScriptableOnlineNSM"]


class ScriptableNSM(nn.Module):
    """Similarity-matching neural dynamics: ``y = argmin ½ yᵀMy − yᵀWx`` over ``y ≥ 0``.

    ``W`` and ``M`` are buffers (they learn by local Hebbian rules, not by
    backpropagation; see :class:`ScriptableOnlineNSM`), so they are saved with
    the module and move with ``.to()``.

    Args:
        in_features: input size ``N``.
        out_features: number of output neurons ``C``.
        lr: step size of the neural dynamics, ``>= 0``; the loop converges for
            ``lr < 2 / λ_max(M)``.
        iterations: iteration budget of the dynamics.
        tol: stop early once ``max |y_k − y_{k−1}| < tol`` (0: never).
        check_every: test for convergence every this many iterations.
        nonnegative: project onto ``y ≥ 0`` (NSM); False gives linear
            similarity matching (PCA subspace).
        dtype: float32 or float64.
        device: CPU, or CUDA where torchiter was built with it.

    Attributes:
        W: feedforward weights, ``(C, N)``, initialised to ``randn / sqrt(N)``
            from the global RNG.
        M: lateral weights, ``(C, C)``, initialised to the identity.

    Shape:
        - Input ``x``: ``(B, N)``, same dtype and device as the buffers.
        - Output ``y``: ``(B, C)``, a new tensor.
    """

    lr: float
    iterations: int
    tol: float
    check_every: int
    min: Optional[float]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        lr: float = 0.1,
        iterations: int = 100,
        tol: float = 0.0,
        check_every: int = 1,
        nonnegative: bool = True,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.register_buffer("W", torch.randn(out_features, in_features, **factory) / in_features**0.5)
        self.register_buffer("M", torch.eye(out_features, **factory))
        self.lr = lr
        self.iterations = iterations
        self.tol = tol
        self.check_every = check_every
        self.min = 0.0 if nonnegative else None

    def dynamics(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the neural dynamics to their fixed point.

        Args:
            x: input, ``(B, N)``, the buffers' dtype and device.

        Returns:
            ``y``, ``(B, C)``, same dtype and device.
        """
        Wx = x @ self.W.T
        y, _ = torch.ops.torchiter.quadratic_descent(
            torch.zeros_like(Wx),
            self.M,
            Wx,
            self.lr,
            self.iterations,
            self.tol,
            self.check_every,
            None,
            0.0,
            self.min,
            None,
        )
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the NSM output of ``x``: ``(B, N) -> (B, C)``."""
        return self.dynamics(x)


class ScriptableOnlineNSM(ScriptableNSM):
    """:class:`ScriptableNSM` whose forward also takes one Hebbian learning step.

    After computing ``y`` it updates the buffers in place with one
    ``torchiter.ops.sgd_step_`` call on ``[W, M]``::

        W ← W − η (W − yᵀx / B)        M ← M − η (M − yᵀy / B)

    Args:
        in_features, out_features, lr, iterations, tol, check_every,
            nonnegative, dtype, device: as in :class:`ScriptableNSM`.
        eta: Hebbian learning rate, ``>= 0``.

    Shape:
        - Input ``x``: ``(B, N)``, same dtype and device as the buffers.
        - Output ``y``: ``(B, C)``; ``W`` and ``M`` are updated in place.
    """

    eta: float

    def __init__(
        self,
        in_features: int,
        out_features: int,
        lr: float = 0.1,
        iterations: int = 100,
        tol: float = 0.0,
        check_every: int = 1,
        nonnegative: bool = True,
        eta: float = 0.01,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(
            in_features, out_features, lr, iterations, tol, check_every, nonnegative, dtype, device
        )
        self.eta = eta

    def hebbian_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Updates ``W`` and ``M`` in place from a batch and its outputs.

        Args:
            x: inputs, ``(B, N)``, the buffers' dtype and device.
            y: outputs of :meth:`dynamics`, ``(B, C)``.
        """
        inv_batch = 1.0 / x.shape[0]
        grad_W = self.W - (y.T @ x) * inv_batch
        grad_M = self.M - (y.T @ y) * inv_batch
        # The wrapper (not the raw op) keeps the in-place step alive in TorchScript.
        ops.sgd_step_([self.W, self.M], [grad_W, grad_M], [], self.eta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the NSM output of ``x`` and learns from it: ``(B, N) -> (B, C)``."""
        y = self.dynamics(x)
        self.hebbian_step(x, y)
        return y
