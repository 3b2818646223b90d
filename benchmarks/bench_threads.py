"""Thread scaling of torchiter's CPU kernels, and the conv kernel against the
machine's measured FMA peak.

For each op it times, in one run, the same call at 1 thread and at every
thread count up to the torch default: the median wall time
(torch.utils.benchmark), the speed-up over 1 thread, the process's CPU time
over wall time across repeated calls (about the number of threads that were
busy: 1.00 means serial, on an otherwise idle machine), and how many threads'
CPU time grew during those calls (Linux /proc; unlike the ratio this count
does not depend on other load on the machine).

The FMA peak is measured, not computed from a data sheet: fma_peak.c (compiled
here with the C compiler, for the instruction set of the kernel variant in
use) runs back-to-back vector FMAs on independent registers, one copy per
thread, so only the FMA units and the clock bound it. The float32 GEMM rate
of torch.mm (MKL/oneDNN, 2048 x 2048) at the same thread count is shown
beside it, the practical rate of a tuned library. The conv workload's
quadratic_descent (C=50 channels, 52900 positions, 40 iterations) does
2*C*C*positions useful FLOPs per iteration. Two (B, C) batches under ReLU
(64 and 256 channels) time the loops that skip y's zeros, each row on its own
and by blocks of rows; the last lines say whether they ran there.

    python3 benchmarks/bench_threads.py [--min-run-time 1] [--threads 1,2]
"""

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
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
    # (B, C) batches under ReLU, about half of y zero: on AVX2 / AVX-512 the
    # kernels skip those zeros, each row on its own (64 channels) or by
    # blocks of rows (256); see the last lines of the output.
    rows = {}
    for c in (64, 256):
        m = torch.randn(c, c, dtype=torch.float64) / c**0.5
        rows[c] = ((m @ m.T / c + 0.5 * torch.eye(c, dtype=torch.float64)).float(), torch.randn(4096, c))
    return {
        "sgd_step_ 16M float32 (step+clamp)": (lambda: SGD([big_p], [big_g], [], 1e-6, min=-1.0, max=1.0), None),
        "sgd_step_ 4096 x 1000 float32": (lambda: SGD(small_p, small_g, [], 1e-6, min=0.0), None),
        "quadratic_descent conv (50 ch, 100x23x23, 40 it)": (lambda: QD(y0, A, b, 0.5, 40, min=0.0), conv_flops),
        "quadratic_descent pca (3 ch, 1000, 100 it, tol)": (lambda: QD(yp, Ap, bp, 0.1, 100, tol=1e-30), None),
        "quadratic_descent rows, ReLU (64 ch, 4096, 50 it)":
            (lambda: QD(torch.zeros(4096, 64), rows[64][0], rows[64][1], 0.3, 50, min=0.0), None),
        "quadratic_descent rows, ReLU (256 ch, 4096, 50 it)":
            (lambda: QD(torch.zeros(4096, 256), rows[256][0], rows[256][1], 0.3, 50, min=0.0), None),
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


# Compiler flags of the FMA probe per kernel variant (x86-64 only).
PROBE_FLAGS = {"avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx512f"], "avx512bf16": ["-mavx512f", "-mavx512bf16"]}


def fma_peak(threads, isa, seconds=1.0):
    """GFLOP/s of fma_peak.c over `threads` concurrent copies, or (None, why)."""
    if platform.machine() not in ("x86_64", "AMD64") or isa not in PROBE_FLAGS:
        return None, f"no probe for the {isa} variant on {platform.machine()}"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler"
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "fma_peak")
        build = subprocess.run([cc, "-O2", *PROBE_FLAGS[isa], src, "-o", exe], capture_output=True, text=True)
        if build.returncode != 0:
            return None, f"{cc} failed: {build.stderr.strip()[:200]}"
        procs = [subprocess.Popen([exe, isa, str(seconds)], stdout=subprocess.PIPE, text=True) for _ in range(threads)]
        rates = [float(p.communicate()[0].split()[1]) for p in procs]
    return sum(rates), None


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
    fma = {}
    for n in counts:
        torch.set_num_threads(n)
        fma[n] = fma_peak(n, torchiter.cpu_capability())
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
    isa = torchiter.cpu_capability()
    print(f"\n## conv kernel against the measured FMA peak ({isa} FMAs, fma_peak.c) and the GEMM rate (float32 torch.mm 2048^3)")
    print("| threads | FMA peak GFLOP/s | GEMM GFLOP/s | conv quadratic_descent GFLOP/s | fraction of FMA peak | fraction of GEMM |")
    print("| --- | --- | --- | --- | --- | --- |")
    conv = next(k for k in cases() if k.startswith("quadratic_descent conv"))
    for n in counts:
        t, _, flops = results[(conv, n)]
        rate = flops / t / 1e9
        peak, why = fma[n]
        peak_cell, frac = (f"{peak:.1f}", f"{rate / peak:.2f}") if peak else (f"n/a ({why})", "n/a")
        print(f"| {n} | {peak_cell} | {peaks[n]:.1f} | {rate:.1f} | {frac} | {rate / peaks[n]:.2f} |")
    # Which loop the (B, C) rows ran: the sparse drivers count their rows.
    print()
    some = cases()
    for name in [k for k in some if k.startswith("quadratic_descent rows")]:
        before = torchiter._C._sparse_rows_count()
        some[name][0]()
        ran = torchiter._C._sparse_rows_count() - before
        print(f"# {name}: {'zeros of y skipped' if ran else 'dense kernel'} ({ran} of 4096 rows on the sparse drivers)")


if __name__ == "__main__":
    main()
