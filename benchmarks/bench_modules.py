"""Per-iteration time of torchiter's iteration modules against the original library's loop.

Three versions of one module (a similarity-matching style autograd loss, plain
SGD, ReLU projection, 100 iterations per forward) are timed side by side:

* ``original``: the iteration-module code of the library torchiter started
  from, reproduced below (``zero_grad()``, loss, ``backward()``,
  ``loss.item()``, ``optimizer.step()``, projection by reassigning ``.data``);
* ``torchiter generic``: ``torchiter.IterationLossModule`` with the projection
  given as a user lambda, which the kernel cannot express: the SGD step is
  fused and the lambda then runs as an in-place projection;
* ``torchiter fused``: the same with ``nn.ReLU()``, so SGD and the projection
  run as one ``torchiter.sgd_step_`` call;
* ``autograd floor``: only clearing gradients, the loss and ``backward()``,
  which every variant does; no library can go below it.

Run: ``python3 benchmarks/bench_modules.py [--sizes 64 4096] [--min-run-time 1.0] [--rounds 3] [--threads N]``
"""

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.utils.benchmark as benchmark
from torch import nn

import torchiter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_model  # noqa: E402

ITERATIONS = 100
CHANNELS = 16  # k: outputs per sample; the state has size batch * k


# --------------------------------------------------------------------------- the original library


class OriginalIterationModule(nn.Module):
    """The reference IterationModule, as published (abridged docstrings)."""

    def __init__(self, max_iterations: int = 1000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_iterations = max_iterations
        self.hooks: Dict[str, List[Callable]] = defaultdict(list)
        self.iteration_idx = -1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.iteration_idx = -1
        self._call_hooks(self.hooks["pre"])
        self.pre_iteration(*args, **kwargs)
        for i in range(self.max_iterations):
            self.iteration_idx = i
            self.iteration(*args, **kwargs)
            if self._call_hooks(self.hooks["iteration"], check_output=True):
                break
            if self.converged(*args, **kwargs):
                break
        retval = self.post_iteration(*args, **kwargs)
        self._call_hooks(self.hooks["post"])
        return retval

    def _call_hooks(self, hooks: List[Callable], check_output: bool = False) -> bool:
        for hook in hooks:
            if hook(self) and check_output:
                return True
        return False

    def converged(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def pre_iteration(self, *args: Any, **kwargs: Any) -> None:
        pass

    def post_iteration(self, *args: Any, **kwargs: Any) -> Any:
        pass


class OriginalIterationLossModule(OriginalIterationModule):
    """The reference IterationLossModule, as published (abridged docstrings)."""

    def __init__(
        self,
        iteration_optimizer: Callable = torch.optim.SGD,
        iteration_scheduler: Optional[Callable] = None,
        iteration_lr: float = 1.0,
        it_optim_kwargs: Optional[Dict[str, Any]] = None,
        it_sched_kwargs: Optional[Dict[str, Any]] = None,
        iteration_projection: Optional[Callable] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.it_construct_optim = iteration_optimizer
        self.it_construct_sched = iteration_scheduler
        self.it_optim_kwargs = it_optim_kwargs if it_optim_kwargs is not None else {}
        self.it_optim_kwargs.setdefault("lr", iteration_lr)
        self.it_sched_kwargs = it_sched_kwargs if it_sched_kwargs is not None else {}
        self.iteration_optimizer: Any = None
        self.iteration_scheduler: Any = None
        self.iteration_projection = iteration_projection
        self.last_iteration_loss = None

    def pre_iteration(self, *args: Any, **kwargs: Any) -> None:
        super().pre_iteration(*args, **kwargs)
        for param in self.iteration_parameters():
            param.requires_grad_(True)
        grad_state = []
        for param in self.parameters():
            grad_state.append(param.requires_grad)
            param.requires_grad_(False)
        self._pre_requires_grad_state = grad_state
        self.iteration_optimizer = self.it_construct_optim(
            self.iteration_parameters(), **self.it_optim_kwargs
        )
        if self.it_construct_sched is not None:
            self.iteration_scheduler = self.it_construct_sched(
                self.iteration_optimizer, **self.it_sched_kwargs
            )

    def iteration(self, *args: Any, **kwargs: Any) -> None:
        self.iteration_set_gradients(*args, **kwargs)
        self.iteration_optimizer.step()
        if self.iteration_scheduler is not None:
            self.iteration_scheduler.step()
        if self.iteration_projection is not None:
            with torch.no_grad():
                for param in self.iteration_parameters():
                    param.data = self.iteration_projection(param)

    def iteration_set_gradients(self, *args: Any, **kwargs: Any) -> None:
        self.iteration_optimizer.zero_grad()
        loss = self.iteration_loss(*args, **kwargs)
        loss.backward()
        self.last_iteration_loss = loss.item()

    def post_iteration(self, *args: Any, **kwargs: Any) -> Any:
        for param in self.iteration_parameters():
            param.requires_grad_(False)
        for param, old_state in zip(self.parameters(), self._pre_requires_grad_state):
            param.requires_grad_(old_state)
        return super().post_iteration(*args, **kwargs)


# --------------------------------------------------------------------------- the benchmarked module


def similarity_matching(base: type) -> type:
    """The same user module on top of either library's IterationLossModule.

    Non-negative similarity matching: for inputs x (batch, d) the outputs
    y (batch, k) minimise  −2 tr(Yᵀ X Wᵀ) + tr(Yᵀ Y M)  per sample, with y ≥ 0.
    """

    class SimilarityMatching(base):  # type: ignore[misc, valid-type]
        def __init__(self, batch: int, d: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            g = torch.Generator().manual_seed(0)
            self.W = nn.Parameter(torch.randn(CHANNELS, d, generator=g) / d**0.5)
            m = torch.randn(CHANNELS, CHANNELS, generator=g) / CHANNELS
            self.M = nn.Parameter(m @ m.T + torch.eye(CHANNELS))
            self.register_buffer("y", torch.zeros(batch, CHANNELS))

        def iteration_parameters(self) -> List[torch.Tensor]:
            return [self.y]

        def pre_iteration(self, x: torch.Tensor) -> None:
            super().pre_iteration(x)
            with torch.no_grad():
                self.y.zero_()
                self.Wx = x @ self.W.T

        def iteration_loss(self, x: torch.Tensor) -> torch.Tensor:
            y = self.y
            return (-2 * (y * self.Wx).sum() + (y * (y @ self.M)).sum()) / y.shape[0]

        def post_iteration(self, x: torch.Tensor) -> torch.Tensor:
            super().post_iteration(x)
            return self.y

    return SimilarityMatching


def build(kind: str, size: int) -> Callable[[], Any]:
    batch = size // CHANNELS
    x = torch.randn(batch, 32, generator=torch.Generator().manual_seed(1))
    kwargs = dict(batch=batch, d=32, max_iterations=ITERATIONS, iteration_lr=0.05)
    if kind == "original":
        m = similarity_matching(OriginalIterationLossModule)(iteration_projection=nn.ReLU(), **kwargs)
    elif kind == "torchiter generic":
        m = similarity_matching(torchiter.IterationLossModule)(
            iteration_projection=lambda y: torch.relu(y), **kwargs
        )
    elif kind == "torchiter fused":
        m = similarity_matching(torchiter.IterationLossModule)(iteration_projection=nn.ReLU(), **kwargs)
    elif kind == "autograd floor":
        # Only what every variant must do: clear grads, the loss, backward().
        m = similarity_matching(torchiter.IterationLossModule)(**kwargs)
        m.iteration = m.iteration_set_gradients
    else:
        raise ValueError(kind)
    return lambda: m(x)


KINDS = ["original", "torchiter generic", "torchiter fused", "autograd floor"]


def cpu_time(run: Callable[[], Any], number: int) -> float:
    """Process CPU seconds per call over ``number`` calls.

    Wall time on a shared machine includes waiting for a core; CPU time
    counts only the work done (all threads), so it shows the saving even
    when other jobs load the machine.
    """
    t0 = time.process_time()
    for _ in range(number):
        run()
    return (time.process_time() - t0) / number


def machine() -> str:
    return (
        f"{platform.platform()}; {cpu_model()}; torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads; python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print("machine:", machine())
    print("command:", " ".join([sys.executable.split("/")[-1]] + sys.argv))
    # Same numbers on every path first: the comparison is of equal work.
    for size in args.sizes:
        outs = [build(kind, size)().detach().clone() for kind in KINDS]
        for kind, out in zip(KINDS[1:3], outs[1:3]):
            torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5, msg=f"{kind} at {size}")

    # Rounds interleave the variants so that load from other processes hits
    # them alike; the figure reported is the median over rounds of each
    # round's blocked_autorange median.
    per_round: Dict[Any, List[float]] = defaultdict(list)
    per_round_cpu: Dict[Any, List[float]] = defaultdict(list)
    last = []
    for r in range(args.rounds):
        last = []
        for size in args.sizes:
            for kind in KINDS:
                run = build(kind, size)
                m = benchmark.Timer(
                    stmt="run()",
                    globals={"run": run},
                    label=f"per forward ({ITERATIONS} iterations), round {r + 1}",
                    sub_label=f"state {size}",
                    description=kind,
                    num_threads=torch.get_num_threads(),
                ).blocked_autorange(min_run_time=args.min_run_time)
                last.append(m)
                per_round[size, kind].append(m.median)
                per_round_cpu[size, kind].append(cpu_time(run, m.number_per_run))
    benchmark.Compare(last).print()

    print(f"median over {args.rounds} rounds")
    print(
        f"{'state':>6} | {'variant':<18} | {'µs / iteration':>14} | {'speed-up vs original':>20}"
        f" | {'CPU µs / iteration':>18} | {'CPU speed-up':>12}"
    )
    print("-" * 106)
    for size in args.sizes:
        base = statistics.median(per_round[size, "original"])
        base_cpu = statistics.median(per_round_cpu[size, "original"])
        for kind in KINDS:
            t = statistics.median(per_round[size, kind])
            c = statistics.median(per_round_cpu[size, kind])
            print(
                f"{size:>6} | {kind:<18} | {t / ITERATIONS * 1e6:>14.1f} | {base / t:>19.2f}x"
                f" | {c / ITERATIONS * 1e6:>18.1f} | {base_cpu / c:>11.2f}x"
            )


if __name__ == "__main__":
    main()
