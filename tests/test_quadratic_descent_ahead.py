"""quadratic_descent with a stop test: tiles that run ahead of the test.

With a stop test (and no trace or GEMM), the CPU kernel keeps each tile of
positions in cache for many iterations, running it ahead as long as its own
change shows that the batch-wide test cannot pass yet, and brings the tiles
together only where it might. With a trace it sweeps every position once per
iteration instead. Both must give the same loop: these tests compare them bit
for bit (result, iteration count, convergence flag, first and last change)
on loops that stop early, late, never, after tiles disagree about stopping,
and with non-finite values, at several thread counts.
"""

import math

import pytest
import torch

from _util import bits, bits_at_thread_counts, spd_matrix
from torchiter.ops import quadratic_descent_ex
from torchiter.reference import quadratic_descent_ex_reference


# (B, C) rows folded into one group, per-sample tiles with a partial last
# tile, a few spatial positions folded, a wide layer, and many tiles of a
# few channels.
SHAPES = [(300, 20), (5, 33, 37), (40, 12, 5), (3, 70, 130), (2000, 3)]
PROJECTIONS = {
    "none": dict(),
    "relu": dict(min=0.0),
    "box": dict(min=-0.3, max=0.5),
    "soft_nonneg": dict(shrink=0.02, min=0.0),
}


def ex(y0, A, b, lr, K, tol, check_every=1, lrs=None, trace=False, shrink=0.0, min=None, max=None):
    return quadratic_descent_ex(y0, A, b, lr, K, tol, check_every, lrs, shrink, min, max, trace=trace)


def assert_same_loop(got, swept):
    """The run-ahead loop's outputs against the swept loop's, bit for bit (the trace aside)."""
    for name, x, z in zip(("y", "iterations", "converged", "change", "growth"), got[:5], swept[:5]):
        assert torch.equal(bits(x), bits(z)), name


def uneven_problem(shape, dtype, seed):
    """``(y0, A, b, lr)``: a contracting loop whose positions settle at very
    different speeds (b's scale varies over five orders of magnitude), so
    that tiles reach the tolerance at different iterations."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    A = spd_matrix(C, generator=g)
    lr = float(0.8 / torch.linalg.eigvalsh(A).max())
    pos_shape = (shape[0], 1) + tuple(shape[2:])
    scale = 10.0 ** (-5 * torch.rand(pos_shape, generator=g, dtype=torch.float64))
    b = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    y0 = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return y0.to(dtype), A.to(dtype), b.to(dtype), lr


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("proj", list(PROJECTIONS))
@pytest.mark.parametrize("tol,check_every", [(1e-3, 1), (1e-5, 1), (1e-4, 3), (1e-30, 1)], ids=str)
def test_equals_the_swept_loop(shape, dtype, proj, tol, check_every):
    y0, A, b, lr = uneven_problem(shape, dtype, seed=sum(shape) + len(proj))
    kw = PROJECTIONS[proj]
    swept = ex(y0, A, b, lr, 300, tol, check_every, trace=True, **kw)
    got = ex(y0, A, b, lr, 300, tol, check_every, **kw)
    assert_same_loop(got, swept)
    # Past the first window of iterations (64), except where nothing can pass.
    if tol > 1e-30 and shape[1] > 3:
        assert 1 < int(got.iterations) < 300 and bool(got.converged)


@pytest.mark.parametrize("K", [0, 1, 2, 63, 64, 65, 128, 129, 200])
@pytest.mark.parametrize("tol", [1e-30, 1e3, 2e-4])
def test_window_boundaries_and_tiny_loops(K, tol):
    # A tolerance nothing passes runs every window to K; one everything
    # passes stops at the first check (iteration 1); in between the loop
    # stops where it stops, whatever the window.
    y0, A, b, lr = uneven_problem((700, 9), torch.float32, seed=K)
    assert_same_loop(ex(y0, A, b, lr, K, tol), ex(y0, A, b, lr, K, tol, trace=True))


def test_scheduled_rates():
    y0, A, b, lr = uneven_problem((4, 17, 61), torch.float32, seed=3)
    K = 400
    lrs = lr * (0.05 + 0.1 * torch.rand(K, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    got = ex(y0, A, b, lr, K, 1e-6, lrs=lrs)
    assert_same_loop(got, ex(y0, A, b, lr, K, 1e-6, lrs=lrs, trace=True))
    assert int(got.iterations) > 128, "the rates of several windows should be read"


def rotating_problem(dtype):
    """``(y0, A, b, lr)`` for two channels whose change turns by 45 degrees
    per iteration while it shrinks by 0.976: its largest channel dips by
    sqrt(2) every other iteration. The first change of the first 512
    positions lies on an axis, that of the next 512 at 45 degrees, so the two halves (in different tiles) dip at
    alternate iterations: each half passes the test on its own well before
    both pass it at the same iteration."""
    lr, a = 0.31, 1.0
    s = (1 - lr * a) / lr  # turns by 45 degrees per iteration
    A = torch.tensor([[a, -s], [s, a]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 512
    b = torch.randn(2 * n, 2, generator=g, dtype=torch.float64)
    fixed = torch.linalg.solve(A, b.T).T
    angle = torch.cat([torch.zeros(n), torch.full((n,), math.pi / 4)]).to(torch.float64)
    # The first change is -lr A e0: on an axis, or at 45 degrees.
    first_change = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    y0 = fixed - torch.linalg.solve(A, first_change.T).T / lr
    return y0.to(dtype), A.to(dtype), b.to(dtype), lr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tiles_that_pass_alone_do_not_stop_the_loop(dtype):
    y0, A, b, lr = rotating_problem(dtype)
    tol = 1e-3
    # The two halves on their own, in float64: each passes the test at some
    # iteration where the other does not, before the whole batch stops.
    ref = quadratic_descent_ex_reference
    halves = [ref(y0[i * 512 : (i + 1) * 512].double(), A.double(), b[i * 512 : (i + 1) * 512].double(),
                  lr, 400, 0.0)["trace"] for i in range(2)]
    whole = ref(y0.double(), A.double(), b.double(), lr, 400, tol)
    stop = int(whole["iterations"]) - 1
    alone = [[k for k in range(1, stop) if t[k] < tol and u[k] >= tol] for t, u in (halves, halves[::-1])]
    assert alone[0] and alone[1], "each half should pass alone at some earlier iteration"
    got = ex(y0, A, b, lr, 400, tol)
    assert_same_loop(got, ex(y0, A, b, lr, 400, tol, trace=True))
    assert bool(got.converged) and abs(int(got.iterations) - int(whole["iterations"])) <= 2


def test_non_finite_values_never_pass():
    y0, A, b, lr = uneven_problem((600, 10), torch.float32, seed=5)
    for value in (float("nan"), float("inf")):
        bad = b.clone()
        bad[17, 3] = value
        got = ex(y0, A, bad, lr, 150, 1e-4)
        assert_same_loop(got, ex(y0, A, bad, lr, 150, 1e-4, trace=True))
        assert not bool(got.converged) and int(got.iterations) == 150 and math.isnan(float(got.change))


def test_positions_at_rest_with_a_stop_test():
    # A third of the positions at rest (y0 = +0, b = 0): the loop runs on the
    # moving ones alone, in tiles of their own.
    y0, A, b, lr = uneven_problem((6, 24, 19, 19), torch.float32, seed=9)
    rest = torch.rand(6, 1, 19, 19, generator=torch.Generator().manual_seed(1)) < 0.35
    y0 = y0.masked_fill(rest, 0.0).clamp_min(0.0)
    b = b.masked_fill(rest, 0.0)
    got = ex(y0, A, b, lr, 200, 1e-5, min=0.0)
    assert_same_loop(got, ex(y0, A, b, lr, 200, 1e-5, trace=True, min=0.0))
    assert (got.y.masked_select(rest) == 0).all()


@pytest.mark.parametrize("problem,K,tol", [
    (lambda: uneven_problem((3000, 16), torch.float32, seed=4), 300, 1e-5),
    (lambda: rotating_problem(torch.float32), 400, 1e-3),
], ids=["uneven", "rotating"])
def test_bitwise_at_any_thread_count(problem, K, tol):
    y0, A, b, lr = problem()
    swept = ex(y0, A, b, lr, K, tol, trace=True)
    # The five outputs as one byte string per thread count.
    runs = bits_at_thread_counts(lambda: torch.cat([bits(t).flatten() for t in ex(y0, A, b, lr, K, tol)[:5]]))
    want = torch.cat([bits(t).flatten() for t in swept[:5]])
    assert all(torch.equal(r, want) for r in runs)


def test_against_float64():
    y0, A, b, lr = uneven_problem((500, 11), torch.float32, seed=6)
    got = ex(y0, A, b, lr, 300, 1e-5, min=0.0)
    ref = quadratic_descent_ex_reference(y0.double(), A.double(), b.double(), lr, 300, 1e-5, min=0.0)
    assert abs(int(got.iterations) - int(ref["iterations"])) <= 3
    torch.testing.assert_close(got.y.double(), ref["y"], rtol=1e-4, atol=1e-5)
