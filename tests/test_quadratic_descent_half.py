"""quadratic_descent and quadratic_descent_ex on float16 and bfloat16: the float32 loop, rounded once.

The contract (docs/ops.md): y0, A and b are widened to float32, the whole loop
runs there, and y is rounded to the dtype at the end. So the result must equal
the float32 op on the widened inputs, rounded, bit for bit; and it must lie
within the dtype's rounding of a float64 reference on the same (rounded)
inputs. The exception, tested at the end: from 32 channels on, where the CPU
has bfloat16 dot products, a bfloat16 loop's products take y rounded to
bfloat16 (and so does a float32 loop under PyTorch's "medium" float32 matmul
precision). These tests run under every CPU kernel variant
(test_cpu_variants.py).
"""

import pytest
import torch

import torchiter

from _util import bits, spd_problem
from torchiter.reference import quadratic_descent_reference

OP = torch.ops.torchiter.quadratic_descent
EX = torch.ops.torchiter.quadratic_descent_ex
HALF = [torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Odd channel counts and positions past every vector width, a spatial case.
SHAPES = [(7, 3), (33, 5), (2, 17, 5), (3, 8, 4, 5), (129, 16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("proj", [{}, dict(min=0.0), dict(shrink=0.05, min=-0.5, max=0.5)], ids=["none", "relu", "box"])
def test_is_the_float32_loop_rounded_once(device, dtype, shape, proj):
    y0, A, b = spd_problem(shape, dtype, device, seed=sum(shape))
    y, n = OP(y0, A, b, 0.4, 23, **proj)
    y32, n32 = OP(y0.float(), A.float(), b.float(), 0.4, 23, **proj)
    assert y.dtype == dtype and y.shape == y0.shape and y.is_contiguous()
    assert int(n) == int(n32) == 23
    assert torch.equal(bits(y), bits(y32.to(dtype)))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_within_the_dtypes_rounding_of_a_float64_reference(dtype, shape):
    y0, A, b = spd_problem(shape, dtype, "cpu", seed=3 + len(shape))
    y, n = OP(y0, A, b, 0.5, 60, min=0.0)
    ref, _ = quadratic_descent_reference(y0.double(), A.double(), b.double(), 0.5, 60, min=0.0)
    # Half an ulp of the dtype from rounding once, plus float32's own error
    # over 60 iterations (far below it).
    eps = torch.finfo(dtype).eps
    err = (y.double() - ref).abs()
    assert not torch.isnan(y).any()
    assert (err <= eps * ref.abs() + 1e-5 * ref.abs().max()).all(), err.max()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_stop_test_and_iteration_count_are_the_float32_loops(dtype):
    y0, A, b = spd_problem((40, 6), dtype, "cpu", seed=7)
    for tol, check_every in [(1e-3, 1), (1e-2, 3)]:
        y, n = OP(y0, A, b, 0.5, 500, tol=tol, check_every=check_every)
        y32, n32 = OP(y0.float(), A.float(), b.float(), 0.5, 500, tol=tol, check_every=check_every)
        assert 1 < int(n) == int(n32) < 500
        assert torch.equal(bits(y), bits(y32.to(dtype)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
def test_ex_statistics_are_the_float32_loops_rounded(device, dtype, per_sample):
    y0, A, b = spd_problem((21, 5, 3), dtype, device, seed=11)
    kw = dict(tol=1e-3, check_every=2, per_sample=per_sample, trace=True)
    r = EX(y0, A, b, 0.5, 80, **kw)
    r32 = EX(y0.float(), A.float(), b.float(), 0.5, 80, **kw)
    y, iterations, converged, change, growth, trace = r
    assert y.dtype == change.dtype == growth.dtype == trace.dtype == dtype
    assert iterations.dtype == torch.long and converged.dtype == torch.bool
    assert torch.equal(iterations, r32[1]) and torch.equal(converged, r32[2])
    for got, want in [(y, r32[0]), (change, r32[3]), (growth, r32[4]), (trace, r32[5])]:
        assert torch.equal(bits(got), bits(want.to(dtype)))
    # Batch mode's y is quadratic_descent's.
    if not per_sample:
        y_plain, n_plain = OP(y0, A, b, 0.5, 80, tol=1e-3, check_every=2)
        assert torch.equal(bits(y), bits(y_plain)) and int(n_plain) == int(iterations)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_non_contiguous_inputs_and_inputs_untouched(dtype):
    y0, A, b = spd_problem((6, 9, 10), dtype, "cpu", seed=5)
    y0v, bv = y0.transpose(0, 2), b.transpose(0, 2)  # (10, 9, 6) views
    Av = A.t()
    keep = [t.clone() for t in (y0v, Av, bv)]
    y, _ = OP(y0v, Av, bv, 0.3, 17, min=0.0)
    y32, _ = OP(y0v.float(), Av.float(), bv.float(), 0.3, 17, min=0.0)
    assert torch.equal(bits(y), bits(y32.to(dtype)))
    for t, k in zip((y0v, Av, bv), keep):
        assert torch.equal(bits(t), bits(k))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_nan_stays_nan(dtype):
    y0, A, b = spd_problem((9, 4), dtype, "cpu", seed=2)
    b[3, 1] = float("nan")
    y, n = OP(y0, A, b, 0.3, 12, tol=1e-6)
    assert int(n) == 12 and torch.isnan(y[3]).all()
    assert not torch.isnan(y[torch.arange(9) != 3]).any()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("proj", [{}, dict(min=0.0)], ids=["none", "relu"])
def test_gradient_is_the_float32_gradient_rounded(dtype, proj):
    y0, A, b = spd_problem((13, 4, 3), dtype, "cpu", seed=9)
    A.requires_grad_()
    b.requires_grad_()
    y, _ = OP(y0, A, b, 0.5, 200, **proj)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    gA, gb = torch.autograd.grad(y, (A, b), g)
    A32, b32 = A.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    y32, _ = OP(y0.float(), A32, b32, 0.5, 200, **proj)
    gA32, gb32 = torch.autograd.grad(y32, (A32, b32), g.float())
    assert gA.dtype == gb.dtype == dtype
    # The backward reads the forward's y, which was rounded to the dtype: a
    # projection's active set can differ only where y rounds to a bound.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(gb.float(), gb32, rtol=4 * eps, atol=4 * eps * gb32.abs().max().item())
    torch.testing.assert_close(gA.float(), gA32, rtol=16 * eps, atol=16 * eps * gA32.abs().max().item())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_meta_gives_the_dtype(dtype):
    y0, A, b = (t.to("meta") for t in spd_problem((5, 3), dtype, "cpu", seed=0))
    y, n = OP(y0, A, b, 0.1, 5)
    assert y.device.type == "meta" and y.dtype == dtype and y.shape == (5, 3)
    r = EX(y0, A, b, 0.1, 5, tol=1e-3, per_sample=True)
    assert r[0].dtype == r[3].dtype == r[4].dtype == dtype and r[3].shape == (5,)


# ---- Mixing on bfloat16 dot products ------------------------------------------
# From 32 channels on, the AVX-512 kernels of a CPU with AVX512-BF16 mix a
# bfloat16 loop's channels on bfloat16 dot products (docs/ops.md): y is rounded
# to bfloat16 for the product only, accumulation and state stay float32.
# Elsewhere the loop is the float32 loop rounded once, as above.
BF16_SHAPES = [(65, 33), (5, 64, 7), (40, 130), (3, 50, 4, 5)]


def _bf16_units():
    """Whether this process's kernels mix on bfloat16 dot products."""
    return torchiter.cpu_bfloat16_units() != "none"


def _bf16_product_loop(y0, A, b, lr, K, min_=0.0):
    """The loop in float64 with each product's inputs rounded to bfloat16."""
    A16 = A.bfloat16().double()
    y, bd = y0.double(), b.double()
    for _ in range(K):
        grad = torch.einsum("ij,bj...->bi...", A16, y.bfloat16().double()) - bd
        y = (y - lr * grad).clamp(min=min_)
    return y


@pytest.mark.parametrize("shape", BF16_SHAPES, ids=str)
def test_bfloat16_from_32_channels(shape):
    y0, A, b = spd_problem(shape, torch.bfloat16, "cpu", seed=len(shape) + shape[1])
    y, n = OP(y0, A, b, 0.5, 40, min=0.0)
    assert y.dtype == torch.bfloat16 and int(n) == 40 and not torch.isnan(y).any()
    ref, _ = quadratic_descent_reference(y0.double(), A.double(), b.double(), 0.5, 40, min=0.0)
    eps = torch.finfo(torch.bfloat16).eps
    scale = ref.abs().max()
    # Within bfloat16's rounding of the exact loop: one rounding at the end
    # plus the rounded product inputs, which the contraction keeps small.
    assert (y.double() - ref).abs().max() <= 1.5 * eps * scale
    y32 = OP(y0.float(), A.float(), b.float(), 0.5, 40, min=0.0)[0].to(torch.bfloat16)
    if _bf16_units():
        want = _bf16_product_loop(y0, A, b, 0.5, 40)
        assert ((y.double() - want).abs() <= eps * want.abs() + 1e-5 * scale).all()
        assert not torch.equal(bits(y), bits(y32)), "the bfloat16 products did not run"
    else:
        assert torch.equal(bits(y), bits(y32))


def test_bfloat16_products_are_thread_invariant_and_per_sample():
    y0, A, b = spd_problem((1500, 40), torch.bfloat16, "cpu", seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(y0, A, b, 0.5, 30, min=0.0)[0]
        torch.set_num_threads(max(2, threads))
        several = OP(y0, A, b, 0.5, 30, min=0.0)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(bits(one), bits(several))
    # Per sample, with no sample stopping early, each sample's loop is the
    # batch-wide one.
    per = EX(y0, A, b, 0.5, 30, tol=1e-30, per_sample=True, min=0.0)
    assert torch.equal(bits(per[0]), bits(one)) and (per[1] == 30).all()


def test_float32_under_bfloat16_matmul_precision():
    # Inputs that are bfloat16 values: under "medium" the float32 loop mixes
    # exactly as a bfloat16 model's (which runs the same float32 loop).
    y0, A, b = (t.bfloat16().float() for t in spd_problem((300, 64), torch.float32, "cpu", seed=5))
    want = OP(y0, A, b, 0.5, 40, min=0.0)[0]
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = OP(y0, A, b, 0.5, 40, min=0.0)[0]
    finally:
        torch.set_float32_matmul_precision(before)
    # The default precision is bit for bit what it was.
    assert torch.equal(bits(OP(y0, A, b, 0.5, 40, min=0.0)[0]), bits(want))
    model = OP(y0.bfloat16(), A.bfloat16(), b.bfloat16(), 0.5, 40, min=0.0)[0]
    assert torch.equal(bits(got.bfloat16()), bits(model))
    exact, _ = quadratic_descent_reference(y0.double(), A.double(), b.double(), 0.5, 40, min=0.0)
    assert (got.double() - exact).abs().max() <= 1.5 * torch.finfo(torch.bfloat16).eps * exact.abs().max()
    if _bf16_units():
        assert not torch.equal(bits(got), bits(want)), "the bfloat16 products did not run"
    else:
        assert torch.equal(bits(got), bits(want))
