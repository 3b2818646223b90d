"""quadratic_descent_ex with per_sample on a batch without spatial dims.

On the CPU such a batch with a constant rate and no trace runs without
sweeps: each thread steps a tile of running samples and a stopped sample's
lane takes the next sample at once. A schedule of rates (or a trace) takes
the sweeps instead, so the same loop with ``lrs`` set to the constant rate
must give the same bits: results, iteration counts, flags and changes.
"""

import pytest
import torch

from _util import bits
from torchiter.reference import quadratic_descent_reference

OP_EX = torch.ops.torchiter.quadratic_descent_ex


def mixed_problem(B, C, dtype, seed):
    """Samples of mixed difficulty: scales over three decades, a few
    already at their fixed point (b = 0) and, from 8 samples on, one that
    diverges (b infinite)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(C, C, generator=g, dtype=torch.float64)
    A = M @ M.T / C + 0.5 * torch.eye(C, dtype=torch.float64)
    scale = 10.0 ** (3 * torch.rand(B, 1, generator=g, dtype=torch.float64) - 2)
    b = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    b[::7] = 0.0
    if B >= 8:
        b[5, 0] = float("inf")
    y0 = torch.randn(B, C, generator=g, dtype=torch.float64) * 0.1
    y0[::7] = 0.0
    return y0.to(dtype), A.to(dtype), b.to(dtype)


CASES = [
    # (B, C, tol, check_every, max_iterations, projection)
    (1000, 10, 1e-4, 1, 200, dict(min=0.0)),
    (37, 3, 1e-3, 3, 100, dict(shrink=0.01)),
    (1, 5, 1e-5, 1, 50, dict()),
    (513, 17, 1e-2, 2, 7, dict(min=-0.2, max=0.3)),
    (3000, 2, 1e-6, 5, 300, dict(min=0.0)),
    (300, 40, 1e-4, 1, 1, dict(min=0.0)),
    (200, 33, 0.0, 1, 20, dict(min=0.0)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_bits_as_the_sweeps(case, dtype, threads):
    B, C, tol, every, K, proj = case
    y0, A, b = mixed_problem(B, C, dtype, seed=B + C)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.get_num_threads() == threads
        r = OP_EX(y0, A, b, 0.4, K, tol, every, None, per_sample=True, **proj)
        schedule = torch.full((K,), 0.4, dtype=torch.float64)
        r_sweeps = OP_EX(y0, A, b, 0.4, K, tol, every, schedule, per_sample=True, **proj)
        r_trace = OP_EX(y0, A, b, 0.4, K, tol, every, None, per_sample=True, trace=True, **proj)
    finally:
        torch.set_num_threads(before)
    for other in (r_sweeps, r_trace):
        for got, want in zip(r[:5], other[:5]):
            assert torch.equal(bits(got), bits(want))
    if tol > 0 and K > 10 and B >= 8:
        # The batch mixes samples that stop early and late, and one that
        # never stops (NaN): the comparison covers every way out.
        its = r[1]
        assert int(its.min()) < int(its.max())
        assert bool((~r[2]).any()) and bool(r[2].any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_each_sample_as_alone(dtype):
    """Every sample gets the result, count and changes of the loop run on it
    alone (the per-iteration loop in float64 for the values)."""
    y0, A, b = mixed_problem(60, 6, dtype, seed=4)
    r = OP_EX(y0, A, b, 0.4, 150, 1e-4, 1, None, per_sample=True, min=0.0)
    for i in range(60):
        one = OP_EX(y0[i : i + 1], A, b[i : i + 1], 0.4, 150, 1e-4, 1, None, per_sample=True, min=0.0)
        for got, want in zip(r[:5], one[:5]):
            assert torch.equal(bits(got[i : i + 1] if got.dim() else got), bits(want))
        if dtype == torch.float64 and torch.isfinite(b[i]).all():
            yr, nr = quadratic_descent_reference(y0[i : i + 1], A, b[i : i + 1], 0.4, 150, tol=1e-4, min=0.0)
            assert int(r[1][i]) == nr
            torch.testing.assert_close(r[0][i : i + 1], yr, rtol=1e-12, atol=1e-12)


def test_diverged_sample_runs_every_iteration():
    y0, A, b = mixed_problem(40, 4, torch.float32, seed=9)
    r = OP_EX(y0, A, b, 0.4, 60, 1e-4, 1, None, per_sample=True, min=0.0)
    assert int(r[1][5]) == 60 and not bool(r[2][5])
    assert bool(torch.isnan(r[0][5]).any()) and bool(torch.isnan(r[3][5]))
