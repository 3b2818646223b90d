"""quadratic_descent's sparse-row driver: mixing that skips exact zeros of y.

For a (B, C) batch with no stop test and a projection that gives exact zeros
(ReLU, a clamp at 0, soft thresholding), the AVX2 and AVX-512 kernels run each float32
row of 64 to 128 channels on its own and sums A's columns for the row's
non-zero channels only; from 129 channels on, and where a row's non-zero
channels select more of A than L1 holds, blocks of rows run together, by
slices of A's columns (run_sparse_blocks). A zero
y_j adds +-0 to the dense chain, so the two paths give the same values (a
zero's sign may differ where a product underflowed to -0). These tests run
every case with the driver allowed (TORCHITER_SPARSE=auto) and turned off
(0), check the values equal (NaN where NaN), that the driver really ran where
it applies and not where it does not (_C._sparse_rows_count()), and the
float32 results against the float64 loop.
"""

import pytest
import torch

import torchiter
from _util import bits_at_thread_counts, spd_matrix
from torchiter import _C
from torchiter.reference import quadratic_descent_reference

OP = torch.ops.torchiter.quadratic_descent
OP_EX = torch.ops.torchiter.quadratic_descent_ex

VECTOR = torchiter.cpu_capability() in ("avx2", "avx512")
PROJECTIONS = {
    "relu": dict(min=0.0),
    "nonpositive": dict(max=0.0),
    "soft": dict(shrink=0.8),
    "unit_box": dict(min=0.0, max=1.0),
}


def problem(rows, C, dtype, seed, b_shift=0.0):
    """``(y0, A, b, lr)``: zeros y0 (as the models start), a symmetric A
    with eigenvalues in [0.5, 1.5] and normal b (about half of y is then
    zero under ReLU; ``b_shift`` moves that share)."""
    g = torch.Generator().manual_seed(seed)
    A = spd_matrix(C, generator=g)
    b = torch.randn(rows, C, generator=g, dtype=torch.float64) + b_shift
    return torch.zeros(rows, C, dtype=dtype), A.to(dtype), b.to(dtype), 0.5


def eligible(C, dtype):
    """Whether the driver applies: AVX2 / AVX-512 kernels, float32, 64 to 1,024 channels."""
    return VECTOR and dtype == torch.float32 and 64 <= C <= 1024


def run_both(monkeypatch, fn, mode="auto"):
    """``fn()`` with the driver allowed (``mode``: auto, or 1 to force it
    whatever the sample's density) and turned off, and how many rows the
    driver ran in the first."""
    monkeypatch.setenv("TORCHITER_SPARSE", mode)
    before = _C._sparse_rows_count()
    sparse = fn()
    ran = _C._sparse_rows_count() - before
    monkeypatch.setenv("TORCHITER_SPARSE", "0")
    dense = fn()
    assert _C._sparse_rows_count() - before == ran
    return sparse, dense, ran


def assert_same_values(a, b):
    """Equal values (+0 equals -0) and NaN in the same places."""
    assert a.shape == b.shape and a.dtype == b.dtype
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(a[~nan], b[~nan])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [63, 64, 65, 90, 111, 128, 129, 143, 160, 191, 200, 257])
@pytest.mark.parametrize("proj", list(PROJECTIONS))
def test_same_values_as_dense_loop(monkeypatch, C, dtype, proj):
    # 300 rows: a sample of 256 rows, then the rest.
    y0, A, b, lr = problem(300, C, dtype, seed=C)
    kw = PROJECTIONS[proj]
    sparse, dense, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 30, **kw)[0])
    assert_same_values(sparse, dense)
    assert ran == (300 if eligible(C, dtype) else 0)
    assert (sparse == 0).float().mean() > 0.1  # the case has zeros to skip


@pytest.mark.parametrize("C", [64, 100, 128, 200])
def test_close_to_float64_loop(C):
    y0, A, b, lr = problem(257, C, torch.float32, seed=3)
    got, _ = OP(y0, A, b, lr, 40, min=0.0)
    want, _ = quadratic_descent_reference(y0.double(), A.double(), b.double(), lr, 40, min=0.0)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 5, 255, 256, 257, 1000])
def test_any_row_count(monkeypatch, rows):
    y0, A, b, lr = problem(rows, 72, torch.float32, seed=rows)
    sparse, dense, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 25, min=0.0)[0])
    assert_same_values(sparse, dense)
    assert ran == (rows if VECTOR else 0)


def test_non_contiguous_inputs_and_schedule(monkeypatch):
    y0, A, b, lr = problem(301, 64, torch.float32, seed=5)
    y0 = torch.randn(64, 301).t() * 0.1  # a view with channels 301 apart
    b = torch.cat([b, b], dim=1)[:, ::2]  # every other column
    lrs = torch.linspace(0.6, 0.2, 20, dtype=torch.float64)
    sparse, dense, ran = run_both(monkeypatch, lambda: OP(y0, A, b, 0.0, 20, lrs=lrs, shrink=0.01, min=0.0)[0])
    assert_same_values(sparse, dense)
    assert ran == (301 if VECTOR else 0)


@pytest.mark.parametrize(
    "lrs,kw",
    [([0.0] + [0.5] * 29, dict(min=0.0)),  # a warm-up from 0: nothing moves at first
     ([0.0] * 5 + [0.3] * 25, dict(min=0.0)),
     ([0.5] * 80 + [0.05] * 80, dict(shrink=0.1)),  # step decay: soft thresholding's fixed points move
     ([0.4] * 100, dict(shrink=0.1, min=0.0))],
    ids=["warm-up", "late-start", "step-decay-shrink", "constant-schedule"],
)
def test_schedules_with_changing_rates(monkeypatch, lrs, kw):
    y0, A, b, lr = problem(512, 64, torch.float32, seed=12)
    rates = torch.tensor(lrs, dtype=torch.float64)
    K = len(lrs)
    sparse, dense, ran = run_both(
        monkeypatch, lambda: OP_EX(y0, A, b, 0.0, K, 0.0, 1, rates, kw.get("shrink", 0.0), kw.get("min"), None, False, False))
    for s, d in zip(sparse, dense):
        assert_same_values(s, d)
    assert ran == (512 if VECTOR else 0)
    assert (sparse[0] != 0).any()


@pytest.mark.parametrize("K", [1, 2, 7, 60])
def test_statistics_equal_dense_loop(monkeypatch, K):
    y0, A, b, lr = problem(400, 80, torch.float32, seed=K)
    sparse, dense, ran = run_both(
        monkeypatch, lambda: OP_EX(y0, A, b, lr, K, 0.0, 1, None, 0.0, 0.0, None, False, False))
    assert ran == (400 if VECTOR else 0)
    for s, d in zip(sparse, dense):
        assert_same_values(s, d)


def test_rows_at_a_fixed_point_stop_with_the_same_result(monkeypatch):
    # A contracting loop: most rows reach a fixed point long before 500
    # iterations, and the driver stops them there; zero rows are fixed from
    # the start; the statistics' last change is then 0.
    y0, A, b, lr = problem(300, 64, torch.float32, seed=11)
    b[::3] = 0.0
    lr = float(0.9 / torch.linalg.eigvalsh(A.double()).max())
    sparse, dense, ran = run_both(
        monkeypatch, lambda: OP_EX(y0, A, b, lr, 500, 0.0, 1, None, 0.0, 0.0, None, False, False))
    for s, d in zip(sparse, dense):
        assert_same_values(s, d)
    assert float(sparse[3]) < 1e-6  # settled, or stepping between neighbours
    assert ran == (300 if VECTOR else 0)


# Rows of up to 128 channels whose non-zero channels select more of A's
# columns than an L1 cache holds beside the row (about 28 KiB: 128 channels
# at half density select 32 KiB) run on by blocks after the batch's sample;
# sparser rows (128 channels at 28%: 18 KiB) stay on their own.
@pytest.mark.parametrize("b_shift,by_blocks", [(0.0, True), (-0.6, False)])
@pytest.mark.parametrize("stats", [False, True])
def test_rows_reading_more_of_A_than_l1_go_on_by_blocks(monkeypatch, b_shift, by_blocks, stats):
    rows = 1000
    y0, A, b, lr = problem(rows, 128, torch.float32, seed=12, b_shift=b_shift)
    if stats:
        def fn():
            return OP_EX(y0, A, b, lr, 20, 0.0, 1, None, 0.0, 0.0, None, False, False)
    else:
        def fn():
            return OP(y0, A, b, lr, 20, min=0.0)
    before = _C._sparse_blocks_count()
    sparse, dense, ran = run_both(monkeypatch, fn)
    assert ran == (rows if VECTOR else 0)
    assert _C._sparse_blocks_count() - before == (rows - 256 if VECTOR and by_blocks else 0)
    for s, d in zip(sparse, dense):
        assert_same_values(s, d)


@pytest.mark.parametrize("C", [90, 111, 127])
def test_forced_dense_rows_go_on_by_blocks(monkeypatch, C):
    # TORCHITER_SPARSE=1 on rows that are hardly ever zero: from about 85
    # channels they select more of A than L1 holds, so blocks of rows, whose
    # slices of A's columns are narrower than such a row, take the rest.
    rows = 700
    y0, A, b, lr = problem(rows, C, torch.float32, seed=C, b_shift=4.0)
    before = _C._sparse_blocks_count()
    sparse, dense, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 12, min=0.0)[0], mode="1")
    assert ran == (rows if VECTOR else 0)
    assert _C._sparse_blocks_count() - before == (rows - 256 if VECTOR else 0)
    assert_same_values(sparse, dense)


@pytest.mark.parametrize("C", [64, 150])
def test_non_finite_values(monkeypatch, C):
    y0, A, b, lr = problem(280, C, torch.float32, seed=2)
    y0[3, 5] = float("nan")
    y0[10, 0] = float("inf")
    y0[11, C - 1] = float("inf")
    b[20, C - 1] = float("-inf")
    b[30, 7] = float("nan")
    y0[40, :] = -0.0
    sparse, dense, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 12, min=0.0)[0])
    assert_same_values(sparse, dense)
    assert torch.isnan(sparse[3]).all() and torch.isnan(sparse[30]).all()
    assert ran == (280 if VECTOR else 0)


def test_infinite_A_takes_the_dense_loop(monkeypatch):
    # 0 * inf is NaN in the dense chain: skipping zeros would hide it.
    y0, A, b, lr = problem(300, 64, torch.float32, seed=4)
    A[2, 7] = float("inf")
    sparse, dense, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 5, min=0.0)[0])
    assert ran == 0
    assert_same_values(sparse, dense)


@pytest.mark.parametrize("kw", [dict(), dict(min=-1.0), dict(min=0.1, max=2.0)])
def test_projection_without_zeros_takes_the_dense_loop(monkeypatch, kw):
    y0, A, b, lr = problem(300, 64, torch.float32, seed=6)
    _, _, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 5, **kw)[0])
    assert ran == 0


def test_more_than_1024_channels_take_the_dense_loop(monkeypatch):
    y0, A, b, lr = problem(3, 1025, torch.float32, seed=6)
    _, _, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 2, min=0.0)[0])
    assert ran == 0
    y0, A, b, lr = problem(3, 1024, torch.float32, seed=6)
    sparse, dense, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 2, min=0.0)[0])
    assert_same_values(sparse, dense)
    assert ran == (3 if VECTOR else 0)


def test_stop_test_and_trace_take_other_loops(monkeypatch):
    y0, A, b, lr = problem(300, 64, torch.float32, seed=7)
    _, _, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 50, 1e-4, min=0.0)[0])
    assert ran == 0
    _, _, ran = run_both(monkeypatch, lambda: OP_EX(y0, A, b, lr, 9, 0.0, 1, None, 0.0, 0.0, None, False, True)[0])
    assert ran == 0


@pytest.mark.parametrize("C,K", [(64, 20), (192, 4)])
def test_dense_rest_after_a_dense_sample(monkeypatch, C, K):
    # b well above 0: ReLU leaves almost nothing at zero, so after its sample
    # of 256 rows the batch goes to the dense kernel (each row on its own at
    # 64 channels, by blocks at 192).
    y0, A, b, lr = problem(4096, C, torch.float32, seed=8, b_shift=4.0)
    sparse, dense, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, K, min=0.0)[0])
    assert_same_values(sparse, dense)
    assert ran == (256 if VECTOR else 0)


def test_forced_on_a_dense_batch(monkeypatch):
    # TORCHITER_SPARSE=1 skips zeros wherever the loop allows it, whatever
    # the sample's density; the values stay those of the dense kernel.
    y0, A, b, lr = problem(1000, 64, torch.float32, seed=8, b_shift=4.0)
    monkeypatch.setenv("TORCHITER_SPARSE", "1")
    before = _C._sparse_rows_count()
    forced = OP(y0, A, b, lr, 20, min=0.0)[0]
    assert _C._sparse_rows_count() - before == (1000 if VECTOR else 0)
    monkeypatch.setenv("TORCHITER_SPARSE", "0")
    assert_same_values(forced, OP(y0, A, b, lr, 20, min=0.0)[0])


@pytest.mark.parametrize("rows,C,K", [(2000, 64, 30), (700, 200, 10)])
def test_same_bits_at_any_thread_count(rows, C, K):
    y0, A, b, lr = problem(rows, C, torch.float32, seed=9)
    before = _C._sparse_rows_count()
    results = bits_at_thread_counts(lambda: OP(y0, A, b, lr, K, min=0.0)[0])
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert _C._sparse_rows_count() - before == (3 * rows if VECTOR else 0)


def test_model_forward_runs_sparse_rows(monkeypatch):
    from torch import nn

    from torchiter.models import SimilarityMatching

    torch.manual_seed(0)
    model = SimilarityMatching(nn.Linear(20, 96, bias=False), 96, max_iterations=30, iteration_lr=0.3,
                               iteration_projection=nn.ReLU())
    x = torch.randn(500, 20)
    with torch.no_grad():
        # A trained competitor: not diagonal (a diagonal one has a loop of its own).
        P = 0.05 * torch.randn(96, 96)
        model.competitor.weight.add_(P + P.T)
        sparse, dense, ran = run_both(monkeypatch, lambda: model(x))
    assert_same_values(sparse, dense)
    assert ran == (500 if VECTOR else 0)


def test_bad_setting_is_refused(monkeypatch):
    y0, A, b, lr = problem(40, 64, torch.float32, seed=1)
    monkeypatch.setenv("TORCHITER_SPARSE", "yes")
    # Every CPU call checks it, whichever loop runs (or none).
    calls = [
        lambda: OP(y0, A, b, lr, 3, min=0.0),
        lambda: OP(y0.double(), A.double(), b.double(), lr, 3),
        lambda: OP(y0[:0], A, b[:0], lr, 3),
        lambda: OP_EX(y0, A, b, lr, 0, 0.0, 1, None, 0.0, None, None, False, False),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="TORCHITER_SPARSE must be one of auto, 1, 0, got 'yes'"):
            call()


# run_sparse_blocks: blocks of rows (about 58 at 200 channels, 26 at 520),
# two rows at a time, slices of 4 vectors of A's columns (the last one
# narrower), A's rows in L1 blocks (2 at 200 channels, 3 at 300 with AVX-512).


@pytest.mark.parametrize("rows", [1, 2, 3, 57, 58, 59, 117, 300])
def test_blocks_any_row_count(monkeypatch, rows):
    y0, A, b, lr = problem(rows, 200, torch.float32, seed=rows)
    sparse, dense, ran = run_both(monkeypatch, lambda: OP(y0, A, b, lr, 15, min=0.0)[0])
    assert_same_values(sparse, dense)
    assert ran == (rows if VECTOR else 0)


@pytest.mark.parametrize("C", [130, 300, 520])
@pytest.mark.parametrize("K", [1, 2, 9])
def test_blocks_statistics_equal_dense_loop(monkeypatch, C, K):
    y0, A, b, lr = problem(140, C, torch.float32, seed=K)
    y0 = torch.relu(torch.randn(140, C)) * 0.1  # not from zeros: the first change counts
    sparse, dense, ran = run_both(
        monkeypatch, lambda: OP_EX(y0, A, b, lr, K, 0.0, 1, None, 0.0, 0.0, None, False, False))
    assert ran == (140 if VECTOR else 0)
    for s, d in zip(sparse, dense):
        assert_same_values(s, d)


@pytest.mark.parametrize(
    "lrs,kw",
    [([0.0] + [0.5] * 12, dict(min=0.0)),
     ([0.5] * 8 + [0.05] * 8, dict(shrink=0.1)),
     ([0.4] * 10, dict(shrink=0.1, max=0.0))],
    ids=["warm-up", "step-decay-shrink", "nonpositive-shrink"],
)
def test_blocks_schedules_and_projections(monkeypatch, lrs, kw):
    # Forced: the point is the values, whatever share of y these leave at zero.
    y0, A, b, lr = problem(301, 176, torch.float32, seed=13)
    y0 = torch.randn(176, 301).t() * 0.1  # non-contiguous
    rates = torch.tensor(lrs, dtype=torch.float64)
    K = len(lrs)
    sparse, dense, ran = run_both(
        monkeypatch,
        lambda: OP_EX(y0, A, b, 0.0, K, 0.0, 1, rates, kw.get("shrink", 0.0), kw.get("min"), kw.get("max"), False, False),
        mode="1")
    for s, d in zip(sparse, dense):
        assert_same_values(s, d)
    assert ran == (301 if VECTOR else 0)
    assert (sparse[0] != 0).any() and (sparse[0] == 0).any()
