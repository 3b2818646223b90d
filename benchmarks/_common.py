"""Shared helpers of the benchmarks: machine description and timing."""

import os
import platform
import shlex
import sys
import time

import torch
import torch.utils.benchmark as tb


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_has_flag(name: str) -> bool:
    """``name`` (e.g. ``avx512_bf16``) is among the CPU flags Linux lists; False elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and name in line.split() for line in f)
    except OSError:
        return False


def machine_header(device: str = "cpu") -> str:
    """Two lines naming the machine, the software and the command that ran."""
    dev = cpu_model()
    if device == "cuda" and torch.cuda.is_available():
        dev = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cmd = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)
    import torchiter

    isa = f"torchiter CPU kernels {torchiter.cpu_capability()}, bfloat16 mixing on {torchiter.cpu_bfloat16_units()}"
    # Variables that narrow torchiter's, ATen's or MKL's instruction set are
    # part of the command that ran.
    forced = [
        f"{k}={os.environ[k]}"
        for k in ("TORCHITER_CPU_CAPABILITY", "TORCHITER_AMX", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
        if k in os.environ
    ]
    if forced:
        isa += f" ({', '.join(forced)})"
    load = ""
    if hasattr(os, "getloadavg"):
        # Other processes competing for the cores skew every figure: say so.
        load = "; load average %.1f %.1f %.1f" % os.getloadavg()
    return (
        f"# machine: {dev}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; {isa}{load}; "
        f"{platform.system()} {platform.machine()}; Python {platform.python_version()}; torch {torch.__version__}\n"
        f"# command: {cmd}"
    )


def median(xs):
    """The middle value (the upper one of an even count): of per-round times or ratios."""
    xs = sorted(xs)
    return xs[len(xs) // 2]


def median_seconds(stmt, globals_, label: str, sub_label: str, description: str, min_run_time: float = 1.0):
    """Times `stmt` with torch.utils.benchmark at the current torch thread count; returns (median seconds, Measurement)."""
    # Timer runs its statement at num_threads (default 1), not at the caller's count.
    m = tb.Timer(
        stmt=stmt, globals=globals_, label=label, sub_label=sub_label, description=description,
        num_threads=torch.get_num_threads(),
    ).blocked_autorange(min_run_time=min_run_time)
    return m.median, m


def thread_cpu_ticks():
    """CPU time (clock ticks) of each thread of this process (Linux; {} elsewhere)."""
    out = {}
    if not os.path.isdir("/proc/self/task"):
        return out
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def paired_medians(a, b, calls: int):
    """Median seconds per call of ``a`` and of ``b``, timed call by call in
    alternation, so that a slow spell of the machine hits both alike."""
    clock = time.perf_counter
    ta, tb = [], []
    for _ in range(calls):
        t0 = clock()
        a()
        t1 = clock()
        b()
        t2 = clock()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return median(ta), median(tb)


def per_call(fn, min_time: float, sync=None) -> float:
    """Seconds per call of fn (called once first), timed over at least min_time.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and
    before it stops, so that queued device work is inside the timing."""
    sync = sync or (lambda: None)
    fn()
    n = 1
    while True:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return dt / n
        n *= 2
