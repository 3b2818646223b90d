"""torchiter's CUDA kernels against plain PyTorch on the GPU.

(a) ``sgd_step``: one fused projected-SGD step (``torchiter.sgd_step_``, ReLU
    projection, with and without momentum) against ``torch.optim.SGD(fused=True)``
    followed by an in-place ``clamp_(min=0)``, and against a device-to-device
    copy that moves the same number of bytes (12 bytes per float32 element
    without momentum, 20 with it: the floor for one pass over memory). Sizes
    from 1M to 256M float32 elements, as one tensor and split into a list.
    Reports GB/s, the fraction of copy bandwidth and the speedup.
(b) ``workloads``: the three similarity-matching workloads of
    docs/models.md (pca, clustering, conv): one ``quadratic_descent``
    call against the original per-iteration loop on the GPU (einsum gradient,
    ``torch.optim.SGD`` step, projection by reassigning ``.data``, and a
    ``max|Δy| < tol`` test read back with ``.item()`` every iteration). Both
    must give the same iteration count and output.

Timings use torch.utils.benchmark (which synchronises CUDA around each run).
The output is printed and written to ``benchmarks/results/`` as
``cuda_<gpu>_<date>.txt``. Without a GPU the script says so and exits 0.

    python3 benchmarks/bench_cuda.py [--part all|sgd_step|workloads]
        [--sizes 1 4 16 64 256] [--tensors 1 64] [--min-run-time 0.5] [--no-save]
"""

import argparse
import ctypes
import datetime
import io
import os
import platform
import re
import shlex
import subprocess
import sys

import torch
import torch.utils.benchmark as tb
from torch import nn

import torchiter  # noqa: F401  (registers the ops)
from torchiter.reference import original_nsm_loop

MIB = 1 << 20


# --------------------------------------------------------------------------- machine


def driver_versions() -> str:
    """The NVIDIA driver release (nvidia-smi) and the CUDA driver API version."""
    parts = []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
        if out:
            parts.append(f"driver {out[0].strip()}")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        v = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
            parts.append(f"driver API CUDA {v.value // 1000}.{(v.value % 1000) // 10}")
    except OSError:
        pass
    return ", ".join(parts) or "driver version unknown"


def header() -> str:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    cmd = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)
    return (
        f"# device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
        f"compute capability {props.major}.{props.minor}\n"
        f"# software: torch {torch.__version__} (CUDA {torch.version.cuda}), {driver_versions()}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}\n"
        f"# date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
        f"# command: {cmd}"
    )


def timeit(stmt: str, env: dict, label: str, sub_label: str, description: str, min_run_time: float):
    # Timer's num_threads defaults to 1, whatever torch's thread count.
    return tb.Timer(
        stmt=stmt, globals=env, label=label, sub_label=sub_label, description=description,
        num_threads=torch.get_num_threads(),
    ).blocked_autorange(min_run_time=min_run_time)


# --------------------------------------------------------------------------- (a) sgd_step


def split(n: int, parts: int):
    """`parts` sizes summing to n, uneven so that tails and alignments vary."""
    if parts == 1:
        return [n]
    base = n // parts
    sizes = [base + (7 * i) % 129 - 64 for i in range(parts - 1)]
    sizes.append(n - sum(sizes))
    return sizes


def bench_sgd_step(sizes_m, tensor_counts, min_run_time, out):
    results = []
    print("\n## (a) one projected-SGD step (ReLU), float32, lr 0.01", file=out)
    print(
        f"{'elements':>9} {'tensors':>7} {'momentum':>8} | {'torchiter':>10} {'SGD fused+clamp':>15} {'copy':>10} | "
        f"{'GB/s':>6} {'of copy':>7} {'speedup':>7}",
        file=out,
    )
    for m in sizes_m:
        n = int(m * MIB)
        for parts in tensor_counts:
            for momentum in (0.0, 0.9):
                torch.cuda.empty_cache()
                shapes = split(n, parts)
                params = [torch.randn(s, device="cuda") for s in shapes]
                grads = [torch.randn(s, device="cuda") for s in shapes]
                bufs = [torch.randn(s, device="cuda") for s in shapes] if momentum else []
                # torch.optim.SGD on its own copies, with the same gradients.
                ref = [p.clone().requires_grad_(True) for p in params]
                for r, g in zip(ref, grads):
                    r.grad = g
                opt = torch.optim.SGD(ref, lr=0.01, momentum=momentum, fused=True)
                opt.step()  # creates the momentum buffers; later steps blend them
                bytes_per_elem = 20 if momentum else 12
                nbytes = n * bytes_per_elem
                # A copy reads and writes nbytes / 2 bytes each: the same traffic.
                src = torch.empty(nbytes // 8, dtype=torch.float32, device="cuda").fill_(1.0)
                dst = torch.empty_like(src)
                env = dict(torch=torch, params=params, grads=grads, bufs=bufs, momentum=momentum, ref=ref, opt=opt,
                           src=src, dst=dst)
                label = "sgd_step"
                sub = f"{m}M x{parts} momentum={momentum}"
                t_fused = timeit(
                    "torch.ops.torchiter.sgd_step_(params, grads, bufs, 0.01, momentum, min=0.0)",
                    env, label, sub, "torchiter", min_run_time,
                )
                t_sgd = timeit(
                    "opt.step()\nwith torch.no_grad():\n    torch._foreach_clamp_min_(ref, 0.0)",
                    env, label, sub, "SGD(fused=True) + clamp_", min_run_time,
                )
                t_copy = timeit("dst.copy_(src)", env, label, sub, "copy of the same bytes", min_run_time)
                results += [t_fused, t_sgd, t_copy]
                gbs = nbytes / t_fused.median / 1e9
                print(
                    f"{m:>8}M {parts:>7} {momentum:>8} | {t_fused.median * 1e6:>8.1f}us {t_sgd.median * 1e6:>13.1f}us "
                    f"{t_copy.median * 1e6:>8.1f}us | {gbs:>6.0f} {t_copy.median / t_fused.median:>7.2f} "
                    f"{t_sgd.median / t_fused.median:>6.2f}x",
                    file=out,
                    flush=True,
                )
                del params, grads, bufs, ref, opt, src, dst, env
    return results


# --------------------------------------------------------------------------- (b) workloads

# name: (input shape, encoder factory, channels, iterations, lr, tol, relu)
WORKLOADS = {
    "pca": ((1000, 10), lambda: nn.Linear(10, 3, bias=False), 3, 100, 0.1, 1e-5, False),
    "clustering": ((100, 2), lambda: nn.Linear(2, 10), 10, 200, 0.05, 1e-4, True),
    "conv": ((100, 1, 28, 28), lambda: nn.Conv2d(1, 50, 6, bias=False), 50, 40, 1.0, 0.0, True),
}


original_loop = original_nsm_loop


def fused_loop(M, Wx, iterations, lr, tol, relu):
    y, n = torch.ops.torchiter.quadratic_descent(
        torch.zeros_like(Wx), M, Wx, lr, iterations, tol, 1, None, 0.0, 0.0 if relu else None, None
    )
    return y, n


def bench_workloads(min_run_time, out):
    results = []
    print("\n## (b) similarity-matching inner loops (float32): quadratic_descent vs the per-iteration loop", file=out)
    print(f"{'workload':>10} {'iterations':>10} | {'torchiter':>10} {'original':>10} | {'speedup':>7} {'max|dy|':>8}",
          file=out)
    for name, (shape, make_encoder, C, K, lr, tol, relu) in WORKLOADS.items():
        torch.manual_seed(0)
        enc = make_encoder().cuda()
        x = torch.rand(shape, device="cuda")
        with torch.no_grad():
            Wx = enc(x)
            # A competitor after some training: identity plus a small symmetric part.
            R = torch.randn(C, C, device="cuda") * (0.1 / C**0.5)
            M = torch.eye(C, device="cuda") + (R + R.T) / 2
        y_ref, n_ref = original_loop(M, Wx, K, lr, tol, relu)
        y_new, n_new = fused_loop(M, Wx, K, lr, tol, relu)
        n_new = int(n_new)
        diff = (y_ref - y_new).abs().max().item()
        if n_new != n_ref:
            print(f"# WARNING {name}: iteration counts differ: torchiter {n_new}, original {n_ref}", file=out)
        env = dict(original_loop=original_loop, fused_loop=fused_loop, M=M, Wx=Wx, K=K, lr=lr, tol=tol, relu=relu)
        t_new = timeit("fused_loop(M, Wx, K, lr, tol, relu)", env, "workloads", name, "torchiter", min_run_time)
        t_ref = timeit("original_loop(M, Wx, K, lr, tol, relu)", env, "workloads", name, "original", min_run_time)
        results += [t_new, t_ref]
        print(
            f"{name:>10} {n_new:>4}/{n_ref:<5} | {t_new.median * 1e3:>8.3f}ms {t_ref.median * 1e3:>8.3f}ms | "
            f"{t_ref.median / t_new.median:>6.1f}x {diff:>8.1e}",
            file=out,
            flush=True,
        )
    return results


# --------------------------------------------------------------------------- main


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "sgd_step", "workloads"], default="all")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64, 256],
                    help="sgd_step sizes in Mi float32 elements")
    ap.add_argument("--tensors", type=int, nargs="+", default=[1, 64],
                    help="split each size into this many tensors")
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--no-save", action="store_true", help="print only, write nothing to benchmarks/results/")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device is available; nothing to measure (run it on a GPU machine).")
        return 0
    if not torch._C._dispatch_has_kernel_for_dispatch_key("torchiter::sgd_step_", "CUDA"):
        print("bench_cuda: torchiter was built without its CUDA kernels (rebuild with FORCE_CUDA=1).")
        return 1

    text = io.StringIO()
    out = Tee(sys.stdout, text)
    print(header(), file=out, flush=True)
    results = []
    if args.part in ("all", "sgd_step"):
        sizes = [int(s) if float(s).is_integer() else s for s in args.sizes]
        results += bench_sgd_step(sizes, args.tensors, args.min_run_time, out)
    if args.part in ("all", "workloads"):
        results += bench_workloads(args.min_run_time, out)
    print("\n## torch.utils.benchmark.Compare", file=out)
    compare = tb.Compare(results)
    compare.trim_significant_figures()
    print(str(compare), file=out, flush=True)

    if not args.no_save:
        results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(results_dir, exist_ok=True)
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join(results_dir, f"cuda_{gpu}_{stamp}.txt")
        with open(path, "w") as f:
            f.write(text.getvalue())
        print(f"# written to {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
