"""The whole-loop op's arithmetic rate over channel counts, against the FMA peak and torch.mm.

``torch.ops.torchiter.quadratic_descent`` alone (no model, no encoder) on a
(rows, C) state, 50 iterations, no stop test, float32, for C from 16 to 1,024:
its GFLOP/s (2·rows·C²·iterations over the median time), that rate over the
measured FMA peak of one core per thread (``fma_peak.c``, as in
``bench_threads.py``), and the rate of ``torch.mm`` for the same per-iteration
product (the (C, C) matrix times the (C, rows) state), which a loop built on a
BLAS GEMM cannot exceed. The rows default to 4,096 (1,024 from C = 1,024 on).
The loop has a ReLU (``min=0``), which leaves about half of y at zero: the
rates are those of the dense kernel (``TORCHITER_SPARSE=0``, every channel
summed); the last column times the default, which on AVX-512 skips those
zeros for the sizes where that pays (docs/ops.md), and its speed-up.

``--dtype bfloat16`` runs the op and ``torch.mm`` on bfloat16 tensors: on a
CPU with AVX512-BF16 the op's mixing then takes bfloat16 products (see
docs/ops.md), and its rate is set against the peak of those instructions
(``fma_peak.c avx512bf16``: twice the float32 FMA's FLOPs per instruction).

    python benchmarks/bench_channels.py [--threads 1] [--channels 16,32,...] [--dtype bfloat16]
"""

import argparse
import os
import sys
import time

import torch

import torchiter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_has_flag, machine_header, median  # noqa: E402
from bench_threads import fma_peak  # noqa: E402


def seconds(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--channels", default="16,32,50,64,100,128,192,256,512,1024")
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--calls", type=int, default=15, help="timed calls per size (median)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    print(machine_header())
    isa = torchiter.cpu_capability()
    if dtype == torch.bfloat16:
        # The bfloat16 products exist only in the AVX-512 kernels, on CPUs that
        # have AVX512-BF16; elsewhere the op runs its float32 mixing.
        isa = "avx512bf16" if isa == "avx512" and cpu_has_flag("avx512_bf16") else isa
    peak, why = fma_peak(args.threads, isa)
    what = "VDPBF16PS" if isa == "avx512bf16" else f"{isa} FMAs"
    print(f"# {args.dtype}; peak ({what}, fma_peak.c, {args.threads} copies): "
          + (f"{peak:.1f} GFLOP/s" if peak else f"not measured ({why})"))
    print("| C | rows | dense kernel ms | GFLOP/s | of peak | torch.mm GFLOP/s (same product) | op / torch.mm "
          "| y zero | default ms (zeros skipped; vs dense) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    K = args.iterations
    for C in [int(c) for c in args.channels.split(",")]:
        rows = 4096 if C < 1024 else 1024
        g = torch.Generator().manual_seed(0)
        Q = torch.randn(C, C, generator=g) / C**0.5
        A = (Q @ Q.T + torch.eye(C)).to(dtype)  # dense: a diagonal A takes a one-FMA path
        y0 = torch.zeros(rows, C, dtype=dtype)
        b = torch.randn(rows, C, generator=g).to(dtype)
        def op():
            return torch.ops.torchiter.quadratic_descent(y0, A, b, 0.1, K, 0.0, 1, None, 0.0, 0.0, None)

        # The dense kernel (every channel summed) and the default, which on
        # AVX-512 skips the zeros ReLU leaves in y for (B, C) batches of up
        # to 128 channels; both timed in the same run.
        os.environ["TORCHITER_SPARSE"] = "0"
        t_dense = seconds(op, args.calls)
        os.environ["TORCHITER_SPARSE"] = "auto"
        before = torchiter._C._sparse_rows_count()
        t_op = seconds(op, args.calls)
        skipped = torchiter._C._sparse_rows_count() > before
        zeros = float((op()[0] == 0).double().mean())
        Y = torch.randn(C, rows, generator=g).to(dtype)
        G = torch.empty(C, rows, dtype=dtype)
        t_mm = seconds(lambda: torch.mm(A, Y, out=G), args.calls * K)
        flop = 2.0 * rows * C * C
        op_rate = flop * K / t_dense / 1e9
        mm_rate = flop / t_mm / 1e9
        frac = f"{op_rate / peak:.0%}" if peak else "-"
        default = f"{t_op * 1e3:.2f} ({t_dense / t_op:.2f}x)" if skipped else "same"
        print(f"| {C} | {rows} | {t_dense * 1e3:.2f} | {op_rate:.0f} | {frac} | {mm_rate:.0f} | {op_rate / mm_rate:.2f}x "
              f"| {zeros:.0%} | {default} |")


if __name__ == "__main__":
    main()
