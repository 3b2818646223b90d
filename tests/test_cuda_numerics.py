"""Numerics of the CUDA kernels where their paths change: float64's split kernel
(33 <= C <= 64) against the CPU kernel, per-sample stopping on cuBLAS's path
(C > 64) against each sample run alone, and TF32 against float64.

Every test skips when ``torch.cuda.is_available()`` is false. With
``TORCHITER_CUDA_TESTS_ON=cpu`` they run on the CPU kernels instead (a check of
the tests themselves, as in test_cuda.py; the comparisons are then between
CPU runs).
"""

import os

import pytest
import torch

from _util import bits, cpu_has_vector_fma
from torchiter.reference import quadratic_descent_reference

_ON = os.environ.get("TORCHITER_CUDA_TESTS_ON", "cuda")
DEV = torch.device("cuda" if _ON == "cuda" else _ON)
HAS_DEVICE = torch.cuda.is_available() if DEV.type == "cuda" else True

pytestmark = pytest.mark.skipif(not HAS_DEVICE, reason="CUDA is not available")

QD = torch.ops.torchiter.quadratic_descent
QD_EX = torch.ops.torchiter.quadratic_descent_ex
BACKWARD = torch.ops.torchiter.quadratic_descent_backward
FIELDS = ("y", "iterations", "converged", "change", "growth", "change_trace")

PROJECTIONS = [
    dict(shrink=0.0, min=None, max=None),
    dict(shrink=0.0, min=0.0, max=None),
    dict(shrink=0.0, min=-0.2, max=0.3),
    dict(shrink=0.01, min=None, max=None),
    dict(shrink=0.02, min=0.0, max=None),
]


def problem(B, C, spatial=(), dtype=torch.float64, seed=0):
    """A symmetric positive definite A with ||A|| = 1; b scaled per sample, so
    that samples converge at different speeds."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(C, C, generator=g, dtype=torch.float64)
    A = M @ M.T / C + 0.5 * torch.eye(C, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, ord=2)
    b = torch.randn((B, C, *spatial), generator=g, dtype=torch.float64)
    b = b * (torch.rand((B,) + (1,) * (b.dim() - 1), generator=g, dtype=torch.float64) * 3 + 0.1)
    y0 = torch.randn((B, C, *spatial), generator=g, dtype=torch.float64) * 0.1
    return y0.to(dtype), A.to(dtype), b.to(dtype)


def _assert_same(got, want, msg):
    """Equal bits where the CPU kernel uses vector FMAs (the order the CUDA
    kernels follow), else equal to float64 rounding."""
    assert got.shape == want.shape and got.dtype == want.dtype, msg
    got, want = got.cpu().reshape(-1), want.reshape(-1)
    if not got.is_floating_point():
        assert torch.equal(got, want), msg
    elif cpu_has_vector_fma():
        assert torch.equal(bits(got), bits(want)), msg
    else:
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13, equal_nan=True, msg=msg)


# --------------------------------------------------------------------------- #
# float64 at 33 <= C <= 64: the split kernel
# --------------------------------------------------------------------------- #

# C at the bucket's ends and middle; positions: fewer than one warp's 8, a
# partial last warp, several blocks of 32, spatial dims.
SPLIT_SHAPES = [(1, 33, ()), (5, 33, (7,)), (3, 49, (5, 3)), (601, 49, ()), (37, 64, ()), (2, 64, (1,)),
                (4, 40, (9, 9))]


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
@pytest.mark.parametrize("proj", PROJECTIONS, ids=str)
def test_float64_split_kernel_equals_cpu_kernel(shape, proj):
    B, C, spatial = shape
    y0, A, b = problem(B, C, spatial, seed=C)
    want, n_want = QD(y0, A, b, 0.8, 25, 0.0, 1, None, proj["shrink"], proj["min"], proj["max"])
    got, n_got = QD(y0.to(DEV), A.to(DEV), b.to(DEV), 0.8, 25, 0.0, 1, None, proj["shrink"], proj["min"], proj["max"])
    assert int(n_got) == int(n_want) == 25
    _assert_same(got, want, f"{shape} {proj}")
    # Against the float64 per-iteration loop too: a wrong sum is not a rounding.
    ref, _ = quadratic_descent_reference(y0, A, b, 0.8, 25, 0.0, 1, None, proj["shrink"], proj["min"], proj["max"])
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("C", [33, 49, 64])
@pytest.mark.parametrize("lrs_on", ["cpu", DEV.type])
def test_float64_split_kernel_scheduled_rates_and_strides(C, lrs_on):
    y0, A, b = problem(6, C, (4, 5), seed=C + 1)
    lrs = 0.9 * 0.95 ** torch.arange(30, dtype=torch.float64)
    want, _ = QD(y0, A, b, 123.0, 30, 0.0, 1, lrs, 0.0, 0.0, None)
    # Permuted spatial strides, a channels-last b and a transposed A: the
    # kernel reads through the strides.
    yd = y0.to(DEV).transpose(2, 3).contiguous().transpose(2, 3)
    bd = b.to(DEV).contiguous(memory_format=torch.channels_last)
    Ad = A.to(DEV).t().contiguous().t()
    got, _ = QD(yd, Ad, bd, 123.0, 30, 0.0, 1, lrs.to(lrs_on), 0.0, 0.0, None)
    _assert_same(got, want, f"C={C}, lrs on {lrs_on}")


@pytest.mark.parametrize("C", [33, 49, 64])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
@pytest.mark.parametrize("trace", [False, True], ids=["no_trace", "trace"])
def test_float64_split_kernel_statistics_equal_cpu(C, per_sample, trace):
    # The ex driver's measured iterations are single launches of the split kernel.
    y0, A, b = problem(9, C, (3,), seed=C + 2)
    args = (0.8, 400, 1e-7, 2, None, 0.0, 0.0, None, per_sample, trace)
    want = QD_EX(y0, A, b, *args)
    got = QD_EX(y0.to(DEV), A.to(DEV), b.to(DEV), *args)
    assert bool(want[2].all()), "the loop must stop early to test the stop"
    for x, z, name in zip(want, got, FIELDS):
        _assert_same(z.nan_to_num(7.0), x.nan_to_num(7.0), name)


# --------------------------------------------------------------------------- #
# Per-sample stopping against each sample alone
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("C", [33, 64, 65, 127])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("proj", [PROJECTIONS[0], PROJECTIONS[4]], ids=str)
def test_per_sample_equals_each_sample_alone(C, dtype, proj):
    # Up to C = 64 positions never interact: bit for bit. From 65 on, cuBLAS
    # multiplies a batch that narrows as samples stop, and may block a
    # narrower product differently: equal to rounding (docs/ops.md).
    B = 10
    y0, A, b = problem(B, C, (3,), dtype, seed=C + 3)
    tol = 1e-3 if dtype == torch.float32 else 1e-6
    yd, Ad, bd = y0.to(DEV), A.to(DEV), b.to(DEV)
    r = QD_EX(yd, Ad, bd, 0.8, 400, tol, 2, None, proj["shrink"], proj["min"], proj["max"], True, False)
    counts = r[1].tolist()
    assert all(r[2].tolist()) and len(set(counts)) > 1, "samples must stop, at different iterations"
    for i in range(B):
        a = QD_EX(yd[i : i + 1], Ad, bd[i : i + 1], 0.8, 400, tol, 2, None, proj["shrink"], proj["min"],
                  proj["max"], False, False)
        assert int(a[1]) == counts[i] and bool(a[2]) == bool(r[2][i]), i
        if C <= 64:
            assert torch.equal(bits(a[0][0]), bits(r[0][i])), i
            for x, z in ((a[3], r[3][i]), (a[4], r[4][i])):  # change, growth
                assert torch.equal(bits(x.reshape(1)), bits(z.reshape(1))), i
        else:
            # Rounding carried through the iterations: relative to the dtype's
            # eps and, near zero, to the sample's scale (the changes too: they
            # are differences of such values).
            eps = torch.finfo(dtype).eps
            rounding = dict(rtol=1e3 * eps, atol=1e3 * eps * float(a[0].abs().max()))
            torch.testing.assert_close(r[0][i], a[0][0], **rounding, msg=lambda m: f"sample {i}: {m}")
            torch.testing.assert_close(r[3][i], a[3], **rounding, msg=lambda m: f"sample {i} change: {m}")


# --------------------------------------------------------------------------- #
# TF32
# --------------------------------------------------------------------------- #


def _tf32_on(how):
    """Allows TF32 matmuls the way `how` says; returns a function that restores the settings."""
    old_flag = torch.backends.cuda.matmul.allow_tf32
    old_precision = torch.get_float32_matmul_precision()
    if how == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_float32_matmul_precision("high")

    def restore():
        torch.set_float32_matmul_precision(old_precision)
        torch.backends.cuda.matmul.allow_tf32 = old_flag

    return restore


# TF32 keeps 10 of float32's 23 mantissa bits (unit roundoff 2^-11): a product
# over C channels, carried through iterations or a solve, is good to ~1e-2 of
# the result's scale.
TF32_RTOL = 1e-2


def _assert_tf32_close(got, want):
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double().cpu(), want, rtol=TF32_RTOL, atol=TF32_RTOL * scale)


@pytest.mark.parametrize("how", ["allow_tf32", "matmul_precision_high"])
@pytest.mark.parametrize("C", [65, 130])
def test_tf32_forward_against_float64(how, C):
    y0, A, b = problem(6, C, (5,), seed=C + 4)
    restore = _tf32_on(how)
    try:
        for tol in (0.0, 1e-4):
            y, n = QD(y0.float().to(DEV), A.float().to(DEV), b.float().to(DEV), 0.7, 40, tol, 1, None, 0.0, 0.0, None)
            ref, rn = quadratic_descent_reference(y0, A, b, 0.7, 40, tol, 1, None, 0.0, 0.0, None)
            if tol == 0:
                assert int(n) == rn == 40
            _assert_tf32_close(y, ref)
    finally:
        restore()


@pytest.mark.parametrize("how", ["allow_tf32", "matmul_precision_high"])
@pytest.mark.parametrize("C", [20, 65, 130])
@pytest.mark.parametrize("shrink,lo", [(0.0, None), (0.0, 0.0), (0.05, None)], ids=str)
def test_tf32_backward_against_float64(how, C, shrink, lo):
    # The same y in both dtypes: held entries (zeros, exactly) agree, so the
    # systems are the same and only the arithmetic differs.
    g = torch.Generator().manual_seed(C + 5)
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    A = (q * (torch.rand(C, generator=g, dtype=torch.float64) + 0.5)) @ q.T
    y = torch.randn(40, C, generator=g, dtype=torch.float64).float().double()
    if shrink > 0 or lo is not None:
        y[y < 0.2] = 0.0
    grad_y = torch.randn(40, C, generator=g, dtype=torch.float64).float().double()
    A = A.float().double()
    want = BACKWARD(grad_y, y, A, shrink, lo, None)
    restore = _tf32_on(how)
    try:
        got = BACKWARD(grad_y.float().to(DEV), y.float().to(DEV), A.float().to(DEV), shrink, lo, None)
    finally:
        restore()
    for z, x in zip(got, want):
        _assert_tf32_close(z, x)
