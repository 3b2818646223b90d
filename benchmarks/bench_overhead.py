"""The Python around torchiter's loops: a model forward against its op called by hand, and the fused-step loop per iteration.

1. Model forward (pca and clustering workloads of docs/models.md, default
   settings): ``model(x)`` against what it runs, written by hand: the encoder
   and one ``torch.ops.torchiter.quadratic_descent_ex`` call with the very
   arguments the model passed (recorded from a forward), so both do the same
   arithmetic and the difference is the Python around the op. Target: at most
   30 us per forward.
2. Fused-step loop: an ``IterationLossModule`` with a 64-element state and a
   least-squares loss, ``K`` iterations per forward, against the user's own
   loss forward and backward run ``K`` times by hand (no step). The difference
   per iteration is what the loop adds (the fused SGD step included). Target:
   at most 10 us per iteration.

Candidates alternate (call by call for the model forward, round by round
for the loop); figures are medians. 1 thread unless
``--threads``. Prints the machine and the command.

    python benchmarks/bench_overhead.py [--rounds 7] [--threads 1]
"""

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_header, median, paired_medians, per_call  # noqa: E402

import torchiter  # noqa: E402
from torchiter.models import SimilarityMatching  # noqa: E402




def workloads():
    torch.manual_seed(0)
    pca = SimilarityMatching(nn.Linear(10, 3, bias=False), 3, tau=0.5, max_iterations=100, iteration_lr=0.1, tol=1e-5)
    torch.manual_seed(1)
    clustering = SimilarityMatching(
        nn.Linear(2, 10), 10, tau=0.5, max_iterations=200, iteration_lr=0.05, tol=1e-4, iteration_projection=nn.ReLU()
    )
    return [("pca 1000 x 10 -> 3", pca, torch.randn(1000, 10)), ("clustering 100 x 2 -> 10", clustering, torch.randn(100, 2))]


def recorded_op_args(model, x):
    """The arguments of the quadratic_descent_ex call one forward makes."""
    real = torch.ops.torchiter.quadratic_descent_ex
    seen = []

    class Spy:
        def __call__(self, *a, **k):
            seen.append((tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in a), k))
            return real(*a, **k)

    torch.ops.torchiter.quadratic_descent_ex = Spy()
    try:
        model(x)
    finally:
        torch.ops.torchiter.quadratic_descent_ex = real
    if len(seen) != 1:
        raise RuntimeError(f"expected one quadratic_descent_ex call per forward, saw {len(seen)}")
    return seen[0]


def model_overhead(rounds: int, min_time: float):
    print("\n## Model forward: the Python around the op (target <= 30 us)")
    print("Each round times the two candidates call by call in alternation (medians); the table gives "
          "the median over rounds.")
    print("| workload | path | model(x) | encoder + op by hand | Python around the op |")
    print("| --- | --- | --- | --- | --- |")
    worst = 0.0
    for name, model, x in workloads():
        args, kwargs = recorded_op_args(model, x)
        op = torch.ops.torchiter.quadratic_descent_ex
        enc = model.encoder

        def by_hand():
            enc(x)
            op(*args, **kwargs)

        def forward():
            model(x)

        # Enough calls for min_time seconds per round.
        calls = max(50, int(min_time / max(per_call(forward, 0.05), 1e-6)))
        t_model, t_hand, diff = [], [], []
        for _ in range(rounds):
            a, b = paired_medians(forward, by_hand, calls)
            t_model.append(a)
            t_hand.append(b)
            diff.append(a - b)
        d = median(diff) * 1e6
        worst = max(worst, d)
        print(f"| {name} | {model.iteration_stats.path} | {median(t_model) * 1e6:.1f} us | "
              f"{median(t_hand) * 1e6:.1f} us | {d:.1f} us |")
    return worst


class LeastSquares(torchiter.IterationLossModule):
    """min_y |A y - b|^2 over a 64-element y."""

    def __init__(self, A, **kw):
        super().__init__(**kw)
        self.A = A
        self.register_buffer("y", torch.zeros(A.shape[1]))

    def iteration_parameters(self):
        return [self.y]

    def iteration_loss(self, b):
        return ((self.A @ self.y - b) ** 2).sum()

    def post_iteration(self, b):
        super().post_iteration(b)
        return self.y


def step_overhead(rounds: int, min_time: float, iterations: int = 50):
    print(f"\n## Fused-step loop: added per iteration to the loss forward and backward (64-element state, "
          f"{iterations} iterations; target <= 10 us)")
    torch.manual_seed(0)
    A, b = torch.randn(80, 64) / 10, torch.randn(80)
    module = LeastSquares(A, max_iterations=iterations, iteration_lr=0.01)
    y = torch.zeros(64, requires_grad=True)

    def by_hand():
        for _ in range(iterations):
            y.grad = None
            ((A @ y - b) ** 2).sum().backward()

    def forward():
        module(b)

    t_mod, t_hand, diff = [], [], []
    for _ in range(rounds):
        a = per_call(forward, min_time) / iterations
        h = per_call(by_hand, min_time) / iterations
        t_mod.append(a)
        t_hand.append(h)
        diff.append(a - h)
    d = median(diff) * 1e6
    print("| path | module, per iteration | loss forward + backward by hand | added per iteration |")
    print("| --- | --- | --- | --- |")
    print(f"| {module.iteration_stats.path} | {median(t_mod) * 1e6:.1f} us | {median(t_hand) * 1e6:.1f} us | {d:.1f} us |")
    return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timing (default 0.2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_header())
    worst_model = model_overhead(args.rounds, args.min_time)
    per_iteration = step_overhead(args.rounds, args.min_time)
    print(f"\nworst model overhead {worst_model:.1f} us (target 30); fused-step loop {per_iteration:.1f} us per iteration (target 10)")


if __name__ == "__main__":
    main()
