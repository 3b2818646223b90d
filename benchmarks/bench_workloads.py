"""The similarity-matching workloads of docs/models.md, side by side.

For each workload (pca, clustering, conv, and conv as constructed, whose
competitor is still the identity) one run times, on the same inputs and
weights: torchiter's ``SimilarityMatching`` forward (its inner loop is one
``quadratic_descent`` call), and the per-iteration loop as the original library
runs it (einsum gradient, ``torch.optim.SGD`` step, projection by reassigning
``.data``, a ``max|Δy| < tol`` test read back every iteration). It checks that
both give the same output and iteration count, prints a table of medians and
speedups, and saves a bar chart of the speedups.

    python3 benchmarks/bench_workloads.py [--device cpu|cuda] [--plot PATH] [--min-run-time 2] [--rounds 5]
"""

import argparse
import os

import torch
from torch import nn

import torchiter  # noqa: F401
from _common import machine_header, median, median_seconds
from torchiter.models import SimilarityMatching
from torchiter.reference import original_nsm_loop

# name: (input shape, encoder factory, channels, iterations, lr, tol, projection, trained competitor)
WORKLOADS = {
    "pca": ((1000, 10), lambda: nn.Linear(10, 3, bias=False), 3, 100, 0.1, 1e-5, None, True),
    "clustering": ((100, 2), lambda: nn.Linear(2, 10), 10, 200, 0.05, 1e-4, "relu", True),
    "conv": ((100, 1, 28, 28), lambda: nn.Conv2d(1, 50, 6, bias=False), 50, 40, 1.0, 0.0, "relu", True),
    # The same layer as constructed (M = I), as in every model's first
    # forward: the op recognises a diagonal A and mixes no channels.
    "conv, M = I": ((100, 1, 28, 28), lambda: nn.Conv2d(1, 50, 6, bias=False), 50, 40, 1.0, 0.0, "relu", False),
}


class OriginalLoop:
    """The inner loop as the original library runs it, one Python step at a time."""

    def __init__(self, encoder, competitor, iterations, lr, tol, relu):
        self.encoder, self.M = encoder, competitor
        self.iterations, self.lr, self.tol, self.relu = iterations, lr, tol, relu
        self.iteration_idx = -1

    def __call__(self, x):
        with torch.no_grad():
            Wx = self.encoder(x)
        y, n = original_nsm_loop(self.M, Wx, self.iterations, self.lr, self.tol, self.relu)
        self.iteration_idx = n - 1
        return y


def build(name, device):
    shape, make_encoder, C, iters, lr, tol, proj, trained = WORKLOADS[name]
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    model = SimilarityMatching(
        make_encoder(), C, tau=0.5, max_iterations=iters, tol=tol, iteration_lr=lr,
        iteration_projection=nn.ReLU() if proj == "relu" else None,
    ).to(device)
    if trained:
        with torch.no_grad():
            # A trained competitor is not the identity: perturb it symmetrically.
            P = 0.05 * torch.randn(C, C, device=device)
            model.competitor.weight.add_(P + P.T)
    original = OriginalLoop(model.encoder, model.competitor.weight.detach(), iters, lr, tol, proj == "relu")
    return x, model, original


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds per loop, over all rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "results", "workloads_cpu.png"))
    args = ap.parse_args()
    print(machine_header(args.device))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"# {args.rounds} interleaved rounds; speedup: median of the rounds' ratios (their range)")
    print("| workload | iterations run | original loop | torchiter forward | speedup | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    speedups = {}
    for name in WORKLOADS:
        x, model, original = build(name, args.device)
        y_t = model(x)
        n_t = model.iteration_idx + 1
        y_o = original(x)
        n_o = original.iteration_idx + 1
        diff = (y_t - y_o).abs().max().item()
        assert n_t == n_o, f"{name}: iteration counts differ ({n_t} vs {n_o})"
        assert diff < 1e-4, f"{name}: outputs differ by {diff}"
        # Interleaved rounds, ratios within a round: the two loops are timed
        # seconds apart, not minutes, on a machine whose speed may drift.
        t_o, t_t, ratios = [], [], []
        for _ in range(args.rounds):
            t_o.append(median_seconds("f(x); sync()", dict(f=original, x=x, sync=sync), name, "original", "loop", args.min_run_time / args.rounds)[0])
            t_t.append(median_seconds("f(x); sync()", dict(f=model, x=x, sync=sync), name, "torchiter", "loop", args.min_run_time / args.rounds)[0])
            ratios.append(t_o[-1] / t_t[-1])
        speedups[name] = median(ratios)
        print(f"| {name} | {n_t} | {median(t_o) * 1e3:.2f} ms | {median(t_t) * 1e3:.3f} ms | {speedups[name]:.1f}x "
              f"({min(ratios):.1f}-{max(ratios):.1f}x) | {diff:.1e} |")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("# matplotlib not installed: no plot")
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bars = ax.bar(list(speedups), list(speedups.values()), color="#4c72b0")
        ax.bar_label(bars, fmt="%.1fx")
        ax.set_ylim(0, max(speedups.values()) * 1.15)
        ax.set_ylabel("speedup over the original loop")
        ax.set_title(f"torchiter forward, {args.device}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        # Relative to the working folder: results stay free of local paths.
        print(f"# plot: {os.path.relpath(args.plot)}")


if __name__ == "__main__":
    main()
