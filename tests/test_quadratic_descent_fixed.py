"""Positions that reach a fixed point of quadratic_descent's loop.

Without a stop test and with one rate for every iteration, an iteration that
leaves every channel of a position bit for bit unchanged leaves it unchanged
in every later one too (the same function of the same bits). The CPU kernel
writes such positions out as they are and gives their lane to the next
position. These tests check that this changes nothing: every result bit for
bit against the same loop run through a constant ``lrs`` schedule (which
iterates every position max_iterations times), against the float64 loop,
across thread counts, with the loop's statistics, and for the values that
are unchanged but not fixed (infinities, NaN).
"""

import pytest
import torch

from _util import bits, bits_at_thread_counts, spd_matrix
from torchiter.reference import quadratic_descent_reference

OP = torch.ops.torchiter.quadratic_descent
OP_EX = torch.ops.torchiter.quadratic_descent_ex

# Per-sample tiles (the conv notebook's layout), a partial last tile, (B, C)
# rows read straight into tiles, a wide layer, per-sample positions of an
# odd spatial size, and the working copy of a batch with few spatial
# positions.
SHAPES = [(6, 50, 23, 23), (7, 33, 37), (300, 20), (3, 70, 130), (2, 13, 9, 11), (50, 12, 5)]
PROJECTIONS = {
    "none": dict(),
    "relu": dict(min=0.0),
    "box": dict(min=-0.3, max=0.5),
    "soft_nonneg": dict(shrink=0.02, min=0.0),
    "box_off_zero": dict(min=0.1, max=1.0),
}


def settling_problem(shape, dtype, seed):
    """``(y0, A, b, lr)``: a contracting loop (lr near 1 / the largest
    eigenvalue of A) in which positions settle at very different speeds:
    b's scale varies over six orders of magnitude between positions, a
    fifth of the positions start at their own fixed point (y0 = +0, b = 0)
    and some start at y0 = -0 with b = 0 (a change of exactly 0 with a
    sign that does not stay)."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    A = spd_matrix(C, generator=g)
    lr = float(0.9 / torch.linalg.eigvalsh(A).max())
    pos_shape = (shape[0], 1) + tuple(shape[2:])
    scale = 10.0 ** (-6 * torch.rand(pos_shape, generator=g, dtype=torch.float64))
    b = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    y0 = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    rest = torch.rand(pos_shape, generator=g) < 0.2
    y0 = y0.masked_fill(rest, 0.0)
    b = b.masked_fill(rest, 0.0)
    negzero = torch.rand(pos_shape, generator=g) < 0.05
    y0 = torch.where(negzero, torch.tensor(-0.0, dtype=y0.dtype), y0)
    b = b.masked_fill(negzero, 0.0)
    return y0.to(dtype), A.to(dtype), b.to(dtype), lr


def constant_schedule(lr, K):
    return torch.full((K,), lr, dtype=torch.float64)


def settled_share(y0, A, b, lr, K, **proj):
    """Share of positions the K-th iteration leaves bit for bit unchanged."""
    y1, _ = OP(y0, A, b, lr, K - 1, **proj)
    y2, _ = OP(y0, A, b, lr, K, **proj)
    same = bits(y1) == bits(y2)
    per_position = same.view(y1.shape[0], y1.shape[1], -1, y1.element_size()).all(-1).all(1)
    return float(per_position.float().mean())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("proj", PROJECTIONS, ids=str)
def test_bitwise_as_every_iteration_run(shape, dtype, proj):
    y0, A, b, lr = settling_problem(shape, dtype, seed=shape[1] * 7 + len(shape))
    K = 120 if dtype == torch.float32 else 300
    kw = PROJECTIONS[proj]
    y, n = OP(y0, A, b, lr, K, **kw)
    y_all, n_all = OP(y0, A, b, 0.0, K, lrs=constant_schedule(lr, K), **kw)
    assert int(n) == int(n_all) == K
    assert torch.equal(bits(y), bits(y_all))
    # Positions other than those at rest settle too (a quarter to nearly
    # all of them, the fewest without a projection, whose last bits can
    # keep changing), so the comparison covers lanes that stopped early.
    at_rest = float(((bits(y0) == 0).view(*y0.shape, -1).all(-1) & (b == 0)).all(1).float().mean())
    assert settled_share(y0, A, b, lr, K, **kw) > at_rest + 0.02


@pytest.mark.parametrize("shape", [(6, 50, 23, 23), (300, 20), (50, 12, 5)], ids=str)
@pytest.mark.parametrize("proj", ["none", "relu", "box_off_zero"])
def test_matches_per_iteration_loop_float64(device, shape, proj):
    y0, A, b, lr = settling_problem(shape, torch.float64, seed=11)
    y0, A, b = (t.to(device) for t in (y0, A, b))
    y, n = OP(y0, A, b, lr, 200, **PROJECTIONS[proj])
    yr, _ = quadratic_descent_reference(y0, A, b, lr, 200, **PROJECTIONS[proj])
    assert int(n) == 200
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("K", [1, 2, 3, 17])
@pytest.mark.parametrize("shape", [(4, 50, 23, 23), (300, 20)], ids=str)
def test_few_iterations(shape, K):
    y0, A, b, lr = settling_problem(shape, torch.float32, seed=K)
    y, _ = OP(y0, A, b, lr, K, min=0.0)
    y_all, _ = OP(y0, A, b, 0.0, K, lrs=constant_schedule(lr, K), min=0.0)
    assert torch.equal(bits(y), bits(y_all))


def test_fixed_from_the_first_iteration():
    # A = I and lr = 1: y1 = project(b), and every later iteration leaves it.
    g = torch.Generator().manual_seed(3)
    b = torch.randn(5, 24, 31, 29, generator=g)
    A = torch.eye(24) + 0.0 * torch.randn(24, 24, generator=g)
    A[0, 1] = A[1, 0] = 1e-30  # not diagonal: the dense loop
    y, n = OP(torch.zeros_like(b), A, b, 1.0, 5000, min=0.0)
    y_all, _ = OP(torch.zeros_like(b), A, b, 0.0, 5000, lrs=constant_schedule(1.0, 5000), min=0.0)
    assert int(n) == 5000
    assert torch.equal(bits(y), bits(y_all))
    torch.testing.assert_close(y, b.clamp(min=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(24, 50, 23, 23), (2000, 40)], ids=str)
def test_thread_counts_give_the_same_bits(dtype, shape):
    y0, A, b, lr = settling_problem(shape, dtype, seed=5)
    results = bits_at_thread_counts(lambda: OP(y0, A, b, lr, 80, min=0.0)[0])
    assert all(torch.equal(results[0], r) for r in results[1:])
    y_all, _ = OP(y0, A, b, 0.0, 80, lrs=constant_schedule(lr, 80), min=0.0)
    assert torch.equal(results[0], bits(y_all))


# K = 12: too few iterations for positions to settle, so after its sample
# the batch goes to the tiles that run every iteration (both drivers then
# contribute to the statistics); K = 150: most settle.
@pytest.mark.parametrize("K", [12, 150])
@pytest.mark.parametrize("shape", [(40, 50, 23, 23), (6, 50, 23, 23), (3000, 20), (50, 12, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_statistics_as_every_iteration_run(shape, dtype, K):
    y0, A, b, lr = settling_problem(shape, dtype, seed=8)
    r = OP_EX(y0, A, b, lr, K, min=0.0)
    r_all = OP_EX(y0, A, b, 0.0, K, lrs=constant_schedule(lr, K), min=0.0)
    assert torch.equal(bits(r[0]), bits(r_all[0]))
    for i in range(1, 5):
        assert torch.equal(bits(r[i]), bits(r_all[i])), f"output {i}"
    assert float(r[3]) > 0, "the first change is measured"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("shape", [(4, 50, 23, 23), (300, 20)], ids=str)
def test_non_finite_positions_are_not_fixed(shape, value):
    # A position holding an infinity or a NaN keeps its bits from one
    # iteration to the next, but its change is NaN: the last change of the
    # loop must say so, as the loop that runs every iteration does.
    y0, A, b, lr = settling_problem(shape, torch.float32, seed=9)
    b = b.clone()
    b.view(shape[0], shape[1], -1)[1, 3, 0] = value
    K = 100
    r = OP_EX(y0, A, b, lr, K)
    r_all = OP_EX(y0, A, b, 0.0, K, lrs=constant_schedule(lr, K))
    assert torch.equal(bits(r[0]), bits(r_all[0]))
    assert torch.isnan(r[4]) and torch.isnan(r_all[4])


@pytest.mark.parametrize("precision", ["highest", "medium"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reduced_precision_mixing(dtype, precision):
    # The bfloat16 products are a different function of y, with fixed points
    # of their own: the same comparison holds.
    y0, A, b, lr = settling_problem((5, 64, 21, 23), torch.float32, seed=12)
    A = A.to(torch.bfloat16).float()
    y0, A, b = (t.to(dtype) for t in (y0, A, b))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        y, _ = OP(y0, A, b, lr, 100, min=0.0)
        y_all, _ = OP(y0, A, b, 0.0, 100, lrs=constant_schedule(lr, 100), min=0.0)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(bits(y), bits(y_all))


def test_non_contiguous_inputs():
    y0, A, b, lr = settling_problem((6, 40, 21, 25), torch.float32, seed=13)
    y0t, bt = y0.transpose(2, 3), b.transpose(2, 3)
    At = A.t()
    y, _ = OP(y0t, At, bt, lr, 90, min=0.0)
    y_all, _ = OP(y0t.contiguous(), At.contiguous(), bt.contiguous(), 0.0, 90,
                  lrs=constant_schedule(lr, 90), min=0.0)
    assert torch.equal(bits(y), bits(y_all))


@pytest.mark.parametrize("shape", [(40, 50, 23, 23), (3000, 20)], ids=str)
def test_batch_whose_sample_does_not_settle(shape):
    # The first sixteenth of the batch is slow to settle (b large), the rest
    # fast: the sample sends the rest to the tiles that run every iteration,
    # which must give the same bits as well.
    y0, A, b, lr = settling_problem(shape, torch.float32, seed=21)
    b = b.clone()
    y0 = y0.clone()
    head = max(1, shape[0] // 8)
    b[:head] = torch.randn_like(b[:head])
    y0[:head] = 0
    for K in (30, 90):
        r = OP_EX(y0, A, b, lr, K, min=0.0)
        r_all = OP_EX(y0, A, b, 0.0, K, lrs=constant_schedule(lr, K), min=0.0)
        for i in range(5):
            assert torch.equal(bits(r[i]), bits(r_all[i])), f"output {i}, K = {K}"
