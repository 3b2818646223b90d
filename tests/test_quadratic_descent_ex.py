"""torchiter.quadratic_descent_ex: statistics against a plain loop, per-sample
stopping against each sample run alone, the device-generic driver (the CUDA
path) against the CPU kernel, and its declarations (Meta, opcheck, compile)."""

import math

import pytest
import torch

import torchiter
from _util import bits
from test_quadratic_descent import PROJECTIONS, diagonal_problem, problem, spd
from torchiter.ops import quadratic_descent_ex
from torchiter.reference import quadratic_descent_ex_reference

OP = torch.ops.torchiter.quadratic_descent_ex
GENERIC = torch.ops.torchiter._quadratic_descent_ex_generic
PLAIN = torch.ops.torchiter.quadratic_descent

# Folded (few positions) and per-sample (many positions) layouts, the 4-row
# block's tails, and C >= 128 (the GEMM path in the plain x86-64 variant).
SHAPES = [(37, 5), (9, 3, 7), (4, 6, 9, 11), (3, 10, 40), (33, 1), (6, 130), (2, 140, 3)]
# (tol, check_every): no test, every iteration, every third.
TESTS = [(0.0, 1), (1e-5, 1), (1e-4, 3)]


def scaled_problem(shape, dtype=torch.float64, device="cpu", seed=0):
    """A problem whose samples converge at different speeds (b scaled per sample)."""
    torch.manual_seed(seed)
    y0, A, b = problem(shape, dtype=dtype, device=device)
    scale = torch.rand((shape[0],) + (1,) * (len(shape) - 1), dtype=dtype, device=device) * 3
    return y0, A, b * scale


def assert_stats_match(r, ref, per_sample, rtol=1e-10):
    it = r.iterations.tolist()
    assert it == ref["iterations"], (it, ref["iterations"])
    assert r.converged.tolist() == ref["converged"]
    shape = (len(ref["iterations"]),) if per_sample else ()
    for t in (r.iterations, r.converged, r.change, r.growth):
        assert t.shape == shape
    assert r.iterations.dtype == torch.int64 and r.converged.dtype == torch.bool
    torch.testing.assert_close(r.change.cpu().double(), torch.tensor(ref["change"], dtype=torch.float64),
                               rtol=rtol, atol=1e-13)
    torch.testing.assert_close(r.growth.cpu().double(), torch.tensor(ref["growth"], dtype=torch.float64),
                               rtol=rtol, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tol,check_every", TESTS, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
def test_statistics_equal_plain_loop(device, shape, tol, check_every, per_sample):
    y0, A, b = scaled_problem(shape, device=device)
    snap = bits(y0)
    r = quadratic_descent_ex(y0, A, b, 0.45, 60, tol, check_every, None, 0.0, 0.0, None, per_sample, True)
    ref = quadratic_descent_ex_reference(y0, A, b, 0.45, 60, tol, check_every, None, 0.0, 0.0, None, per_sample)
    torch.testing.assert_close(r.y, ref["y"], rtol=1e-12, atol=1e-12)
    assert r.y.is_contiguous() and r.y.shape == y0.shape
    assert_stats_match(r, ref, per_sample)
    n = len(ref["trace"])
    assert r.change_trace.shape == (60,)
    torch.testing.assert_close(r.change_trace[:n].cpu(), torch.tensor(ref["trace"], dtype=torch.float64),
                               rtol=1e-10, atol=1e-13)
    assert torch.isnan(r.change_trace[n:]).all()
    assert torch.equal(bits(y0), snap), "y0 was modified"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("tol,check_every", TESTS, ids=str)
def test_batch_mode_is_quadratic_descent_bit_for_bit(device, shape, dtype, tol, check_every):
    y0, A, b = scaled_problem(shape, dtype=dtype, device=device, seed=1)
    for trace in (False, True):
        r = OP(y0, A, b, 0.4, 50, tol, check_every, None, 0.0, None, None, False, trace)
        y, n = PLAIN(y0, A, b, 0.4, 50, tol, check_every, None, 0.0, None, None)
        assert torch.equal(r[0], y) and int(r[1]) == int(n)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("proj", ["none", "relu", "soft_nonneg", "box"])
def test_per_sample_equals_each_sample_alone(shape, dtype, proj):
    y0, A, b = scaled_problem(shape, dtype=dtype, seed=2)
    kw = PROJECTIONS[proj]
    r = quadratic_descent_ex(y0, A, b, 0.45, 200, 1e-4, 2, per_sample=True, **kw)
    counts = set()
    for i in range(shape[0]):
        a = quadratic_descent_ex(y0[i : i + 1], A, b[i : i + 1], 0.45, 200, 1e-4, 2, **kw)
        assert int(a.iterations) == int(r.iterations[i])
        assert bool(a.converged) == bool(r.converged[i])
        # Positions never interact: bit for bit (the plain x86-64 variant's
        # GEMM path's BLAS may block a narrower matrix differently).
        if shape[1] < 128 or torchiter.cpu_capability() != "default":
            assert torch.equal(a.y[0], r.y[i]), i
            assert torch.equal(a.change, r.change[i]) and torch.equal(a.growth, r.growth[i])
        else:
            torch.testing.assert_close(a.y[0], r.y[i])
        counts.add(int(a.iterations))
    if shape[0] > 3 and shape[1] > 1:
        assert len(counts) > 1, "the samples should stop at different iterations"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tol,check_every", TESTS + [(1e-3, 4)], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
@pytest.mark.parametrize("trace", [False, True], ids=["no_trace", "trace"])
def test_generic_driver_equals_cpu_kernel(shape, tol, check_every, per_sample, trace):
    # The CUDA kernel is this driver around the device's plain loop.
    y0, A, b = scaled_problem(shape, seed=3)
    lrs = torch.linspace(0.5, 0.3, 70, dtype=torch.float64)
    for kw in (dict(lrs=None), dict(lrs=lrs)):
        args = (y0, A, b, 0.45, 70, tol, check_every, kw["lrs"], 0.0, 0.0, None, per_sample, trace)
        r, g = OP(*args), GENERIC(*args)
        for x, z, name in zip(r, g, torchiter.ops.QuadraticDescentResult._fields):
            if x.is_floating_point() and shape[1] >= 128:
                torch.testing.assert_close(x, z, equal_nan=True, msg=name)
            else:
                assert x.shape == z.shape and x.dtype == z.dtype, name
                assert torch.equal(x.nan_to_num(7.0), z.nan_to_num(7.0)), name


@pytest.mark.parametrize("shape", [(37, 5), (9, 3, 7), (4, 6, 9, 11), (3, 10, 140), (6, 130)], ids=str)
@pytest.mark.parametrize("tol,check_every", TESTS, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
@pytest.mark.parametrize("trace", [False, True], ids=["no_trace", "trace"])
def test_diagonal_A_statistics_are_the_dense_paths(shape, tol, check_every, per_sample, trace):
    # The diagonal path measures its changes itself: every statistic must be
    # the one the dense path reports for the same (decoupled) problem.
    y0, A, dense, b = diagonal_problem(shape)
    b = b * torch.rand((shape[0],) + (1,) * (len(shape) - 1), dtype=b.dtype) * 3
    for dtype in (torch.float64, torch.float32):
        args = (0.45, 60, tol, check_every, None, 0.0, 0.0, None, per_sample, trace)
        r = OP(y0.to(dtype), A.to(dtype), b.to(dtype), *args)
        d = OP(y0.to(dtype), dense.to(dtype), b.to(dtype), *args)
        for x, z, name in zip(r, d, torchiter.ops.QuadraticDescentResult._fields):
            assert x.shape == z.shape and x.dtype == z.dtype, name
            assert torch.equal(x.nan_to_num(7.0), z.nan_to_num(7.0)), name
        if tol > 0:
            assert bool(r[2].all()), "the case must stop early to test the stop"


@pytest.mark.parametrize("shape", [(16, 5), (2, 5, 70)], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_diagonal_A_with_an_infinity_reports_the_dense_paths_statistics(shape, per_sample, tol):
    y0, A, dense, b = diagonal_problem(shape)
    b[1, 2] = float("inf")
    r = OP(y0, A, b, 0.3, 9, tol, 1, None, 0.0, None, None, per_sample, True)
    d = OP(y0, dense, b, 0.3, 9, tol, 1, None, 0.0, None, None, per_sample, True)
    assert torch.isnan(r[0][1, :-1]).all()
    for x, z, name in zip(r, d, torchiter.ops.QuadraticDescentResult._fields):
        assert torch.equal(bits(x.reshape(-1)), bits(z.reshape(-1))), name


def test_scheduled_rates_and_projection_statistics():
    y0, A, b = scaled_problem((11, 4, 3), seed=4)
    lrs = torch.rand(80, dtype=torch.float64) * 0.3 + 0.2
    for per_sample in (False, True):
        r = quadratic_descent_ex(y0, A, b, 0.0, 80, 1e-5, 1, lrs, 0.01, -0.5, 0.7, per_sample, True)
        ref = quadratic_descent_ex_reference(y0, A, b, 0.0, 80, 1e-5, 1, lrs, 0.01, -0.5, 0.7, per_sample)
        torch.testing.assert_close(r.y, ref["y"], rtol=1e-12, atol=1e-12)
        assert_stats_match(r, ref, per_sample)


def test_growth_flags_a_step_above_two_over_L():
    torch.manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    A = (q * torch.tensor([1.0, 4.0, 2.0, 3.0, 1.5, 2.5], dtype=torch.float64)) @ q.T  # L = 4: 2/L = 0.5
    y0 = torch.zeros(8, 6, dtype=torch.float64)
    b = torch.randn(8, 6, dtype=torch.float64)
    ok = quadratic_descent_ex(y0, A, b, 0.45, 100)
    assert float(ok.growth) <= 1.0
    bad = quadratic_descent_ex(y0, A, b, 0.6, 100)
    assert float(bad.growth) > 10.0
    # Far above: the state overflows; NaN or inf, never a finite change.
    worse = quadratic_descent_ex(y0, A, b, 5.0, 2000, 1e-3, per_sample=True)
    assert not torch.isfinite(worse.change).any() or not torch.isfinite(worse.growth).any()
    assert not worse.converged.any(), "a diverged loop never passes its stop test"


def test_nan_never_converges_and_counts_stay_exact():
    y0, A, b = scaled_problem((6, 3), seed=6)
    b[2, 1] = math.nan
    r = quadratic_descent_ex(y0, A, b, 0.4, 300, 1e-4, per_sample=True)
    assert not bool(r.converged[2]) and int(r.iterations[2]) == 300
    assert math.isnan(float(r.change[2]))
    others = [i for i in range(6) if i != 2]
    assert r.converged[others].all() and (r.iterations[others] < 300).all()
    assert not torch.isnan(r.y[others]).any()


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (2, 3, 0)], ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
def test_empty_and_zero_iterations(device, shape, per_sample):
    y0 = torch.randn(shape, dtype=torch.float64, device=device)
    A = torch.eye(shape[1], dtype=torch.float64, device=device)
    r = quadratic_descent_ex(y0, A, y0.clone(), 0.3, 7, 1e-3, per_sample=per_sample, trace=True)
    n = (shape[0],) if per_sample else ()
    assert r.iterations.shape == n and (r.iterations == 7).all() and not r.converged.any()
    assert (r.change == 0).all() and (r.growth == 0).all() and r.change_trace.shape == (7,)
    y0, A, b = scaled_problem((4, 3), seed=7)
    z = quadratic_descent_ex(y0, A, b, 0.3, 0, 1e-3, per_sample=per_sample, trace=True)
    assert torch.equal(z.y, y0) and (z.iterations == 0).all() and z.change_trace.shape == (0,)
    assert (z.change == 0).all() and (z.growth == 0).all() and not z.converged.any()


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_per_sample_bitwise_at_any_thread_count(threads):
    # Enough positions that the tiles split over the threads, and samples
    # stopping throughout (compactions happen between parallel sweeps).
    y0, A, b = scaled_problem((3000, 6), dtype=torch.float32, seed=8)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = quadratic_descent_ex(y0, A, b, 0.45, 300, 1e-4, per_sample=True, trace=True)
        torch.set_num_threads(threads)
        got = quadratic_descent_ex(y0, A, b, 0.45, 300, 1e-4, per_sample=True, trace=True)
    finally:
        torch.set_num_threads(old)
    for x, z in zip(want, got):
        assert torch.equal(x.nan_to_num(7.0), z.nan_to_num(7.0))
    assert len(set(want.iterations.tolist())) > 10


@pytest.mark.parametrize("threads", [2, 3])
def test_per_sample_spatial_bitwise_at_any_thread_count(threads):
    # Samples of several positions each (399 here) straddle tiles that
    # different threads sweep; once a sample stops, a running one moves into
    # its slot, which must happen before any thread reads that slot. Samples
    # of different scales stop at different iterations, so moves happen
    # throughout, and repeated calls catch a race as well as a wrong result.
    torch.manual_seed(11)
    B, C = 10, 9
    A = spd(C, dtype=torch.float32)
    b = torch.randn(B, C, 19, 21) * torch.logspace(-3, 1, B).view(B, 1, 1, 1)
    y0 = torch.zeros_like(b)
    alone = [quadratic_descent_ex(y0[i : i + 1], A, b[i : i + 1], 0.1, 150, 1e-3) for i in range(B)]
    assert len({int(a.iterations) for a in alone}) > 3
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        for _ in range(5):
            r = quadratic_descent_ex(y0, A, b, 0.1, 150, 1e-3, per_sample=True)
            for i, a in enumerate(alone):
                assert int(r.iterations[i]) == int(a.iterations), i
                assert torch.equal(r.y[i], a.y[0]), i
                assert torch.equal(r.change[i], a.change) and torch.equal(r.growth[i], a.growth), i
    finally:
        torch.set_num_threads(old)


def test_errors_name_the_op_and_argument():
    y0, A, b = scaled_problem((3, 2), seed=9)
    with pytest.raises(RuntimeError, match=r"torchiter.quadratic_descent_ex: trace=True records max_iterations"):
        OP(y0, A, b, 0.1, 10**9, 0.0, 1, None, 0.0, None, None, False, True)
    with pytest.raises(RuntimeError, match=r"torchiter.quadratic_descent_ex: tol must be >= 0"):
        OP(y0, A, b, 0.1, 10, -1.0, 1, None, 0.0, None, None, True, False)
    # Without trace, a huge budget costs what the iterations run cost.
    r = OP(y0, A, b, 0.3, 10**12, 1e-3, 1, None, 0.0, None, None, True, False)
    assert r[2].all() and (r[1] < 1000).all()


def test_meta_opcheck_and_compile():
    y0, A, b = scaled_problem((5, 3, 2), seed=10)
    for per_sample in (False, True):
        for trace in (False, True):
            torch.library.opcheck(OP.default, (y0, A, b, 0.3, 12),
                                  dict(tol=1e-4, min=0.0, per_sample=per_sample, trace=trace))
    m = OP(y0.to("meta"), A.to("meta"), b.to("meta"), 0.3, 12, 1e-4, 1, None, 0.0, None, None, True, True)
    assert [t.shape for t in m] == [y0.shape, (5,), (5,), (5,), (5,), (12,)]
    assert [t.dtype for t in m] == [torch.float64, torch.int64, torch.bool, torch.float64, torch.float64,
                                    torch.float64]

    def f(y0, A, b):
        r = quadratic_descent_ex(y0, A, b, 0.3, 25, 1e-4, per_sample=True)
        return r.y * 2, r.iterations, r.growth

    want = f(y0, A, b)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(y0, A, b)
    for x, z in zip(want, got):
        assert torch.equal(x, z)


def test_gradient_of_y_as_quadratic_descent():
    y0, A, b = scaled_problem((4, 3), seed=11)
    A.requires_grad_(True)
    b.requires_grad_(True)
    r = quadratic_descent_ex(y0, A, b, 0.45, 400, 1e-12, min=0.0, per_sample=True)
    y, _ = PLAIN(y0, A, b, 0.45, 400, 1e-12, 1, None, 0.0, 0.0, None)
    w = torch.randn_like(y)
    ga, gb = torch.autograd.grad((r.y * w).sum(), (A, b))
    ga2, gb2 = torch.autograd.grad((y * w).sum(), (A, b))
    torch.testing.assert_close(ga, ga2, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gb, gb2, rtol=1e-8, atol=1e-10)
    for t in r[1:]:
        assert not t.requires_grad
