"""torchiter.quadratic_descent against the plain per-iteration loop (float64)."""

import pytest
import torch

import torchiter
from _util import JIT_WARNINGS, bits, spd_matrix, spd_problem
from torchiter.reference import quadratic_descent_reference

OP = torch.ops.torchiter.quadratic_descent

# (B, C) and (B, C, *spatial), with channel counts that the kernel splits into
# row blocks of every height from 1 to 5 (e.g. 7 = 4 + 3, 13 = 5 + 4 + 4) and
# position counts around the vector widths and tile widths (90 and 70
# positions end in column steps narrower than a full one). C >= 128 takes the
# GEMM-backed path in the plain x86-64 kernel variant (tests/test_cpu_variants.py
# runs this file under every variant the CPU has).
SHAPES = [(1000, 3), (100, 10), (33, 1), (5, 70), (7, 5, 3, 3), (4, 3, 40), (2, 13, 9, 11), (3, 50, 23, 23), (2, 6, 2, 2, 2), (37, 130), (2, 150, 3, 5), (3, 2, 90), (2, 7, 5, 14)]
PROJECTIONS = {
    "none": dict(),
    "relu": dict(min=0.0),
    "box": dict(min=-0.3, max=0.5),
    "soft": dict(shrink=0.05),
    "soft_nonneg": dict(shrink=0.02, min=0.0),
}


spd = spd_matrix


def problem(shape, dtype=torch.float64, device="cpu"):
    """``(y0, A, b)`` from torch's global generator (see _util.spd_problem)."""
    return spd_problem(shape, dtype, device)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("proj", PROJECTIONS, ids=str)
def test_matches_per_iteration_loop_float64(device, shape, proj):
    y0, A, b = problem(shape, device=device)
    snap = bits(y0)
    y, n = OP(y0, A, b, 0.4, 30, **PROJECTIONS[proj])
    yr, nr = quadratic_descent_reference(y0, A, b, 0.4, 30, **PROJECTIONS[proj])
    assert n.dtype == torch.int64 and n.dim() == 0 and n.device == y0.device
    assert int(n) == nr == 30
    assert y.shape == y0.shape and y.dtype == y0.dtype and y.is_contiguous()
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    assert torch.equal(bits(y0), snap), "y0 was modified"


@pytest.mark.parametrize("shape", [(1000, 3), (3, 50, 23, 23), (5, 70), (20, 140)], ids=str)
def test_float32_close_to_float64(device, shape):
    y0, A, b = problem(shape, device=device)
    y32, n = OP(y0.float(), A.float(), b.float(), 0.4, 40, min=0.0)
    yr, _ = quadratic_descent_reference(y0, A, b, 0.4, 40, min=0.0)
    torch.testing.assert_close(y32.double(), yr, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(1000, 3), (100, 10), (4, 7, 6, 6)], ids=str)
@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
@pytest.mark.parametrize("check_every", [1, 3, 7])
def test_tol_gives_exact_iteration_counts(device, shape, tol, check_every):
    y0, A, b = problem(shape, device=device)
    y, n = OP(y0, A, b, 0.5, 500, tol=tol, check_every=check_every, min=0.0)
    yr, nr = quadratic_descent_reference(y0, A, b, 0.5, 500, tol=tol, check_every=check_every, min=0.0)
    assert 1 < nr < 500, "the case must stop early to test anything"
    assert int(n) == nr
    assert nr % check_every == 1 % check_every or check_every == 1
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)


def test_lrs_sequence(device):
    y0, A, b = problem((50, 6, 5), device=device)
    lrs = torch.linspace(0.8, 0.1, 40, dtype=torch.float32)  # any dtype, any device
    y, n = OP(y0, A, b, 123.0, 35, lrs=lrs, shrink=0.01)
    yr, nr = quadratic_descent_reference(y0, A, b, 123.0, 35, lrs=lrs.double(), shrink=0.01)
    assert int(n) == nr == 35
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs(device):
    base = torch.randn(6, 40, 9, dtype=torch.float64, device=device)
    y0 = base[:, ::2, :]  # (6, 20, 9), strided channels
    b = torch.randn(9, 20, 6, dtype=torch.float64, device=device).permute(2, 1, 0)
    A = spd(20, device=device).t()  # transposed view
    snap = base.clone()
    y, _ = OP(y0, A, b, 0.3, 25, min=-0.2, max=0.9)
    yr, _ = quadratic_descent_reference(y0.contiguous(), A.contiguous(), b.contiguous(), 0.3, 25, min=-0.2, max=0.9)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    assert torch.equal(base, snap)


def test_zero_iterations_returns_a_copy(device):
    y0, A, b = problem((5, 4), device=device)
    y, n = OP(y0, A, b, 0.1, 0, tol=1e-3)
    assert int(n) == 0 and torch.equal(y, y0) and y.data_ptr() != y0.data_ptr()


def test_nan_never_converges(device):
    y0, A, b = problem((64, 4), device=device)
    b[3, 1] = float("nan")
    y, n = OP(y0, A, b, 0.1, 20, tol=1e30)
    assert int(n) == 20 and torch.isnan(y[3]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(37, 4), (3, 4, 70), (2, 130, 21)], ids=str)
def test_a_nan_in_any_lane_never_passes_the_stop_test(device, dtype, shape):
    # The kernels fold the changes lane by lane; a NaN at any position (first,
    # middle or last lane of a vector, the tail of a row, either dtype) must
    # reach the test, however large tol is.
    y0, A, b = problem(shape, dtype=dtype, device=device)
    positions = b[:, 0].numel()
    for flat in sorted({0, 1, 7, 8, 15, 16, positions // 2, positions - 1}):
        if flat >= positions:
            continue
        bad = b.clone()
        channel = bad.select(1, bad.shape[1] - 1)  # (B, *spatial), a view
        channel[torch.unravel_index(torch.tensor(flat), channel.shape)] = float("nan")
        assert int(torch.isnan(bad).sum()) == 1
        y, n = OP(y0, A, bad, 0.1, 12, tol=1e30)
        assert int(n) == 12, f"stopped at {int(n)} with a NaN at position {flat}"
        assert torch.isnan(y).any()


def test_bitwise_stable_across_thread_counts_and_modes():
    old = torch.get_num_threads()
    outs = []
    try:
        for shape in [(3, 50, 23, 23), (4000, 3), (300, 160), ("diagonal", 3, 50, 23, 23)]:
            if shape[0] == "diagonal":
                y0, A, _, b = diagonal_problem(shape[1:], dtype=torch.float32)
            else:
                y0, A, b = problem(shape, dtype=torch.float32)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                # tol=0 runs the cache-blocked path; a tiny tol that never
                # triggers runs the per-iteration sweeps: both must agree.
                a, _ = OP(y0, A, b, 0.2, 15, min=0.0)
                s, n = OP(y0, A, b, 0.2, 15, tol=1e-30, min=0.0)
                assert int(n) == 15
                outs.append((shape, a, s))
    finally:
        torch.set_num_threads(old)
    for shape in {o[0] for o in outs}:
        group = [o for o in outs if o[0] == shape]
        for _, a, s in group:
            assert torch.equal(a, group[0][1]) and torch.equal(s, group[0][1])


@pytest.mark.parametrize("C", range(1, 10))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_small_channel_count_without_spatial_dims(device, C, dtype):
    # (B, C) batches are transposed into the working layout by code
    # specialised per channel count up to 8; 9 takes the general loop.
    y0, A, b = problem((37, C), device=device)
    y, n = OP(y0.to(dtype), A.to(dtype), b.to(dtype), 0.4, 25, tol=1e-30, min=-0.4)
    yr, nr = quadratic_descent_reference(y0, A, b, 0.4, 25, tol=1e-30, min=-0.4)
    assert int(n) == nr and y.shape == (37, C) and y.dtype == dtype
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.double(), yr, **tol)


def diagonal_problem(shape, dtype=torch.float64, device="cpu"):
    """A diagonal A, and a dense A that acts the same way: its last channel
    starts and stays at exactly 0 (y0 = b = 0 there) and is the only one
    coupled to the others (off-diagonal entries in its column only), so every
    coupling term is an exact zero and the dense path must give the same
    bits as the diagonal one."""
    C = shape[1]
    y0 = torch.randn(shape, dtype=torch.float64)
    b = torch.randn(shape, dtype=torch.float64)
    y0[:, -1] = 0
    b[:, -1] = 0
    A = torch.diag(torch.rand(C, dtype=torch.float64) + 0.5)
    dense = A.clone()
    dense[:-1, -1] = torch.randn(C - 1, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (y0, A, dense, b))


# (B, C, *spatial) around the vector and register-run widths (8 vectors of 8
# or 16 float32 lanes), per-sample and folded layouts, the GEMM threshold.
DIAGONAL_SHAPES = [(1000, 3), (100, 10), (7, 2), (5, 70), (3, 50, 23, 23), (2, 6, 129), (2, 5, 127), (4, 3, 40), (2, 7, 5, 14), (37, 130), (2, 150, 3, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", DIAGONAL_SHAPES, ids=str)
@pytest.mark.parametrize("proj", PROJECTIONS, ids=str)
@pytest.mark.parametrize("tol", [0.0, 1e-30], ids=["no_test", "stop_test"])
def test_diagonal_A_gives_the_dense_paths_bits(device, dtype, shape, proj, tol):
    y0, A, dense, b = diagonal_problem(shape, dtype, device)
    kw = dict(tol=tol, **PROJECTIONS[proj])
    y, n = OP(y0, A, b, 0.4, 23, **kw)
    yd, nd = OP(y0, dense, b, 0.4, 23, **kw)
    # A relu-clamped float32 state can stop changing at all, which even a
    # 1e-30 tolerance sees.
    assert int(n) == int(nd) and (tol == 0 or int(n) > 1)
    assert not torch.isnan(y).any()
    assert torch.equal(y, yd)
    if dtype == torch.float64:
        yr, nr = quadratic_descent_reference(y0, A, b, 0.4, 23, **kw)
        assert nr == int(n)
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 5), (3, 4, 70)], ids=str)
def test_diagonal_A_with_scheduled_rates_and_early_stop(device, shape):
    y0, A, dense, b = diagonal_problem(shape, device=device)
    lrs = torch.linspace(0.9, 0.2, 300, dtype=torch.float64)
    for tol in (0.0, 1e-7):
        y, n = OP(y0, A, b, 0.0, 300, tol=tol, lrs=lrs, min=-0.5)
        yd, nd = OP(y0, dense, b, 0.0, 300, tol=tol, lrs=lrs, min=-0.5)
        yr, nr = quadratic_descent_reference(y0, A, b, 0.0, 300, tol=tol, lrs=lrs, min=-0.5)
        assert int(n) == int(nd) == nr and (tol == 0 or nr < 300)
        assert torch.equal(y, yd)
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(16, 5), (2, 5, 70)], ids=str)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=str)
def test_diagonal_A_spreads_a_non_finite_value_as_the_dense_path_does(device, shape, bad):
    # In A y, 0 * inf = NaN reaches every channel of the position: a diagonal
    # A must not hide that.
    y0, A, dense, b = diagonal_problem(shape, device=device)
    b[1, 2] = bad
    for tol in (0.0, 1e-6):
        y, n = OP(y0, A, b, 0.3, 9, tol=tol)
        yd, nd = OP(y0, dense, b, 0.3, 9, tol=tol)
        assert int(n) == int(nd) == 9
        assert torch.isnan(y[1, :-1]).all()
        assert torch.equal(bits(y), bits(yd))


BAD = [
    ("y0 1-D", lambda y, A, b: (y[0], A, b[0]), {}, r"y0 must have shape \(B, C, \*spatial\) with at least 2 dims, got shape \[4\]"),
    ("A shape", lambda y, A, b: (y, A[:3], b), {}, r"A must have shape \(C, C\) = \[4, 4\] where C = y0.size\(1\), got shape \[3, 4\]"),
    ("b shape", lambda y, A, b: (y, A, b[:2]), {}, r"b has shape \[2, 4\] but y0 has shape \[5, 4\]"),
    ("dtype mix", lambda y, A, b: (y, A.float(), b), {}, r"y0, A and b must share one dtype, got y0 Double, A Float, b Double"),
    ("float8", lambda y, A, b: tuple(t.to(torch.float8_e4m3fn) for t in (y, A, b)), {}, r"dtype Float8_e4m3fn is not supported"),
    ("int", lambda y, A, b: (y.long(), A.long(), b.long()), {}, r"y0 must be a floating tensor, got dtype Long"),
    ("device", lambda y, A, b: (y, A.to("meta"), b), {}, r"y0, A and b must live on one device, got y0 on cpu, A on meta"),
    ("negative lr", lambda y, A, b: (y, A, b), dict(lr=-1.0), r"lr must be >= 0, got -1"),
    ("NaN lr", lambda y, A, b: (y, A, b), dict(lr=float("nan")), r"lr must be a finite number"),
    ("negative iterations", lambda y, A, b: (y, A, b), dict(max_iterations=-1), r"max_iterations must be >= 0, got -1"),
    ("negative tol", lambda y, A, b: (y, A, b), dict(tol=-1e-3), r"tol must be >= 0"),
    ("NaN tol", lambda y, A, b: (y, A, b), dict(tol=float("nan")), r"tol must be >= 0"),
    ("check_every", lambda y, A, b: (y, A, b), dict(check_every=0), r"check_every must be >= 1, got 0"),
    ("lrs short", lambda y, A, b: (y, A, b), dict(lrs=torch.ones(3)), r"lrs has 3 entries but max_iterations is 10"),
    ("lrs 2-D", lambda y, A, b: (y, A, b), dict(lrs=torch.ones(10, 1)), r"lrs must be 1-D"),
    ("lrs int", lambda y, A, b: (y, A, b), dict(lrs=torch.ones(10, dtype=torch.long)), r"lrs must be a floating tensor"),
    ("lrs negative", lambda y, A, b: (y, A, b), dict(lrs=-torch.ones(10)), r"lrs\[0\] must be a finite number >= 0"),
    ("shrink", lambda y, A, b: (y, A, b), dict(shrink=-0.1), r"shrink must be >= 0"),
    ("min > max", lambda y, A, b: (y, A, b), dict(min=1.0, max=-1.0), r"min must be <= max"),
    ("NaN min", lambda y, A, b: (y, A, b), dict(min=float("nan")), r"min must not be NaN"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(device, case):
    name, mutate, kw, match = case
    y0, A, b = problem((5, 4), device=device)
    y0, A, b = mutate(y0, A, b)
    args = dict(lr=0.1, max_iterations=10)
    args.update(kw)
    lr, its = args.pop("lr"), args.pop("max_iterations")
    if "lrs" in args:
        args["lrs"] = args["lrs"].to(device)
    with pytest.raises(RuntimeError, match="torchiter.quadratic_descent: " + match):
        OP(y0, A, b, lr, its, **args)


def test_wrapper_and_opcheck(device):
    y0, A, b = problem((9, 5, 3), device=device)
    y, n = torchiter.ops.quadratic_descent(y0, A, b, 0.3, 12, tol=1e-4, min=0.0)
    y2, n2 = OP(y0, A, b, 0.3, 12, 1e-4, 1, None, 0.0, 0.0, None)
    assert torch.equal(y, y2) and torch.equal(n, n2)
    torch.library.opcheck(OP.default, (y0, A, b, 0.3, 12), dict(tol=1e-4, min=0.0))
    torch.library.opcheck(OP.default, (y0.float(), A.float(), b.float(), 0.3, 5), dict(lrs=torch.rand(5), shrink=0.1))


class _Loop(torch.nn.Module):
    def forward(self, y0: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y, n = torchiter.ops.quadratic_descent(y0, A, b, 0.3, 50, tol=1e-6, min=0.0)
        return y * n.to(y.dtype)


@pytest.mark.filterwarnings(*JIT_WARNINGS)
def test_torchscript_round_trip(tmp_path):
    y0, A, b = problem((20, 6))
    scripted = torch.jit.script(_Loop())
    torch.jit.save(scripted, str(tmp_path / "loop.pt"))
    loaded = torch.jit.load(str(tmp_path / "loop.pt"))
    ref = _Loop()(y0, A, b)
    assert torch.equal(scripted(y0, A, b), ref) and torch.equal(loaded(y0, A, b), ref)
