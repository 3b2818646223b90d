"""Host synchronisation of the CUDA path: none but the documented stop-test reads.

The ops' contract (docs/ops.md) allows one host synchronisation per stop test
and none otherwise: no copy from pageable memory, no read of a count, a flag or
a device ``lrs``, no solver that waits for the device in the backward. These
tests run the ops, their backward and the models under
``torch.cuda.set_sync_debug_mode``: ``"error"`` where no stop test runs, and
``"warn"`` with the warnings counted where one does (the count must equal the
number of stop tests that ran). An invalid device learning rate fails a
device-side assert, which leaves the process's CUDA context unusable: those
cases run in a child process.

Every test here needs a CUDA device and skips without one.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest
import torch

import torchiter
from test_cuda_numerics import problem
from torchiter.implicit import FixedPointGradient

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = torch.device("cuda")
QD = torch.ops.torchiter.quadratic_descent
QD_EX = torch.ops.torchiter.quadratic_descent_ex
BACKWARD = torch.ops.torchiter.quadratic_descent_backward
# What c10 raises or warns at a synchronising CUDA call in sync debug mode.
SYNC_MESSAGE = "called a synchronizing CUDA operation"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROJECTIONS = {
    "none": dict(shrink=0.0, min=None, max=None),
    "relu": dict(shrink=0.0, min=0.0, max=None),
    "box": dict(shrink=0.0, min=-0.2, max=0.3),
    "soft_nonneg": dict(shrink=0.02, min=0.0, max=None),
}
# Every kernel path: the blocked kernel's CMAX buckets, float64's split kernel
# (33 <= C <= 64) and cuBLAS (C > 64).
CHANNELS = [3, 12, 33, 64, 65, 100]


def _problem(B, C, spatial=(), dtype=torch.float64, seed=0):
    """test_cuda_numerics' problem (samples converge at different speeds), on the device."""
    return tuple(t.to(DEV) for t in problem(B, C, spatial, dtype, seed))


def _rates(K, where, dtype=torch.float64):
    """A slowly decaying schedule (the loops still converge within K)."""
    return (0.8 * 0.999 ** torch.arange(K, dtype=torch.float64)).to(dtype=dtype, device=where)


@contextlib.contextmanager
def _no_sync():
    """Any synchronising CUDA call in the block raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def _counted_syncs():
    """Counts the synchronising CUDA calls of the block: yields a list that
    holds the count once the block has run.

    c10 reports each one as a warning: a Python warning where the call came
    through a Python binding (``Tensor.item``), a line on the process's
    stderr where it came through the dispatcher from C++ (the ops). Both are
    counted: stderr is redirected at the file-descriptor level meanwhile."""
    torch.cuda.synchronize()
    count = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as err, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        os.dup2(err.fileno(), 2)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode("default")
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        printed = err.read().decode(errors="replace").count(SYNC_MESSAGE)
    count.append(printed + sum(SYNC_MESSAGE in str(w.message) for w in seen))


def _stop_tests(iterations, check_every):
    """Stop tests a loop ran: after iterations k >= 1 with k % check_every == 0, up to the last one run."""
    return (int(iterations) - 1) // check_every


def test_sync_debug_mode_sees_a_synchronisation():
    # The detectors the tests below rely on: a read of a device value raises
    # in "error" mode and is counted once in "warn" mode.
    x = torch.ones(3, device=DEV)
    with pytest.raises(RuntimeError, match=SYNC_MESSAGE):
        with _no_sync():
            x.sum().item()
    with _counted_syncs() as n:
        x.sum().item()
        x.max().item()
    assert n == [2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("lrs_on", [None, "cpu", "cuda"])
def test_quadratic_descent_without_stop_test_never_syncs(dtype, C, lrs_on):
    y0, A, b = _problem(5, C, (3,), dtype)
    K = 20
    lrs = None if lrs_on is None else _rates(K + 3, lrs_on)
    for proj in PROJECTIONS.values():
        QD(y0, A, b, 0.7, K, 0.0, 1, lrs, proj["shrink"], proj["min"], proj["max"])  # warm-up
        with _no_sync():
            y, n = QD(y0, A, b, 0.7, K, 0.0, 1, lrs, proj["shrink"], proj["min"], proj["max"])
        assert int(n) == K and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("lrs_on", [None, "cpu", "cuda"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
@pytest.mark.parametrize("trace", [False, True], ids=["no_trace", "trace"])
def test_quadratic_descent_ex_without_stop_test_never_syncs(dtype, C, lrs_on, per_sample, trace):
    # Statistics, counts and flags are made on the device; before, the counts
    # and flags were copied there from pageable host memory (a sync per call)
    # and a device lrs was read on the host at every plain call of the driver.
    y0, A, b = _problem(6, C, (), dtype, seed=1)
    K = 15
    lrs = None if lrs_on is None else _rates(K, lrs_on)
    args = (0.6, K, 0.0, 1, lrs, 0.0, 0.0, None, per_sample, trace)
    QD_EX(y0, A, b, *args)
    with _no_sync():
        r = QD_EX(y0, A, b, *args)
    assert (r[1] == K).all() and not r[2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("lrs_on", [None, "cuda"])
def test_quadratic_descent_syncs_once_per_stop_test(dtype, C, check_every, lrs_on):
    y0, A, b = _problem(8, C, (2,), dtype, seed=2)
    K = 300
    lrs = None if lrs_on is None else _rates(K, lrs_on)
    tol = 1e-3 if dtype == torch.float32 else 1e-6
    QD(y0, A, b, 0.8, K, tol, check_every, lrs, 0.0, 0.0, None)
    with _counted_syncs() as syncs:
        _, n = QD(y0, A, b, 0.8, K, tol, check_every, lrs, 0.0, 0.0, None)
    assert 1 < int(n) < K, "the loop must stop early to test the stop test"
    assert syncs == [_stop_tests(n, check_every)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("check_every", [1, 4])
@pytest.mark.parametrize("lrs_on", [None, "cpu", "cuda"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
def test_quadratic_descent_ex_syncs_once_per_stop_test(dtype, C, check_every, lrs_on, per_sample):
    # Per sample: the samples stop at different tests, and each test that
    # stops some moves rows on the device (before: three pageable copies).
    y0, A, b = _problem(12, C, (), dtype, seed=3)
    K = 400
    lrs = None if lrs_on is None else _rates(K, lrs_on)
    tol = 1e-3 if dtype == torch.float32 else 1e-6
    args = (0.8, K, tol, check_every, lrs, 0.0, 0.0, None, per_sample, True)
    QD_EX(y0, A, b, *args)
    with _counted_syncs() as syncs:
        r = QD_EX(y0, A, b, *args)
    counts = r[1].reshape(-1).tolist()
    assert r[2].all() and max(counts) < K, "every sample must stop to test the stop test"
    if per_sample:
        assert len(set(counts)) > 1, "the samples should stop at different iterations"
    assert syncs == [_stop_tests(max(counts), check_every)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("C", [3, 20, 40, 130])
@pytest.mark.parametrize("proj", list(PROJECTIONS), ids=str)
@pytest.mark.parametrize("op", ["plain", "ex"])
def test_forward_and_backward_never_sync(dtype, C, proj, op):
    # 64 positions: more than 16 systems of more than 16 channels went to
    # MAGMA's batched LU, which waits on the host, with the default backend.
    p = PROJECTIONS[proj]
    y0, A, b = _problem(16, C, (4,), dtype, seed=4)
    A.requires_grad_(True)
    b.requires_grad_(True)
    w = torch.randn_like(y0)

    def run():
        if op == "plain":
            y, _ = QD(y0, A, b, 0.7, 30, 0.0, 1, None, p["shrink"], p["min"], p["max"])
        else:
            y = QD_EX(y0, A, b, 0.7, 30, 0.0, 1, None, p["shrink"], p["min"], p["max"], True, False)[0]
        return torch.autograd.grad((y * w).sum(), (A, b))

    run()
    with _no_sync():
        ga, gb = run()
    assert ga.shape == A.shape and gb.shape == b.shape
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 17, 300])
@pytest.mark.parametrize("C", [1, 5, 17, 64, 129])
def test_backward_op_never_syncs_and_matches_cpu(dtype, rows, C):
    # The CUDA kernel of the backward solves with cuBLAS's batched LU (and
    # linalg_solve_ex for the unprojected case): same gradients as the CPU.
    g = torch.Generator().manual_seed(C * 1000 + rows)
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    A = (q * (torch.rand(C, generator=g, dtype=torch.float64) + 0.5)) @ q.T
    # Not symmetric (A^T matters), every principal block well conditioned.
    A = A + 0.05 * torch.randn(C, C, generator=g, dtype=torch.float64) / C**0.5
    y = torch.randn(rows, C, generator=g, dtype=torch.float64)
    y[y.abs() < 0.3] = 0.0  # held by a soft threshold
    y[y < -1.0] = -1.0  # held by min
    grad_y = torch.randn(rows, C, generator=g, dtype=torch.float64)
    for shrink, lo in [(0.0, None), (0.1, -1.0)]:
        want = BACKWARD(grad_y.to(dtype), y.to(dtype), A.to(dtype), shrink, lo, None)
        dev = [t.to(dtype=dtype, device=DEV) for t in (grad_y, y, A)]
        BACKWARD(*dev, shrink, lo, None)
        with _no_sync():
            got = BACKWARD(*dev, shrink, lo, None)
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
        for x, z, name in zip(want, got, ("grad_A", "grad_b")):
            torch.testing.assert_close(z.cpu(), x, **tol, msg=lambda m: f"{name}, shrink={shrink}: {m}")


def test_sgd_step_never_syncs():
    params = [torch.randn(n, device=DEV) for n in (3, 1000, 70001)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    lr = torch.tensor(0.1, device=DEV)
    with _no_sync():
        torchiter.ops.sgd_step_(params, grads, bufs, 0.1, momentum=0.9, min=0.0)
        torchiter.ops.sgd_step_(params, grads, bufs, lr, momentum=0.9, min=0.0)


def _sparse_coding():
    torch.manual_seed(0)
    model = torchiter.models.SparseCoding(
        48, 20, sparsity=0.05, max_iterations=40, iteration_lr=0.2, divergence="ignore",
        fixed_point_gradient=FixedPointGradient("implicit"),
    ).to(DEV)
    return model, torch.randn(32, 20, device=DEV)


def _similarity_matching():
    torch.manual_seed(0)
    model = torchiter.models.SimilarityMatching(
        torch.nn.Conv2d(1, 40, 5, bias=False), 40, max_iterations=30, iteration_lr=0.1,
        iteration_projection=torch.nn.ReLU(), divergence="ignore",
    ).to(DEV)
    return model, torch.randn(8, 1, 12, 12, device=DEV)


def test_models_forward_and_backward_never_sync():
    # tol = 0 and divergence="ignore": the models' own host reads (the count
    # of a loop with a stop test, the divergence check) are not made, so any
    # synchronisation would be the ops' or the autograd path's.
    sc, x = _sparse_coding()
    codes = sc(x)
    torch.autograd.grad(codes.square().sum(), [sc.dictionary])  # warm-up
    with _no_sync():
        codes = sc(x)
        grads = torch.autograd.grad(codes.square().sum(), [sc.dictionary])
        loss = sc.loss(x, codes.detach())
        loss.backward()
    assert all(torch.isfinite(g).all() for g in grads)
    nsm, images = _similarity_matching()
    y = nsm(images)
    nsm.loss(images, y).backward()
    with _no_sync():
        y = nsm(images)
        nsm.loss(images, y).backward()
        stats = nsm.iteration_stats
    assert int(stats.iterations) == 30 and torch.isfinite(y).all()


# --------------------------------------------------------------------------- #
# An invalid device learning rate: a device-side assert, in a child process
# --------------------------------------------------------------------------- #


def _child_code(setup, call):
    """A script that makes its inputs (`setup`), makes `call` and synchronises,
    then runs one more CUDA op; it prints whether each raised."""
    return "\n".join([
        "import torch, torchiter",
        textwrap.dedent(setup).strip(),
        # The assert may surface at a later launch of the call itself, or
        # at the synchronisation after it.
        "try:",
        f"    {call}",
        "    torch.cuda.synchronize()",
        "    print('no error')",
        "except RuntimeError as e:",
        "    print('raised:', 'device-side assert' in str(e))",
        "try:",
        "    (torch.ones(4, device='cuda') + 1).sum().item()",
        "    print('context usable')",
        "except RuntimeError:",
        "    print('context unusable')",
    ])


def _run_child(setup, call):
    """Runs _child_code(setup, call) in a child process; returns its stdout and stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _child_code(setup, call)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    return out.stdout, out.stderr


_LRS_SETUP = """
    y0 = torch.randn(4, {C}, device="cuda", dtype=torch.float64)
    A = torch.eye({C}, device="cuda", dtype=torch.float64)
    lrs = torch.full((10,), 0.5, device="cuda", dtype=torch.float64)
    lrs[{at}] = {bad}
"""


@pytest.mark.parametrize("op", ["quadratic_descent", "quadratic_descent_ex"])
@pytest.mark.parametrize("bad", ["-1.0", "float('nan')", "float('inf')"])
@pytest.mark.parametrize("C", [5, 40, 80])
def test_invalid_device_lrs_fails_a_device_assert(op, bad, C):
    # Reading a device lrs on the host would synchronise once per call, so
    # its rates are checked on the device: a bad one fails a device-side
    # assert, which raises "device-side assert triggered" at a later CUDA
    # call, and the process's CUDA context is unusable afterwards
    # (docs/ops.md). C: the blocked, split and cuBLAS paths.
    extra = ", False, False" if op == "quadratic_descent_ex" else ""
    stdout, stderr = _run_child(
        _LRS_SETUP.format(C=C, at=6, bad=bad),
        f"torch.ops.torchiter.{op}(y0, A, y0.clone(), 0.1, 8, 0.0, 1, lrs, 0.0, None, None{extra})",
    )
    assert "raised: True" in stdout and "context unusable" in stdout, stdout + stderr


def test_invalid_device_lrs_past_max_iterations_is_not_checked():
    # Only the first max_iterations rates are used, so only those are checked.
    stdout, stderr = _run_child(
        _LRS_SETUP.format(C=5, at=8, bad="-1.0"),
        "torch.ops.torchiter.quadratic_descent(y0, A, y0.clone(), 0.1, 8, 0.0, 1, lrs, 0.0, None, None)",
    )
    assert "no error" in stdout and "context usable" in stdout, stdout + stderr


@pytest.mark.parametrize("bad", ["-1.0", "float('nan')"])
def test_invalid_device_lr_of_sgd_step_fails_a_device_assert(bad):
    stdout, stderr = _run_child(
        """
        p = torch.ones(1000, device="cuda")
        g = torch.ones(1000, device="cuda")
        """,
        f"torchiter.ops.sgd_step_([p], [g], [], torch.tensor({bad}, device='cuda'))",
    )
    assert "raised: True" in stdout and "context unusable" in stdout, stdout + stderr


def test_invalid_cpu_lrs_raises_at_once_on_cuda():
    # A CPU lrs is read on the host, where checking it costs nothing: the
    # error is immediate and names the rate, and the context stays usable.
    y0, A, b = _problem(3, 5)
    lrs = torch.tensor([0.1, 0.2, -1.0, 0.1], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"torchiter\.quadratic_descent: lrs\[2\] must be a finite number >= 0"):
        QD(y0, A, b, 0.1, 4, 0.0, 1, lrs, 0.0, None, None)
    with pytest.raises(RuntimeError, match=r"torchiter\.quadratic_descent_ex: lrs\[2\] must be a finite number >= 0"):
        QD_EX(y0, A, b, 0.1, 4, 0.0, 1, lrs, 0.0, None, None, True, False)
    assert float((y0 + 1).sum()) == float((y0.cpu() + 1).sum())
