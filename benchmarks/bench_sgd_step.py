"""Benchmark of torchiter.sgd_step_ (fused step + projection) on the CPU.

Compares, in one run on the same memory, the fused op against stock
torch.optim.SGD (fused=True and foreach=True) each followed by an in-place
clamp, and against two bandwidth yardsticks: ``p.add_(g, alpha=-lr)`` (the
same 12 bytes per element as the step: read p and g, write p) and a plain
copy (8 bytes per element: read, write).

    python3 benchmarks/bench_sgd_step.py [--numel 16777216] [--min-run-time 1]
"""

import argparse

import torch

import torchiter  # noqa: F401
from _common import machine_header, median_seconds

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


def run_case(name, sizes, min_run_time):
    params = [torch.rand(n) * 0.5 for n in sizes]
    grads = [torch.randn(n) for n in sizes]
    numel = sum(sizes)
    src = torch.rand(numel)
    dst = torch.empty_like(src)
    variants = {
        "torchiter.sgd_step_ (fused step+clamp)": fused(params, grads),
        "torch.optim.SGD(fused=True) + clamp_": stock(params, grads, fused=True),
        "torch.optim.SGD(foreach=True) + clamp_": stock(params, grads, foreach=True),
    }
    rows = {}
    for label, fn in variants.items():
        rows[label], _ = median_seconds("fn()", {"fn": fn}, name, label, "step", min_run_time)
    copy_t, _ = median_seconds("dst.copy_(src)", {"dst": dst, "src": src}, name, "copy", "copy", min_run_time)
    add_t, _ = median_seconds(
        "torch._foreach_add_(ps, gs, alpha=-1e-3)", {"torch": torch, "ps": params, "gs": grads}, name, "add_", "add_", min_run_time
    )
    copy_gbs = 8 * numel / copy_t / 1e9
    add_gbs = 12 * numel / add_t / 1e9
    best_stock = min(t for k, t in rows.items() if not k.startswith("torchiter"))
    print(f"\n## {name}: {len(sizes)} tensor(s), {numel} float32 elements")
    print("| variant | median time | GB/s | fraction of add_ bandwidth | fraction of copy bandwidth | speedup over best stock |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, t in rows.items():
        gbs = 12 * numel / t / 1e9
        print(f"| {label} | {t * 1e6:.1f} us | {gbs:.1f} | {gbs / add_gbs:.2f} | {gbs / copy_gbs:.2f} | {best_stock / t:.2f}x |")
    print(f"| p.add_(g, alpha=-lr) (same 12 B/elem) | {add_t * 1e6:.1f} us | {add_gbs:.1f} | 1.00 | {add_gbs / copy_gbs:.2f} | |")
    print(f"| copy of the same memory (8 B/elem) | {copy_t * 1e6:.1f} us | {copy_gbs:.1f} | {copy_gbs / add_gbs:.2f} | 1.00 | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    args = ap.parse_args()
    print(machine_header())
    run_case("large", [args.numel], args.min_run_time)
    run_case("small tensors", [1024] * 64, args.min_run_time)


if __name__ == "__main__":
    main()
