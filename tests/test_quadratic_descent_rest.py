"""Positions at rest in quadratic_descent's loop.

A position whose y0 is +0 and whose b is zero in every channel (an image's
background under a bias-free encoder) stays at +0 through the whole loop
when A and the rates are finite and the projection maps +0 to +0. The CPU
kernel then writes it without iterating it: without a stop test it packs
the positions that do move into full tiles, with one (or a trace) it sweeps
a working copy of the moving positions alone. These tests check that this changes nothing: results
against the float64 loop, the moving positions bit for bit against the same
batch with no position at rest, the resting ones +0, thread counts, and the
cases where a zero does not stay zero.
"""

import pytest
import torch

from _util import bits, bits_at_thread_counts, spd_problem
from torchiter.reference import quadratic_descent_reference

OP = torch.ops.torchiter.quadratic_descent
OP_EX = torch.ops.torchiter.quadratic_descent_ex

# Every driver of the loop without a stop test: per-sample tiles (the conv
# notebook's (B, 50, 23, 23)), a partial last tile (7 x 33 x 37), (B, C)
# rows read straight into tiles (300 x 20), and the working copies of a few
# channels or few positions (1000 x 3, 4 x 3 x 40, 2 x 13 x 9 x 11).
SHAPES = [(6, 50, 23, 23), (7, 33, 37), (300, 20), (1000, 3), (4, 3, 40), (2, 13, 9, 11), (3, 70, 130)]
# Projections mapping +0 to +0: these positions stay at rest.
AT_REST = {
    "none": dict(),
    "relu": dict(min=0.0),
    "box": dict(min=-0.3, max=0.5),
    "soft_nonneg": dict(shrink=0.02, min=0.0),
}


def rest_problem(shape, dtype, seed, fraction=0.4):
    """``(y0, A, b, rest)``: a random problem whose positions in ``rest``
    (shape (B, 1, *spatial), about ``fraction`` of them) have y0 = +0 and
    b = 0, some of b's zeros negative."""
    y0, A, b = spd_problem(shape, torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    rest = torch.rand((shape[0], 1) + tuple(shape[2:]), generator=g) < fraction
    # Whole runs of positions at rest as well, as an image's blank rows give.
    rest.view(shape[0], -1)[:, : max(1, rest[0].numel() // 5)] = True
    y0 = y0.masked_fill(rest, 0.0)
    b = b.masked_fill(rest, 0.0)
    b = torch.where(rest & (torch.rand(b.shape, generator=g) < 0.5), torch.tensor(-0.0, dtype=b.dtype), b)
    return y0.to(dtype), A.to(dtype), b.to(dtype), rest.expand(shape)


def moving_again(b, rest):
    """``b`` with its resting positions nudged off zero: the same batch with
    no position at rest."""
    return b.masked_fill(rest, 1e-30)


def iterated_anyway(y0, rest):
    """``y0`` with -0 at its resting positions: not at rest (only +0 is), so
    the loop iterates them, and they keep a change of exactly 0."""
    return torch.where(rest, torch.tensor(-0.0, dtype=y0.dtype), y0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("proj", AT_REST, ids=str)
def test_matches_per_iteration_loop_float64(device, shape, proj):
    y0, A, b, rest = rest_problem(shape, torch.float64, seed=len(shape) * 100 + shape[1])
    y0, A, b, rest = (t.to(device) for t in (y0, A, b, rest))
    y, n = OP(y0, A, b, 0.4, 30, **AT_REST[proj])
    yr, _ = quadratic_descent_reference(y0, A, b, 0.4, 30, **AT_REST[proj])
    assert int(n) == 30
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    assert bool((yr[rest] == 0).all()), "the reference itself keeps them at 0"
    assert bool((y[rest] == 0).all())
    if device == "cpu":
        # The CPU kernel writes them as the +0 its dense loop ends at.
        assert not bool(torch.signbit(y[rest]).any()), "positions at rest end as +0"


def test_scheduled_rates(device):
    y0, A, b, rest = rest_problem((5, 50, 23, 23), torch.float64, seed=2)
    y0, A, b = (t.to(device) for t in (y0, A, b))
    lrs = torch.linspace(0.8, 0.1, 30, dtype=torch.float64)
    y, _ = OP(y0, A, b, 123.0, 30, lrs=lrs, shrink=0.01, min=0.0)
    yr, _ = quadratic_descent_reference(y0, A, b, 123.0, 30, lrs=lrs, shrink=0.01, min=0.0)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    assert bool((y[rest.to(device)] == 0).all())
    if device == "cpu":
        assert torch.equal(bits(y[rest]), bits(torch.zeros_like(y[rest])))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("proj", ["relu", "box"])
@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_moving_positions_bitwise_as_without_rest(shape, dtype, proj, precision):
    if precision == "medium" and dtype != torch.float32:
        pytest.skip("the precision setting concerns float32 only")
    y0, A, b, rest = rest_problem(shape, dtype, seed=shape[1] + 7)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        y, _ = OP(y0, A, b, 0.4, 25, **AT_REST[proj])
        y_all, _ = OP(y0, A, moving_again(b, rest), 0.4, 25, **AT_REST[proj])
    finally:
        torch.set_float32_matmul_precision(before)
    moving = ~rest
    assert torch.equal(bits(y[moving]), bits(y_all[moving]))
    assert torch.equal(bits(y[rest]), bits(torch.zeros_like(y[rest])))
    # The nudged positions did move: the comparison covers both paths.
    assert bool((y_all[rest] != 0).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_thread_counts_give_the_same_bits(dtype):
    y0, A, b, rest = rest_problem((24, 50, 23, 23), dtype, seed=3, fraction=0.3)
    results = bits_at_thread_counts(lambda: OP(y0, A, b, 0.4, 12, min=0.0)[0])
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_statistics_as_without_rest():
    y0, A, b, rest = rest_problem((9, 40, 17, 19), torch.float64, seed=5)
    r = OP_EX(y0, A, b, 0.4, 20, min=0.0)
    r_all = OP_EX(y0, A, moving_again(b, rest), 0.4, 20, min=0.0)
    assert int(r[1]) == int(r_all[1]) == 20
    # The nudged positions' changes are ~1e-30: far below the others'.
    assert float(r[3]) == float(r_all[3]) > 0
    assert float(r[4]) == float(r_all[4]) > 0


@pytest.mark.parametrize("shape", [(4, 50, 23, 23), (300, 20), (1000, 3)], ids=str)
def test_all_at_rest(device, shape):
    y0 = torch.zeros(shape, dtype=torch.float32, device=device)
    A = spd_problem(shape, torch.float32, device, seed=1)[1]
    b = torch.full(shape, -0.0, device=device)
    r = OP_EX(y0, A, b, 0.4, 20, min=0.0)
    assert bool((r[0] == 0).all())
    if device == "cpu":
        assert torch.equal(bits(r[0]), bits(torch.zeros_like(y0)))
    assert int(r[1]) == 20 and float(r[3]) == 0.0 and float(r[4]) == 0.0


@pytest.mark.parametrize(
    "case",
    ["infinite_A", "nan_A", "projection_off_zero", "negative_zero_y0"],
)
@pytest.mark.parametrize("shape", [(5, 50, 23, 23), (300, 20), (1000, 3)], ids=str)
def test_zero_that_does_not_stay_zero_is_iterated(device, case, shape):
    """Where +0 does not stay +0 the positions run the loop like the rest:
    a non-finite A turns them into NaN, a projection off zero moves
    them, and y0 = -0 keeps the sign the loop gives it."""
    y0, A, b, rest = rest_problem(shape, torch.float64, seed=11)
    kwargs = dict(min=0.0)
    if case == "infinite_A":
        A[0, 1] = A[1, 0] = float("inf")
    elif case == "nan_A":
        A[2, 2] = float("nan")
    elif case == "projection_off_zero":
        kwargs = dict(min=0.1, max=2.0)
    elif case == "negative_zero_y0":
        y0 = torch.where(rest, torch.tensor(-0.0, dtype=y0.dtype), y0)
        kwargs = dict()
    y0, A, b, rest = (t.to(device) for t in (y0, A, b, rest))
    y, _ = OP(y0, A, b, 0.4, 12, **kwargs)
    yr, _ = quadratic_descent_reference(y0, A, b, 0.4, 12, **kwargs)
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    if case in ("infinite_A", "nan_A"):
        assert bool(torch.isnan(y[rest]).all()), "0 * inf and NaN reach the positions at rest too"
    else:
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    if case == "projection_off_zero":
        assert bool((y[rest] >= 0.1).all())
    if case == "negative_zero_y0":
        # -0 is not at rest: the loop keeps it -0 (-0 - lr (+0 - b) = -0 - 0),
        # as the per-iteration loop does.
        assert bool((y[rest] == 0).all())
        if device == "cpu":
            assert torch.equal(torch.signbit(y[rest]), torch.signbit(yr[rest]))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("tol, trace", [(1e-5, False), (0.0, True), (1e-4, True)])
def test_stop_test_and_trace_as_without_rest(shape, dtype, tol, trace):
    """With a stop test or a trace the loop sweeps the moving positions
    alone: the same bits, iteration count and statistics as the batch with
    no position at rest."""
    y0, A, b, rest = rest_problem(shape, dtype, seed=shape[1] + 3)
    r = OP_EX(y0, A, b, 0.4, 300, tol, 1, None, min=0.0, trace=trace)
    r_all = OP_EX(iterated_anyway(y0, rest), A, b, 0.4, 300, tol, 1, None, min=0.0, trace=trace)
    assert torch.equal(bits(r[0][~rest]), bits(r_all[0][~rest]))
    assert torch.equal(bits(r[0][rest]), bits(torch.zeros_like(r[0][rest])))
    assert bool((r_all[0][rest] == 0).all())
    for got, want in zip(r[1:], r_all[1:]):
        assert torch.equal(bits(got), bits(want))
    if tol > 0:
        assert 1 < int(r[1]) < 300, "the loop must stop early to test the stop"


@pytest.mark.parametrize("shape", [(6, 50, 23, 23), (300, 20), (2, 13, 9, 11)], ids=str)
def test_stop_test_matches_per_iteration_loop(device, shape):
    y0, A, b, rest = rest_problem(shape, torch.float64, seed=17)
    y0, A, b = (t.to(device) for t in (y0, A, b))
    y, n = OP(y0, A, b, 0.5, 500, tol=1e-7, check_every=3, min=0.0)
    yr, nr = quadratic_descent_reference(y0, A, b, 0.5, 500, tol=1e-7, check_every=3, min=0.0)
    assert 1 < nr < 500 and int(n) == nr
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
