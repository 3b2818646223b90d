"""Property-based tests of both ops against the float64 references.

Hypothesis draws shapes (0-dim, empty, odd sizes, sizes crossing the vector
widths and the parallel chunk size), dtypes, views (slices, transposes,
strided steps), every option and thread counts; and, for bad input, checks
that nothing is written. The profile is derandomised with a fixed example
budget, so CI runs the same cases every time.
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import torchiter  # noqa: F401,E402
from torchiter.reference import quadratic_descent_reference, sgd_step_reference  # noqa: E402

from _util import TOL, bits  # noqa: E402

settings.register_profile(
    "torchiter",
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("torchiter")

OP = torch.ops.torchiter
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Vector widths are 4..32 lanes; at::parallel_for splits at GRAIN_SIZE (32768)
# elements, aligned to 64.
EDGE_SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 32767, 32768, 32769, 65600]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@st.composite
def shapes(draw):
    kind = draw(st.sampled_from(["0-dim", "1-d edge", "2-d", "3-d"]))
    if kind == "0-dim":
        return ()
    if kind == "1-d edge":
        return (draw(st.sampled_from(EDGE_SIZES)),)
    dims = 2 if kind == "2-d" else 3
    return tuple(draw(st.integers(0 if dims == 2 else 1, 19)) for _ in range(dims))


@st.composite
def tensor_like(draw, shape, dtype, gen):
    """A tensor of `shape`: contiguous, a slice of a larger one, a transpose or a strided view."""
    layout = draw(st.sampled_from(["contiguous", "slice", "transposed", "stepped"]))
    if layout == "contiguous" or len(shape) == 0:
        return torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
    if layout == "slice":
        big = torch.randn((shape[0] + 3,) + shape[1:], dtype=torch.float64, generator=gen).to(dtype)
        return big[2 : 2 + shape[0]]
    if layout == "transposed" and len(shape) >= 2:
        t = torch.randn(shape[::-1], dtype=torch.float64, generator=gen).to(dtype)
        return t.permute(*reversed(range(len(shape))))
    big = torch.randn(shape[:-1] + (2 * shape[-1],), dtype=torch.float64, generator=gen).to(dtype)
    return big[..., ::2]


@st.composite
def sgd_options(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, 0.3]))
    bounds = draw(st.sampled_from([(None, None), (0.0, None), (None, 0.3), (-0.5, 0.5), (0.1, 0.1)]))
    return dict(
        lr=draw(st.sampled_from([0.0, 0.01, 0.5, 2.0])),
        momentum=momentum,
        dampening=dampening,
        weight_decay=draw(st.sampled_from([0.0, 0.01])),
        nesterov=nesterov,
        maximize=draw(st.booleans()),
        first_step=draw(st.booleans()),
        shrink=draw(st.sampled_from([0.0, 0.05])),
        min=bounds[0],
        max=bounds[1],
    )


@given(data=st.data())
def test_sgd_step_matches_reference(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    torch.set_num_threads(data.draw(st.sampled_from([1, 2, 3, 4])))
    n = data.draw(st.integers(1, 4))
    dtype = data.draw(st.sampled_from(DTYPES))
    opts = data.draw(sgd_options())
    params, grads, bufs = [], [], []
    for _ in range(n):
        shape = data.draw(shapes())
        params.append(data.draw(tensor_like(shape, dtype, gen)))
        grads.append(data.draw(tensor_like(shape, dtype, gen)))
        if opts["momentum"]:
            # First steps must ignore the old contents: poison them.
            b = data.draw(tensor_like(shape, dtype, gen))
            if opts["first_step"]:
                b.fill_(float("nan"))
            bufs.append(b)
    ref_p = [p.double().clone() for p in params]
    ref_b = [b.double().clone() for b in bufs]
    sgd_step_reference(ref_p, [g.double() for g in grads], ref_b, **opts)
    lr = opts.pop("lr")
    OP.sgd_step_(params, grads, bufs, lr, **opts)
    for got, want in zip(params + bufs, ref_p + ref_b):
        assert not torch.isnan(got).any()
        # float32 rounding of float64 inputs can move a value across a bound:
        # compare in the param's dtype with its tolerance.
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@given(data=st.data())
def test_sgd_step_bitwise_the_same_at_any_thread_count(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    dtype = data.draw(st.sampled_from(DTYPES))
    opts = data.draw(sgd_options())
    sizes = data.draw(st.lists(st.sampled_from(EDGE_SIZES), min_size=1, max_size=5))
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in sizes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in sizes]
    bufs = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in sizes] if opts["momentum"] else []
    lr = opts.pop("lr")
    results = []
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        p = [t.clone() for t in params]
        b = [t.clone() for t in bufs]
        OP.sgd_step_(p, grads, b, lr, **opts)
        results.append([bits(t) for t in p + b])
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other))


BAD = {
    "negative lr": dict(lr=-0.1),
    "nan momentum": dict(momentum=float("nan")),
    "nesterov with dampening": dict(momentum=0.9, nesterov=True, dampening=0.1),
    "min above max": dict(min=1.0, max=0.0),
    "negative shrink": dict(shrink=-1.0),
    "shape mismatch": dict(),
    "dtype mismatch": dict(),
    "buffer count": dict(momentum=0.9),
    "aliased params": dict(),
    "param is buffer": dict(momentum=0.9),
    "requires grad": dict(),
}


@given(data=st.data())
def test_sgd_step_bad_input_writes_nothing(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    case = data.draw(st.sampled_from(sorted(BAD)))
    dtype = data.draw(st.sampled_from(DTYPES))
    n = data.draw(st.integers(2, 4))
    sizes = [data.draw(st.sampled_from(EDGE_SIZES[1:12])) for _ in range(n)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    opts = dict(BAD[case])
    lr = opts.pop("lr", 0.1)
    bufs = [torch.randn(s, generator=gen).to(dtype) for s in sizes] if opts.get("momentum") else []
    victim = data.draw(st.integers(0, n - 1))
    if case == "shape mismatch":
        grads[victim] = torch.randn(sizes[victim] + 1).to(dtype)
    elif case == "dtype mismatch":
        grads[victim] = grads[victim].to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif case == "buffer count":
        bufs = bufs[:-1]
    elif case == "aliased params":
        params[victim] = params[(victim + 1) % n]
        grads[victim] = torch.randn(params[victim].shape).to(dtype)
    elif case == "param is buffer":
        bufs[victim] = params[victim]
    elif case == "requires grad":
        params[victim].requires_grad_(True)
    before = [bits(t) for t in params + grads + bufs]
    with pytest.raises(RuntimeError, match=r"torchiter\.sgd_step_: "):
        OP.sgd_step_(params, grads, bufs, lr, **opts)
    after = [bits(t) for t in params + grads + bufs]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@given(data=st.data())
def test_quadratic_descent_matches_reference(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    torch.set_num_threads(data.draw(st.sampled_from([1, 2, 3, 4])))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    B = data.draw(st.integers(0, 9))
    C = data.draw(st.sampled_from([1, 2, 3, 5, 8, 13, 17, 33]))
    spatial = data.draw(st.sampled_from([(), (1,), (7,), (3, 5), (17,)]))
    shape = (B, C) + spatial
    M = torch.randn(C, C, generator=gen, dtype=torch.float64)
    A64 = M @ M.T / C + torch.eye(C, dtype=torch.float64)
    L = torch.linalg.eigvalsh(A64).max().item()
    lr = data.draw(st.sampled_from([0.3, 0.9])) / L
    bounds = data.draw(st.sampled_from([(None, None), (0.0, None), (-0.2, 0.3)]))
    shrink = data.draw(st.sampled_from([0.0, 0.01]))
    iters = data.draw(st.sampled_from([0, 1, 2, 5, 40]))
    tol = data.draw(st.sampled_from([0.0, 1e-3, 1e-6]))
    check_every = data.draw(st.sampled_from([1, 3]))
    use_lrs = data.draw(st.booleans())
    lrs = torch.linspace(lr, lr / 2, max(iters, 1), dtype=torch.float64)[:iters] if use_lrs else None
    y0 = data.draw(tensor_like(shape, torch.float64, gen)) if B else torch.zeros(shape, dtype=torch.float64)
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    want, want_n = quadratic_descent_reference(y0, A64, b, lr, iters, tol, check_every, lrs, shrink, *bounds)
    y0c = y0.to(dtype)
    y0_before = bits(y0c)
    got, n = OP.quadratic_descent(y0c, A64.to(dtype), b.to(dtype), lr, iters, tol, check_every, lrs, shrink, *bounds)
    assert torch.equal(bits(y0c), y0_before)
    assert got.shape == shape and got.dtype == dtype and n.dtype == torch.int64 and n.dim() == 0
    assert not torch.isnan(got).any()
    if dtype == torch.float64:
        assert int(n) == want_n
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    else:
        if tol == 0:
            assert int(n) == want_n  # no stop test: every iteration runs
        else:
            # float32 may stop one check earlier or later than float64 near tol.
            assert abs(int(n) - want_n) <= check_every
        if int(n) == want_n:
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@given(data=st.data())
def test_quadratic_descent_bitwise_the_same_at_any_thread_count(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    C = data.draw(st.sampled_from([3, 8, 20, 130]))
    B = data.draw(st.sampled_from([1, 5, 64]))
    spatial = data.draw(st.sampled_from([(), (33,), (12, 12)]))
    shape = (B, C) + spatial
    A = torch.eye(C, dtype=dtype) + 0.01 * torch.randn(C, C, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    tol = data.draw(st.sampled_from([0.0, 1e-4]))
    out = []
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        y, n = OP.quadratic_descent(torch.zeros(shape, dtype=dtype), A, b, 0.5, 15, tol, 1, None, 0.0, 0.0, None)
        out.append((bits(y), int(n)))
    for y, n in out[1:]:
        assert n == out[0][1] and torch.equal(y, out[0][0])
