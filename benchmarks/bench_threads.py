"""Thread scaling of torchiter's CPU kernels, and the conv kernel against the
machine's measured FMA peak.

For each op it times, in one run, the same call at 1 thread and at every
thread count up to the torch default: the median wall time
(torch.utils.benchmark), the speed-up over 1 thread, the process's CPU time
over wall time across repeated calls (about the number of threads that were
busy: 1.00 means serial, on an otherwise idle machine), and how many threads'
CPU time grew during those calls (Linux /proc; unlike the ratio this count
does not depend on other load on the machine).

The FMA peak is measured, not computed from a data sheet: the median GFLOP/s of
a float32 GEMM (torch.mm, i.e. MKL/oneDNN, 2048 x 2048) at the same thread
count, a practical upper bound for any FMA kernel on this machine. The conv
workload's quadratic_descent (C=50 channels, 52900 positions, 40 iterations)
does 2*C*C*positions useful FLOPs per iteration.

    python3 benchmarks/bench_threads.py [--min-run-time 1] [--threads 1,2]
"""

import argparse
import time

import torch

import torchiter
from _common import machine_header, median_seconds, thread_cpu_ticks

SGD = torch.ops.torchiter.sgd_step_
QD = torch.ops.torchiter.quadratic_descent


def cases():
    torch.manual_seed(0)
    big_p, big_g = torch.rand(16 * 1024 * 1024), torch.randn(16 * 1024 * 1024)
    small_p = [torch.rand(1000) for _ in range(4096)]
    small_g = [torch.randn(1000) for _ in range(4096)]
    C = 50
    q, _ = torch.linalg.qr(torch.randn(C, C))
    A = (q * (torch.rand(C) + 0.5)) @ q.T
    y0 = torch.randn(100, C, 23, 23)
    b = torch.randn(100, C, 23, 23)
    yp = torch.randn(1000, 3)
    bp = torch.randn(1000, 3)
    Ap = torch.eye(3) + 0.05
    conv_flops = 2 * C * C * 100 * 23 * 23 * 40
    return {
        "sgd_step_ 16M float32 (step+clamp)": (lambda: SGD([big_p], [big_g], [], 1e-6, min=-1.0, max=1.0), None),
        "sgd_step_ 4096 x 1000 float32": (lambda: SGD(small_p, small_g, [], 1e-6, min=0.0), None),
        "quadratic_descent conv (50 ch, 100x23x23, 40 it)": (lambda: QD(y0, A, b, 0.5, 40, min=0.0), conv_flops),
        "quadratic_descent pca (3 ch, 1000, 100 it, tol)": (lambda: QD(yp, Ap, bp, 0.1, 100, tol=1e-30), None),
    }


def cpu_over_wall(fn, seconds=0.5):
    """(process CPU time / wall time, threads whose CPU time grew) over repeated calls."""
    fn()
    ticks = thread_cpu_ticks()
    w0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        fn()
    ratio = (time.process_time() - c0) / (time.perf_counter() - w0)
    busy = sum(1 for tid, t in thread_cpu_ticks().items() if t > ticks.get(tid, 0))
    return ratio, busy


def gemm_peak(threads, min_run_time):
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = torch.empty(2048, 2048)
    t, _ = median_seconds("torch.mm(a, b, out=out)", dict(torch=torch, a=a, b=b, out=out), "peak", f"{threads}", "gemm", min_run_time)
    return 2 * 2048**3 / t / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 up to the torch default)")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    counts = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, default_threads + 1))
    print(machine_header())
    print(f"# thread counts: {counts}")
    results = {}
    peaks = {}
    for n in counts:
        torch.set_num_threads(n)
        peaks[n] = gemm_peak(n, args.min_run_time)
        for name, (fn, flops) in cases().items():
            t, _ = median_seconds("fn()", dict(fn=fn), name, f"{n} threads", "op", args.min_run_time)
            results[(name, n)] = (t, cpu_over_wall(fn), flops)
    torch.set_num_threads(default_threads)
    print(f"\n## wall time, speed-up over 1 thread, CPU time / wall time ({torchiter.cpu_capability()} kernels)")
    head = " | ".join(f"{n} thr: median | speed-up | CPU/wall | busy threads" for n in counts)
    print(f"| op | {head} |")
    print("| --- |" + " --- | --- | --- | --- |" * len(counts))
    for name in cases():
        base = results[(name, counts[0])][0]
        cells = []
        for n in counts:
            t, (ratio, busy), _ = results[(name, n)]
            cells.append(f"{t * 1e3:.2f} ms | {base / t:.2f}x | {ratio:.2f} | {busy}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n## conv kernel against the measured FMA peak (float32 GEMM, torch.mm 2048^3)")
    print("| threads | GEMM peak GFLOP/s | conv quadratic_descent GFLOP/s | fraction of peak |")
    print("| --- | --- | --- | --- |")
    conv = next(k for k in cases() if k.startswith("quadratic_descent conv"))
    for n in counts:
        t, _, flops = results[(conv, n)]
        print(f"| {n} | {peaks[n]:.1f} | {flops / t / 1e9:.1f} | {flops / t / 1e9 / peaks[n]:.2f} |")


if __name__ == "__main__":
    main()
