"""Channel mixing on AMX tiles (TDPBF16PS) for bfloat16 loops and float32
loops under torch.set_float32_matmul_precision("medium").

The tile code runs on the hardware where the CPU has AMX-BF16, and on any CPU
with AVX512-BF16 under TORCHITER_AMX=emulate, a software model of the tile
registers that checks the tile configuration and operand shapes and sums in
TDPBF16PS's order. The tests run in child processes (the mode is chosen once
per process) and compare against a float32 model of that order, bit for bit.
"""

import pytest
import torch

import torchiter
from _util import bits, run_pytest, run_python

UNITS = torchiter.cpu_bfloat16_units()

needs_bf16 = pytest.mark.skipif(
    UNITS == "none", reason="the AMX path (hardware or emulated) needs the AVX-512 variant on a CPU with AVX512-BF16"
)


def _run(code, amx, threads=2, args=()):
    return run_python(code, args, timeout=600, TORCHITER_AMX=amx, OMP_NUM_THREADS=str(threads))


# One float32 loop under "medium" precision, and the same loop modelled in
# torch: y rounded to bfloat16 for the product, each channel's sum taken in
# channel order (TDPBF16PS adds a pair's even product, then its odd one,
# pair after pair; bfloat16 products are exact in float32), then
# project(y - lr (sum - b)) with one rounding (an FMA).
_MODEL = r"""
import sys
import torch, torchiter
from _util import spd_problem

def model(y0, A, b, lr, K, lo, hi):
    C = A.shape[0]
    A16 = A.bfloat16().float()
    y = y0.movedim(1, 0).reshape(C, -1).clone()
    bb = b.movedim(1, 0).reshape(C, -1)
    for _ in range(K):
        y16 = y.bfloat16().float()
        acc = torch.zeros_like(y)
        for j in range(C):
            acc = acc + A16[:, j : j + 1] * y16[j : j + 1, :]
        step = ((acc - bb).double() * -lr + y.double()).float()
        y = step.clamp(min=lo, max=hi)
    return y.reshape(C, y0.shape[0], *y0.shape[2:]).movedim(0, 1)

torch.set_float32_matmul_precision("medium")
units = torchiter.cpu_bfloat16_units()
worst = 0.0
mismatched = []
for shape in [(40, 32), (65, 33), (5, 64, 7), (97, 50), (3, 50, 4, 5), (40, 100), (17, 130), (70, 256), (2, 48, 33)]:
    y0, A, b = (t.bfloat16().float() for t in spd_problem(shape, torch.float32, "cpu", seed=shape[1]))
    for lo, hi in [(0.0, None), (-0.5, 0.75)]:
        y, n = torch.ops.torchiter.quadratic_descent(y0, A, b, 0.5, 3, min=lo, max=hi)
        want = model(y0, A, b, 0.5, 3, lo, float("inf") if hi is None else hi)
        assert int(n) == 3 and y.shape == y0.shape and not torch.isnan(y).any()
        if not torch.equal(y, want):
            mismatched.append(f"{shape} min={lo} max={hi}: {int((y != want).sum())} of {y.numel()}")
        worst = max(worst, ((y - want).abs().max() / want.abs().max().clamp(min=1e-30)).item())
print(units, worst)
print("\n".join(mismatched) or "bitwise")
"""


@needs_bf16
def test_emulated_tiles_sum_in_tdpbf16ps_order_bit_for_bit():
    # Channel counts below, at and past a tile (16 pairs) and a block (32
    # rows), odd ones (a half-empty last pair), positions that end a block
    # half way (16 of 32), spatial and flat layouts, one and two-sided
    # projections.
    proc = _run(_MODEL, "emulate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    units, worst = proc.stdout.split("\n")[0].split()
    assert units == "amx-emulated"
    assert proc.stdout.split("\n")[1] == "bitwise", proc.stdout


@pytest.mark.skipif(UNITS != "amx", reason="needs a CPU with AMX-BF16")
def test_hardware_tiles_match_the_model():
    # The hardware may round a pair's two products once instead of twice:
    # within a few float32 roundings of the model, not bit for bit.
    proc = _run(_MODEL, "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    units, worst = proc.stdout.split("\n")[0].split()
    assert units == "amx" and float(worst) <= 1e-5, proc.stdout


_PATHS = r"""
import sys
import torch, torchiter
from _util import spd_problem

EX = torch.ops.torchiter.quadratic_descent_ex
OP = torch.ops.torchiter.quadratic_descent
out = {}
torch.manual_seed(0)
for shape in [(300, 64), (4, 50, 9, 7), (1000, 40)]:
    y0, A, b = spd_problem(shape, torch.bfloat16, "cpu", seed=shape[1])
    out[f"fixed {shape}"] = OP(y0, A, b, 0.5, 30, min=0.0)[0]
    out[f"tol {shape}"] = OP(y0, A, b, 0.5, 200, tol=1e-2, min=0.0)
    r = EX(y0, A, b, 0.5, 200, tol=1e-2, per_sample=True, min=0.0, shrink=0.01)
    out[f"per_sample {shape}"] = (r[0], r[1], r[2])
    out[f"never stops {shape}"] = EX(y0, A, b, 0.5, 25, tol=1e-30, per_sample=True, min=0.0)[0]
    out[f"fixed 25 {shape}"] = OP(y0, A, b, 0.5, 25, min=0.0)[0]
    out[f"fixed 20 {shape}"] = OP(y0, A, b, 0.5, 20, min=0.0)[0]
    out[f"trace {shape}"] = EX(y0, A, b, 0.5, 20, tol=1e-30, trace=True, min=0.0)
torch.save(out, sys.argv[1])
"""


@needs_bf16
def test_emulated_tiles_on_every_loop_path_and_thread_count(tmp_path):
    # Fixed counts (lanes or blocked tiles), a stop test (tiles running
    # ahead), per-sample stopping and a trace all mix through the tiles:
    # each within bfloat16 rounding of the float64 loop, the same at one and
    # two threads, and per sample the batch-wide loop where nothing stops.
    from _util import spd_problem
    from torchiter.reference import quadratic_descent_reference

    runs = {}
    for threads in (1, 2):
        path = tmp_path / f"{threads}.pt"
        proc = _run(_PATHS, "emulate", threads=threads, args=(str(path),))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[threads] = torch.load(path)
    one, two = runs[1], runs[2]
    assert one.keys() == two.keys()
    for key in one:
        a, b = one[key], two[key]
        for x, z in zip(a if isinstance(a, (tuple, list)) else [a], b if isinstance(b, (tuple, list)) else [b]):
            assert torch.equal(bits(x), bits(z)), key
    eps = torch.finfo(torch.bfloat16).eps
    for shape in [(300, 64), (4, 50, 9, 7), (1000, 40)]:
        y0, A, b = spd_problem(shape, torch.bfloat16, "cpu", seed=shape[1])
        ref, _ = quadratic_descent_reference(y0.double(), A.double(), b.double(), 0.5, 30, min=0.0)
        y = one[f"fixed {shape}"]
        assert y.dtype == torch.bfloat16 and not torch.isnan(y).any()
        assert (y.double() - ref).abs().max() <= 1.5 * eps * ref.abs().max()
        y, n = one[f"tol {shape}"]
        ref, _ = quadratic_descent_reference(y0.double(), A.double(), b.double(), 0.5, int(n), min=0.0)
        assert 0 < int(n) < 200 and (y.double() - ref).abs().max() <= 2 * eps * ref.abs().max()
        y, iters, converged = one[f"per_sample {shape}"]
        assert converged.all() and (iters < 200).all() and not torch.isnan(y).any()
        assert torch.equal(bits(one[f"never stops {shape}"]), bits(one[f"fixed 25 {shape}"]))
        trace = one[f"trace {shape}"]
        assert torch.equal(bits(trace[0]), bits(one[f"fixed 20 {shape}"]))
        changes = trace[5]
        assert changes.shape == (20,) and torch.isfinite(changes).all() and changes[-1] < changes[0]


def test_amx_environment_variable():
    proc = _run("import torchiter; print(torchiter.cpu_bfloat16_units())", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("avx512_bf16" if UNITS in ("amx", "avx512_bf16") else "none")
    proc = _run("import torchiter\ntry:\n    torchiter.cpu_bfloat16_units()\nexcept RuntimeError as e:\n    print(e)", "maybe")
    assert proc.returncode == 0, proc.stderr
    assert "TORCHITER_AMX must be one of auto, 1, 0, emulate, force, got 'maybe'" in proc.stdout
    assert UNITS in ("amx", "avx512_bf16", "none")


_NESTED = r"""
import signal, torch, torchiter
from _util import bits, spd_problem
OP = torch.ops.torchiter.quadratic_descent
y0, A, b = spd_problem((3000, 64), torch.bfloat16, "cpu", seed=3)
y1, A1, b1 = spd_problem((100, 40), torch.bfloat16, "cpu", seed=4)
inner = []
during = [False]
def handler(signum, frame):
    # Only calls made from inside the outer op (by its interrupt check) count.
    if during[0]:
        inner.append(OP(y1, A1, b1, 0.5, 5, min=0.0)[0])
want_inner = OP(y1, A1, b1, 0.5, 5, min=0.0)[0]
want = OP(y0, A, b, 0.5, 150, min=0.0)[0]
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
same = True
for _ in range(20):  # until a handler has run inside a loop (the check runs every 100 ms)
    during[0] = True
    got = OP(y0, A, b, 0.5, 150, min=0.0)[0]
    during[0] = False
    same = same and torch.equal(bits(got), bits(want))
    if inner:
        break
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print(len(inner), same, all(torch.equal(bits(x), bits(want_inner)) for x in inner))
"""


@needs_bf16
def test_python_signal_handlers_may_run_tile_code_mid_loop():
    # The interrupt check between steps runs Python's signal handlers, here
    # one that runs another bfloat16 loop on the same thread while the outer
    # loop holds its tile configuration: both give their own results. (On
    # the hardware the outer loop also configures its tiles again after such
    # a check, since a handler may have run oneDNN's tile code; the
    # emulation cannot tell.)
    proc = _run(_NESTED, "emulate", threads=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls, same, inner_same = proc.stdout.split()
    assert int(calls) >= 1 and same == "True" and inner_same == "True", proc.stdout


@needs_bf16
def test_a_failing_tile_self_test_falls_back_quietly():
    # TORCHITER_AMX=force runs the hardware self-test even where CPUID says
    # there are no tiles: on such a CPU the child process that tries them
    # dies of SIGILL, and this process goes on with VDPBF16PS, warns once,
    # and prints no crash report (the child resets faulthandler's signals).
    code = (
        "import torch, torchiter\n"
        "print(torchiter.cpu_bfloat16_units())\n"
        "y0 = torch.rand(70, 64).bfloat16(); A = torch.eye(64).bfloat16(); A[0, 1] = 0.25\n"
        "print(torch.ops.torchiter.quadratic_descent(y0, A, y0, 0.5, 5, min=0.0)[0].float().sum().item() > 0)\n"
    )
    proc = run_python(code, python_flags=("-X", "faulthandler"), TORCHITER_AMX="force")
    assert proc.returncode == 0, proc.stderr
    units, ran = proc.stdout.split()
    assert ran == "True" and "Fatal Python error" not in proc.stderr
    if UNITS == "amx":
        assert units == "amx"
    else:
        assert units == "avx512_bf16"
        assert proc.stderr.count("tile self-test failed") == 1, proc.stderr


@needs_bf16
def test_bfloat16_suites_on_emulated_tiles():
    # The bfloat16 and reduced-precision tests of the op suites, mixing on
    # the emulated tiles.
    proc = run_pytest(
        ["tests/test_quadratic_descent_half.py", "tests/test_quadratic_descent_fixed.py",
         "tests/test_quadratic_descent_rest.py"],
        TORCHITER_AMX="emulate",
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "bfloat16 mixing on amx-emulated" in proc.stdout, tail
    assert proc.returncode == 0, tail
