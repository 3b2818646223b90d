"""Benchmark of torchiter.sgd_step_ (fused step + projection) on the CPU.

Compares, in one run on the same memory, the fused op against stock
torch.optim.SGD (fused=True and foreach=True) each followed by an in-place
clamp, and against two bandwidth yardsticks: ``p.add_(g, alpha=-lr)`` (the
same 12 bytes per element as the step: read p and g, write p) and a plain
copy (8 bytes per element: read, write).

    python3 benchmarks/bench_sgd_step.py [--numel 16777216] [--min-run-time 1] [--rounds 5]
"""

import argparse

import torch

import torchiter  # noqa: F401
from _common import machine_header, median, median_seconds

LO, HI = -1.0, 1.0


def stock(params, grads, **sgd_kw):
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.SGD(params, lr=1e-3, **sgd_kw)

    def step():
        opt.step()
        for p in params:
            p.clamp_(LO, HI)

    return step


def fused(params, grads):
    def step():
        torch.ops.torchiter.sgd_step_(params, grads, [], 1e-3, min=LO, max=HI)

    return step


def run_case(name, sizes, min_run_time, rounds):
    params = [torch.rand(n) * 0.5 for n in sizes]
    grads = [torch.randn(n) for n in sizes]
    numel = sum(sizes)
    src = torch.rand(numel)
    dst = torch.empty_like(src)
    steps = {
        "torchiter.sgd_step_ (fused step+clamp)": fused(params, grads),
        "torch.optim.SGD(fused=True) + clamp_": stock(params, grads, fused=True),
        "torch.optim.SGD(foreach=True) + clamp_": stock(params, grads, foreach=True),
    }
    timed = {label: ("fn()", {"fn": fn}) for label, fn in steps.items()}
    timed["add_"] = ("torch._foreach_add_(ps, gs, alpha=-1e-3)", {"torch": torch, "ps": params, "gs": grads})
    timed["copy"] = ("dst.copy_(src)", {"dst": dst, "src": src})
    # Interleaved rounds: on a machine whose memory bandwidth drifts (other
    # processes, neighbouring VMs), variants timed minutes apart are not
    # comparable. Every round times every variant; ratios are taken within
    # a round, and the table gives their medians over the rounds.
    times = {label: [] for label in timed}
    for _ in range(rounds):
        for label, (stmt, env) in timed.items():
            times[label].append(median_seconds(stmt, env, name, label, "step", min_run_time / rounds)[0])
    add, copy = times["add_"], times["copy"]
    stock_best = [min(times[k][r] for k in steps if not k.startswith("torchiter")) for r in range(rounds)]
    print(f"\n## {name}: {len(sizes)} tensor(s), {numel} float32 elements ({rounds} interleaved rounds)")
    print("| variant | median time | GB/s | fraction of add_ bandwidth | fraction of copy bandwidth | speedup over best stock |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label in steps:
        t = times[label]
        tm = median(t)
        # Same 12 bytes per element as add_: the bandwidth ratio is a time ratio.
        frac_add = median([add[r] / t[r] for r in range(rounds)])
        frac_copy = median([1.5 * copy[r] / t[r] for r in range(rounds)])
        speedup = median([stock_best[r] / t[r] for r in range(rounds)])
        print(f"| {label} | {tm * 1e6:.1f} us | {12 * numel / tm / 1e9:.1f} | {frac_add:.2f} | {frac_copy:.2f} | {speedup:.2f}x |")
    ta, tc = median(add), median(copy)
    add_copy = median([1.5 * copy[r] / add[r] for r in range(rounds)])
    print(f"| p.add_(g, alpha=-lr) (same 12 B/elem) | {ta * 1e6:.1f} us | {12 * numel / ta / 1e9:.1f} | 1.00 | {add_copy:.2f} | |")
    print(f"| copy of the same memory (8 B/elem) | {tc * 1e6:.1f} us | {8 * numel / tc / 1e9:.1f} | {1 / add_copy:.2f} | 1.00 | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per variant, over all rounds")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(machine_header())
    run_case("large", [args.numel], args.min_run_time, args.rounds)
    run_case("small tensors", [1024] * 64, args.min_run_time, args.rounds)


if __name__ == "__main__":
    main()
