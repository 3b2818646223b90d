"""The CPU kernels at 1, 2, 3 and 4 threads: bitwise the same results, and
every thread really takes part.

The inputs are large enough that ``at::parallel_for`` splits them at every
thread count tried (sgd_step_ splits from 32768 elements in total, in chunks
of 64 elements of the concatenated list, so chunk boundaries fall inside
tensors and between the tensors of a list; quadratic_descent splits its
fixed position tiles), and the sizes leave tails past every vector width.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import torchiter
from _util import DTYPES, bits
from test_quadratic_descent import problem


def _benchmarks_common():
    """benchmarks/_common.py under a name of its own: examples/ has a _common too."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("torchiter_benchmarks_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Per-thread CPU times, shared with bench_threads.py.
thread_cpu_ticks = _benchmarks_common().thread_cpu_ticks

THREADS = (1, 2, 3, 4)
SGD = torch.ops.torchiter.sgd_step_
QD = torch.ops.torchiter.quadratic_descent
EX = torch.ops.torchiter.quadratic_descent_ex


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _odd_sizes(total, seed):
    """Sizes of a list summing to about `total`: many small odd tensors and a big one."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 700, (400,), generator=gen).tolist()
    sizes.append(max(1, total - sum(sizes)) | 1)
    return sizes


SGD_CASES = {
    "plain": dict(momentum=0.0, shrink=0.0),
    "momentum-relu": dict(momentum=0.9, dampening=0.1, min=0.0),
    "nesterov-wd-box-shrink": dict(momentum=0.8, nesterov=True, weight_decay=0.01, shrink=0.02, min=-0.7, max=0.9),
    "maximize-soft": dict(maximize=True, shrink=0.05),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SGD_CASES, ids=str)
def test_sgd_step_bitwise_equal_at_every_thread_count(dtype, case, restore_threads):
    opts = SGD_CASES[case]
    sizes = _odd_sizes(300_000, seed=7)
    params0 = [torch.randn(n, dtype=torch.float64).to(dtype) for n in sizes]
    # A non-contiguous param takes the dense-copy path, also at every count.
    base = torch.randn(301, 203, dtype=torch.float64).to(dtype)
    params0.append(base.t())
    grads = [torch.randn(p.shape, dtype=torch.float64).to(dtype) for p in params0]
    bufs0 = [torch.randn(p.shape, dtype=torch.float64).to(dtype) for p in params0] if opts.get("momentum") else []
    results = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        params = [p.clone() for p in params0]
        bufs = [b.clone() for b in bufs0]
        for step in range(2):
            SGD(params, grads, bufs, 0.05, first_step=step == 0 and bool(bufs), **opts)
        results.append([bits(t) for t in params + bufs])
    for threads, res in zip(THREADS[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], res)):
            assert torch.equal(a, b), f"{case}/{dtype}: tensor {i} differs between 1 and {threads} threads"
    # The step changed every tensor (the comparison above compares something).
    assert all(not torch.equal(bits(p), r) for p, r in zip(params0, results[0]))


def test_sgd_step_writes_every_element_at_every_thread_count(restore_threads):
    sizes = _odd_sizes(200_000, seed=3)
    for threads in THREADS:
        torch.set_num_threads(threads)
        # An element no thread wrote would keep its 1.0.
        params = [torch.ones(n) for n in sizes]
        grads = [torch.ones(n) for n in sizes]
        SGD(params, grads, [], 0.25)
        for i, p in enumerate(params):
            assert torch.equal(p, torch.full_like(p, 0.75)), f"{threads} threads: params[{i}] not fully written"


# Each splits into several parallel tasks on both paths: per-sample tiles
# (C=50), batch-folded positions (few spatial ones), C >= 128 (the GEMM path
# in the plain x86-64 variant, register blocks of 4 vectors in the others).
QD_SHAPES = [(3, 50, 23, 23), (20001, 3), (64, 9, 7, 5), (3001, 130), (20, 140, 13, 11)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", QD_SHAPES, ids=str)
def test_quadratic_descent_bitwise_equal_at_every_thread_count(dtype, shape, restore_threads):
    y0, A, b = problem(shape, dtype=dtype)
    outs = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        # tol=0 runs the cache-blocked path; a tol that never triggers runs
        # the per-iteration sweeps (with their max-|delta| reductions).
        blocked, _ = QD(y0, A, b, 0.2, 12, min=0.0, shrink=0.01)
        sweeps, n = QD(y0, A, b, 0.2, 12, tol=1e-300, check_every=2, min=0.0, shrink=0.01)
        assert int(n) == 12
        outs.append((blocked, sweeps))
    ref = outs[0][0]
    assert not torch.isnan(ref).any()
    for threads, (blocked, sweeps) in zip(THREADS, outs):
        assert torch.equal(blocked, ref), f"blocked path differs at {threads} threads"
        assert torch.equal(sweeps, ref), f"sweep path differs at {threads} threads"


def test_quadratic_descent_stop_test_same_count_at_every_thread_count(restore_threads):
    y0, A, b = problem((20000, 4), dtype=torch.float32)
    results = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        y, n = QD(y0, A, b, 0.5, 400, tol=1e-5, min=0.0)
        results.append((int(n), y))
    assert 1 < results[0][0] < 400
    assert all(n == results[0][0] and torch.equal(y, results[0][1]) for n, y in results)


@pytest.mark.parametrize("shape", [(6000, 7), (700, 3, 5), (300, 130)], ids=str)
def test_per_sample_stops_are_each_samples_own_at_every_thread_count(shape, restore_threads):
    """Thousands of samples stopping over many iterations (running samples
    move into the slots of stopped ones): every result, count and statistic is
    the sample's own at any thread count, checked against the sample run alone
    (bitwise except on the plain x86-64 variant's GEMM path, from 128
    channels, whose BLAS may block a narrower matrix differently)."""
    gen = torch.Generator().manual_seed(5)
    y0, A, b = problem(shape, dtype=torch.float32)
    # Per-sample scales spread the stopping iterations.
    b = b * torch.logspace(-3, 1, shape[0])[torch.randperm(shape[0], generator=gen)].view(
        (-1,) + (1,) * (len(shape) - 1))
    runs = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        runs.append(EX(y0, A, b, 0.3, 300, 1e-4, 1, None, 0.0, 0.0, None, True, False))
    ref = runs[0]
    counts = ref[1]
    assert 1 < int(counts.min()) < int(counts.max()) <= 300 and len(set(counts.tolist())) > 10
    gemm = shape[1] >= 128 and torchiter.cpu_capability() == "default"
    for threads, r in zip(THREADS, runs):
        if gemm:
            # The GEMM path's BLAS may sum in another order at another
            # thread count (docs/ops.md): close, not bitwise.
            torch.testing.assert_close(r[0], ref[0], rtol=1e-3, atol=1e-3)
            continue
        for got, want in zip(r[:5], ref[:5]):
            assert torch.equal(got, want), f"per-sample results differ at {threads} threads"
    torch.set_num_threads(1)
    picks = torch.randperm(shape[0], generator=gen)[:40].tolist() + [0, shape[0] - 1]
    for i in picks:
        alone = EX(y0[i : i + 1], A, b[i : i + 1], 0.3, 300, 1e-4, 1, None, 0.0, 0.0, None, False, False)
        assert int(alone[1]) == int(counts[i]) and bool(alone[2]) == bool(ref[2][i])
        if not gemm:
            assert torch.equal(alone[0][0], ref[0][i]), i
            assert torch.equal(alone[3], ref[3][i]) and torch.equal(alone[4], ref[4][i])
        else:
            torch.testing.assert_close(alone[0][0], ref[0][i])


# --- every thread takes part -------------------------------------------------

def _busy_threads(fn, calls):
    before = thread_cpu_ticks()
    for _ in range(calls):
        fn()
    after = thread_cpu_ticks()
    return sum(1 for tid, t in after.items() if t - before.get(tid, 0) > 0)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="per-thread CPU times come from Linux /proc")
@pytest.mark.parametrize("op", ["sgd_step_ (one large tensor)", "sgd_step_ (many small tensors)", "quadratic_descent"])
def test_every_thread_does_work(op, restore_threads):
    # Not a timing test: it counts the threads whose CPU time grew while only
    # the op ran. Each of the 4 threads gets about a quarter of the work (sgd_step_:
    # a fixed quarter; quadratic_descent: tiles taken from a shared counter,
    # hundreds of them per call), over a hundred milliseconds of
    # CPU time over the calls: /proc charges CPU time in 10 ms ticks, and
    # with much less a busy thread can go uncounted.
    torch.set_num_threads(4)
    if op.startswith("sgd_step_"):
        sizes = [8_000_000] if "large" in op else [1000] * 8000
        ps = [torch.rand(n) for n in sizes]
        gs = [torch.rand(n) for n in sizes]

        def fn():
            SGD(ps, gs, [], 1e-6, min=0.0)
    else:
        y0, A, b = problem((64, 32, 24, 24), dtype=torch.float32)

        def fn():
            QD(y0, A, b, 0.1, 30, min=0.0)

    fn()  # the thread pool exists before the count starts
    assert _busy_threads(fn, calls=60) >= 4
