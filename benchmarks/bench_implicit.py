"""Backward of quadratic_descent: memory and time against the iteration count.

For one workload (4096 samples x 32 channels, float64, soft threshold) each
case runs in a fresh interpreter and reports the growth of the process's peak
resident memory (ru_maxrss) over a forward + backward, plus what autograd
saved for the backward (bytes packed by saved_tensors_hooks). Cases: the op's
implicit backward at 50 and 5000 iterations, and autograd through the plain
per-iteration loop (torchiter.reference) at 50 and 200 iterations. Then the
median time of the op's forward + backward at 50 and 5000 iterations
(torch.utils.benchmark, side by side).

    python3 bench_implicit.py
"""

import json
import resource
import subprocess
import sys

import torch

import _common

B, C, SHRINK, LR = 4096, 32, 0.05, 0.5


def _problem():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(C, C, dtype=torch.float64, generator=g))
    A = (q * (torch.rand(C, dtype=torch.float64, generator=g) + 0.5)) @ q.T
    b = torch.randn(B, C, dtype=torch.float64, generator=g)
    return A.requires_grad_(True), b.requires_grad_(True)


def _run(kind: str, iters: int):
    import torchiter  # noqa: F401
    from torchiter.reference import quadratic_descent_reference

    A, b = _problem()
    y0 = torch.zeros_like(b)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if kind == "op":
            y, _ = torch.ops.torchiter.quadratic_descent(y0, A, b, LR, iters, 0.0, 1, None, SHRINK, None, None)
        else:
            y, _ = quadratic_descent_reference(y0, A, b, LR, iters, shrink=SHRINK)
    y.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_growth_mib": (after - before) / 1024, "saved_mib": saved[0] / 2**20}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        print(json.dumps(_run(sys.argv[2], int(sys.argv[3]))))
        return
    torch.set_num_threads(torch.get_num_threads())
    print(_common.machine_header())
    print(f"\n## {B} x {C} float64, soft threshold {SHRINK}: forward + backward of y.sum()")
    print("| variant | iterations | peak RSS growth | saved for backward |")
    print("| --- | --- | --- | --- |")
    for kind, iters in (("op", 50), ("op", 5000), ("unrolled", 50), ("unrolled", 200)):
        out = subprocess.run(
            [sys.executable, __file__, "--case", kind, str(iters)], capture_output=True, text=True, check=True
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        name = "quadratic_descent (implicit backward)" if kind == "op" else "plain loop through autograd"
        print(f"| {name} | {iters} | {r['peak_growth_mib']:.1f} MiB | {r['saved_mib']:.2f} MiB |")

    import torchiter  # noqa: F401

    A, b = _problem()
    y0 = torch.zeros_like(b)
    op = torch.ops.torchiter.quadratic_descent
    print("\n| variant | median time |")
    print("| --- | --- |")
    for iters in (50, 5000):
        t, _ = _common.median_seconds(
            f"op(y0, A, b, {LR}, {iters}, 0.0, 1, None, {SHRINK}, None, None)[0].sum().backward()",
            {"op": op, "y0": y0, "A": A, "b": b},
            "quadratic_descent",
            f"{iters} iterations",
            "forward+backward",
            min_run_time=2.0,
        )
        with torch.no_grad():
            f, _ = _common.median_seconds(
                f"op(y0, A, b, {LR}, {iters}, 0.0, 1, None, {SHRINK}, None, None)",
                {"op": op, "y0": y0, "A": A.detach(), "b": b.detach()},
                "quadratic_descent",
                f"{iters} iterations",
                "forward",
                min_run_time=2.0,
            )
        print(f"| forward + backward, {iters} iterations | {t * 1e3:.2f} ms (forward alone {f * 1e3:.2f} ms) |")


if __name__ == "__main__":
    main()
