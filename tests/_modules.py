"""Small iteration modules shared by the module tests."""

import torch
from torch import nn

import torchiter


class NNLS(torchiter.IterationLossModule):
    """Non-negative least squares ``min ‖Ay − b‖², y ≥ 0`` (the README's example)."""

    def __init__(self, A: torch.Tensor, **kwargs) -> None:
        kwargs.setdefault("max_iterations", 60)
        kwargs.setdefault("iteration_lr", 0.05)
        kwargs.setdefault("iteration_projection", nn.ReLU())
        super().__init__(**kwargs)
        self.A = nn.Parameter(A)
        self.register_buffer("y", torch.zeros(A.shape[1], dtype=A.dtype))

    def pre_iteration(self, b):
        self.y = torch.zeros(self.A.shape[1], dtype=self.A.dtype, device=self.A.device)
        super().pre_iteration(b)

    def iteration_parameters(self):
        return [self.y]

    def iteration_loss(self, b):
        return ((self.A @ self.y - b) ** 2).sum()

    def post_iteration(self, b):
        super().post_iteration(b)
        return self.y.detach().clone()


class DuckSGD:
    """An optimizer of one's own: ``step()`` and ``zero_grad()``, nothing else."""

    def __init__(self, params, lr=0.05):
        self.params = list(params)
        self.lr = lr

    def step(self):
        with torch.no_grad():
            for p in self.params:
                p.sub_(self.lr * p.grad)

    def zero_grad(self):
        for p in self.params:
            p.grad = None
