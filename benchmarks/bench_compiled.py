"""Compiled iterations (``torchiter.compile_iterations``) against the original library's loop.

Workloads (100 iterations per forward, plain SGD):

* ``sm 64`` / ``sm 4096``: the similarity-matching module of ``bench_modules.py``
  (ReLU projection) with a state of 64 and 4096 elements;
* ``pc 4096``: a two-layer predictive-coding energy with two iteration
  parameters (hidden activities ``h1``, ``h2`` of 32 x 64 each) and tanh,
  no projection.

Variants, side by side in one run (rounds interleave them; medians of
``torch.utils.benchmark`` ``blocked_autorange``):

* ``original``: the original library's loop (reproduced in ``bench_modules.py``);
* ``torchiter eager``: ``torchiter.IterationLossModule`` (fused SGD step);
* ``compiled k=1``: ``compile_iterations(m, iterations_per_call=1)``;
* ``compiled``: ``compile_iterations(m)`` (10 iterations per compiled call).

Compilation is excluded from the timings (every compiled variant runs once
before timing) and reported separately: the first call in this process
(inductor's on-disk cache starts empty, a new temporary directory, unless
``TORCHINDUCTOR_CACHE_DIR`` is set), and the first call in a fresh process
that finds the compiled code in that cache (``--cold-start``, run as a
subprocess).

Run: ``python3 benchmarks/bench_compiled.py [--min-run-time 1.0] [--rounds 3] [--threads N]``
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Tuple

if __name__ == "__main__" and "--cold-start" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    # An empty cache, so the first call's time is a real compilation; the
    # --cold-start subprocess inherits it, filled.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compiled_")

import torch
import torch.utils.benchmark as benchmark
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torchiter  # noqa: E402
from bench_modules import ITERATIONS, OriginalIterationLossModule, machine, similarity_matching  # noqa: E402

WORKLOADS = ["sm 64", "sm 4096", "pc 4096"]
VARIANTS = ["original", "torchiter eager", "compiled k=1", "compiled"]


def predictive_coding(base: type) -> type:
    """A two-layer predictive-coding network's inference on either library's base class.

    Input ``x`` (B, 32) clamped at the bottom, target ``t`` (B, 16) at the
    top; the hidden activities ``h1``, ``h2`` (B, 64) minimise the energy
    ``½‖h1 − tanh(x) W1ᵀ‖² + ½‖h2 − tanh(h1) W2ᵀ‖² + ½‖t − tanh(h2) W3ᵀ‖²``
    (summed over the batch).
    """

    class PredictiveCoding(base):  # type: ignore[misc, valid-type]
        def __init__(self, batch: int, hidden: int = 64, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            g = torch.Generator().manual_seed(0)
            self.W1 = nn.Parameter(torch.randn(hidden, 32, generator=g) / 32**0.5)
            self.W2 = nn.Parameter(torch.randn(hidden, hidden, generator=g) / hidden**0.5)
            self.W3 = nn.Parameter(torch.randn(16, hidden, generator=g) / hidden**0.5)
            self.register_buffer("h1", torch.zeros(batch, hidden))
            self.register_buffer("h2", torch.zeros(batch, hidden))

        def iteration_parameters(self) -> List[torch.Tensor]:
            return [self.h1, self.h2]

        def pre_iteration(self, x: torch.Tensor, t: torch.Tensor) -> None:
            super().pre_iteration(x, t)
            with torch.no_grad():
                self.mu1 = torch.tanh(x) @ self.W1.T
                self.h1.copy_(self.mu1)
                self.h2.copy_(torch.tanh(self.h1) @ self.W2.T)

        def iteration_loss(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            e1 = self.h1 - self.mu1
            e2 = self.h2 - torch.tanh(self.h1) @ self.W2.T
            e3 = t - torch.tanh(self.h2) @ self.W3.T
            return 0.5 * ((e1 * e1).sum() + (e2 * e2).sum() + (e3 * e3).sum())

        def post_iteration(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            super().post_iteration(x, t)
            return self.h1, self.h2

    return PredictiveCoding


def build(workload: str, variant: str) -> Callable[[], Any]:
    base = OriginalIterationLossModule if variant == "original" else torchiter.IterationLossModule
    kind, size = workload.split()
    g = torch.Generator().manual_seed(1)
    if kind == "sm":
        batch = int(size) // 16
        x = torch.randn(batch, 32, generator=g)
        m = similarity_matching(base)(
            batch=batch, d=32, max_iterations=ITERATIONS, iteration_lr=0.05, iteration_projection=nn.ReLU()
        )
        inputs: Tuple[torch.Tensor, ...] = (x,)
    else:
        batch = int(size) // 128
        inputs = (torch.randn(batch, 32, generator=g), torch.randn(batch, 16, generator=g))
        m = predictive_coding(base)(batch=batch, max_iterations=ITERATIONS, iteration_lr=0.1)
    if variant == "compiled k=1":
        torchiter.compile_iterations(m, iterations_per_call=1)
    elif variant == "compiled":
        torchiter.compile_iterations(m)

    def run() -> Any:
        out = m(*inputs)
        return out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])

    return run


def cold_start() -> None:
    """Prints the first call's time of each compiled variant (a fresh process, warm disk caches)."""
    for workload in WORKLOADS:
        for variant in VARIANTS[2:]:
            run = build(workload, variant)
            t0 = time.perf_counter()
            run()
            print(f"COLD {workload}|{variant}|{time.perf_counter() - t0:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cold-start", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cold_start:
        cold_start()
        return

    print("machine:", machine())
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print("inductor cache:", os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"))
    with open("/proc/loadavg") as f:
        print("load average at start:", f.read().strip())

    # Build every variant once: compiled ones compile here, timed separately,
    # and every variant's result is checked against the original's first.
    runs: Dict[Tuple[str, str], Callable[[], Any]] = {}
    first_call: Dict[Tuple[str, str], float] = {}
    for workload in WORKLOADS:
        ref = None
        for variant in VARIANTS:
            run = build(workload, variant)
            t0 = time.perf_counter()
            out = run().detach().clone()
            first_call[workload, variant] = time.perf_counter() - t0
            if ref is None:
                ref = out
            else:
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=f"{variant} on {workload}")
            runs[workload, variant] = run

    per_round: Dict[Tuple[str, str], List[float]] = defaultdict(list)
    last = []
    for r in range(args.rounds):
        last = []
        for workload in WORKLOADS:
            for variant in VARIANTS:
                m = benchmark.Timer(
                    stmt="run()",
                    globals={"run": runs[workload, variant]},
                    label=f"per forward ({ITERATIONS} iterations), round {r + 1}",
                    sub_label=workload,
                    description=variant,
                    num_threads=torch.get_num_threads(),
                ).blocked_autorange(min_run_time=args.min_run_time)
                last.append(m)
                per_round[workload, variant].append(m.median)
    benchmark.Compare(last).print()

    # The same compiled code, loaded from torch's caches by a new process.
    cold: Dict[Tuple[str, str], float] = {}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--cold-start"]
        + ([] if args.threads is None else ["--threads", str(args.threads)]),
        capture_output=True,
        text=True,
        check=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("COLD "):
            w, v, s = line[5:].split("|")
            cold[w, v] = float(s)

    with open("/proc/loadavg") as f:
        print("load average at end:", f.read().strip())
    print(f"median over {args.rounds} rounds; first call = one forward including compilation")
    print(
        f"{'workload':>8} | {'variant':<16} | {'µs / iteration':>14} | {'speed-up vs original':>20}"
        f" | {'first call, s':>13} | {'first call, new process, s':>26}"
    )
    print("-" * 115)
    for workload in WORKLOADS:
        base = statistics.median(per_round[workload, "original"])
        for variant in VARIANTS:
            t = statistics.median(per_round[workload, variant])
            fc = first_call[workload, variant]
            cs = cold.get((workload, variant))
            print(
                f"{workload:>8} | {variant:<16} | {t / ITERATIONS * 1e6:>14.2f} | {base / t:>19.2f}x"
                f" | {fc:>13.2f} | {'' if cs is None else f'{cs:.2f}':>26}"
            )


if __name__ == "__main__":
    main()
