"""A loop that starts from y0 = +0, as every model's forward does.

The CPU kernel takes the first iteration of a position whose y is +0 in every
channel without the channel mixing: with every A_ij finite, A·(+0) is a zero
whose sign does not reach the result. A loop with a trace runs its sweeps
with the mixing in every iteration, so it is the bitwise reference here (the
shapes stay below the plain x86-64 build's GEMM threshold, where the sweeps
would sum in another order); the loops from -0 (which also mix) must give the
same values. Both drivers that take the shortcut are checked: the lanes of the
one-rate loop and the tiles of a constant ``lrs`` schedule. Infinite entries
of A, where the mixing gives NaN, must turn the shortcut off.
"""

import pytest
import torch

import torchiter
from _util import bits, run_python, spd_matrix
from test_quadratic_descent_fixed import PROJECTIONS
from torchiter.reference import quadratic_descent_reference

OP = torch.ops.torchiter.quadratic_descent
OP_EX = torch.ops.torchiter.quadratic_descent_ex

# Per-sample tiles (the conv notebook's layout), a partial last tile, (B, C)
# rows read into tiles, a wide layer, and few spatial positions (working copy).
SHAPES = [(5, 50, 23, 23), (3, 33, 37), (300, 20), (2, 70, 130), (50, 12, 5)]


def problem(shape, dtype, seed):
    """``(A, b, lr)``: b with zeros of both signs, a fifth of the positions
    zero in every channel (at rest: a bias-free encoder's background, which
    sends the moving positions through the packed tiles), and a few large
    entries."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    A = spd_matrix(C, generator=g)
    lr = float(0.9 / torch.linalg.eigvalsh(A).max())
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    b = b.masked_fill(torch.rand(shape, generator=g) < 0.2, 0.0)
    b = b.masked_fill(torch.rand(shape, generator=g) < 0.05, -0.0)
    b.view(-1)[:: max(1, b.numel() // 3)] *= 1e3
    pos_shape = (shape[0], 1) + tuple(shape[2:])
    b = b.masked_fill(torch.rand(pos_shape, generator=g) < 0.2, 0.0)
    return A.to(dtype), b.to(dtype), lr


def both_drivers(y0, A, b, lr, K, op=OP_EX, **kw):
    """The one-rate op and the same loop through a constant schedule."""
    lrs = torch.full((K,), lr, dtype=torch.float64)
    return op(y0, A, b, lr, K, **kw), op(y0, A, b, 0.0, K, lrs=lrs, **kw)


@pytest.mark.parametrize("K", [1, 2, 40])
@pytest.mark.parametrize("proj", PROJECTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_as_the_mixing_loop(shape, dtype, proj, K):
    A, b, lr = problem(shape, dtype, seed=shape[1] + K)
    kw = PROJECTIONS[proj]
    y0 = torch.zeros_like(b)
    # y, iterations, converged, change (with one iteration: the shortcut's
    # own measure) and growth, bit for bit as the mixing sweeps give them.
    mixing = OP_EX(y0, A, b, lr, K, trace=True, **kw)
    for r in both_drivers(y0, A, b, lr, K, **kw):
        for i in range(5):
            assert torch.equal(bits(r[i]), bits(mixing[i])), f"output {i}"
        assert float(r[3]) > 0, "the change is measured"
    # From -0 (not taken as +0): the same values.
    for ref in both_drivers(torch.full_like(b, -0.0), A, b, lr, K, **kw):
        for i in range(5):
            assert torch.equal(mixing[i], ref[i]), f"output {i}"
    if K == 1:
        # One iteration from +0 is the projection of lr·b.
        expected = quadratic_descent_reference(y0, A, b, lr, 1, **kw)[0]
        assert torch.equal(mixing[0], expected)


@pytest.mark.parametrize("shape", [(5, 50, 23, 23), (300, 20)], ids=str)
@pytest.mark.parametrize("proj", ["none", "relu", "box_off_zero"])
def test_matches_per_iteration_loop_float64(shape, proj):
    A, b, lr = problem(shape, torch.float64, seed=3)
    y0 = torch.zeros_like(b)
    y, _ = OP(y0, A, b, 0.0, 60, lrs=torch.full((60,), lr, dtype=torch.float64), **PROJECTIONS[proj])
    yr, _ = quadratic_descent_reference(y0, A, b, lr, 60, **PROJECTIONS[proj])
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("shape", [(4, 50, 23, 23), (300, 20)], ids=str)
def test_non_finite_A_mixes_zero_to_nan(shape, value):
    # inf · 0 is NaN: the first iteration from +0 must mix, as the lanes do.
    A, b, lr = problem(shape, torch.float32, seed=4)
    A = A.clone()
    A[2, 7] = value
    for K in (1, 2, 3):
        refs = both_drivers(torch.full_like(b, -0.0), A, b, lr, K)
        for r, ref in zip(both_drivers(torch.zeros_like(b), A, b, lr, K), refs):
            assert torch.isnan(r[0][:, 2]).all()
            assert torch.equal(r[0].isnan(), ref[0].isnan())
            assert torch.equal(r[0].nan_to_num(), ref[0].nan_to_num())
            assert torch.isnan(r[3])


_PAST_RANGE = """
import sys, torch
import torchiter
from test_quadratic_descent_zero_start import both_drivers, problem
shape = tuple(int(d) for d in sys.argv[1].split(","))
A, b, lr = problem(shape, torch.float32, seed=5)
A = A.to(torch.bfloat16).float()
A[1, 5] = 3.4e38
torch.set_float32_matmul_precision("medium")
for K in (1, 2):
    results = both_drivers(torch.zeros_like(b), A, b, lr, K, min=0.0)
    refs = both_drivers(torch.full_like(b, -0.0), A, b, lr, K, min=0.0)
    for r, ref in zip(results, refs):
        assert bool(r[0][:, 1].isnan().all()), "inf * 0 in channel 1"
        assert torch.equal(r[0].isnan(), ref[0].isnan())
        assert torch.equal(r[0].nan_to_num(), ref[0].nan_to_num())
print(torchiter.cpu_bfloat16_units())
"""


@pytest.mark.parametrize("amx", ["auto", "emulate"])
@pytest.mark.parametrize("shape", [(4, 64, 21, 23), (300, 64)], ids=str)
def test_bfloat16_mixing_of_a_past_its_range(shape, amx):
    # 3.4e38 is finite in float32 and rounds to infinity in bfloat16: where
    # the mixing runs on bfloat16 products (AVX512-BF16, AMX tiles or their
    # emulation), from +0 it gives NaN there too, as from -0.
    if torchiter.cpu_bfloat16_units() == "none":
        pytest.skip("this CPU has no bfloat16 dot products: the mixing stays in float32")
    proc = run_python(_PAST_RANGE, args=(",".join(map(str, shape)),), timeout=300, TORCHITER_AMX=amx)
    assert proc.returncode == 0, proc.stderr
    units = proc.stdout.split()[-1]
    assert units in (("amx-emulated",) if amx == "emulate" else ("amx", "avx512_bf16"))


@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_reduced_precision_mixing(precision):
    A, b, lr = problem((5, 64, 21, 23), torch.float32, seed=6)
    A = A.to(torch.bfloat16).float()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        r, r_all = both_drivers(torch.zeros_like(b), A, b, lr, 30, min=0.0)
        ref = OP_EX(torch.full_like(b, -0.0), A, b, lr, 30, min=0.0)
    finally:
        torch.set_float32_matmul_precision(before)
    for i in range(5):
        assert torch.equal(bits(r[i]), bits(r_all[i])), f"output {i}"
        assert torch.equal(r[i], ref[i]), f"output {i}"
