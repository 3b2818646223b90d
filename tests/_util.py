"""Helpers shared by the op tests (CPU and CUDA)."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Tolerances against a float64 reference. Half types compute in float32 and
# round once, so the result differs by at most one rounding of the output.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# TorchScript's deprecation warnings: a DeprecationWarning from each of
# torch.jit.script, script_method, save and load in torch 2.13, a FutureWarning
# in 2.14. Exactly those are expected where tests script on purpose.
JIT_WARNINGS = [
    f"ignore:`torch.jit.{fn}` is deprecated:{category}"
    for fn in ("script", "script_method", "save", "load")
    for category in ("DeprecationWarning", "FutureWarning")
]


def spd_matrix(C, dtype=torch.float64, device="cpu", lo=0.5, hi=1.5, generator=None):
    """A random symmetric (C, C) matrix with eigenvalues in [lo, hi] (made in
    float64, then converted): the A of a quadratic_descent problem."""
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=generator, dtype=torch.float64))
    eig = torch.rand(C, generator=generator, dtype=torch.float64) * (hi - lo) + lo
    return ((q * eig) @ q.T).to(dtype=dtype, device=device)


def spd_problem(shape, dtype=torch.float64, device="cpu", seed=None):
    """``(y0, A, b)`` of a quadratic_descent problem of the given (B, C, *spatial)
    shape: normal y0 and b, A from :func:`spd_matrix`. With ``seed``, from a
    generator of its own; without, from torch's global one."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    A = spd_matrix(shape[1], generator=g)
    y0 = torch.randn(shape, generator=g, dtype=torch.float64)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (y0, A, b))


def bits(t: torch.Tensor) -> torch.Tensor:
    """A bitwise snapshot on the CPU (NaN-safe equality with torch.equal)."""
    t = t.detach().cpu().clone(memory_format=torch.contiguous_format)
    # A 0-dim tensor of a narrower dtype cannot be viewed as bytes.
    t = t.reshape(1) if t.dim() == 0 else t
    return t.view(torch.uint8) if t.numel() else t


def cpu_has_vector_fma() -> bool:
    """Whether the CPU kernel variant in use has FMA vectors (AVX2 or AVX-512)."""
    import torchiter

    return torchiter.cpu_capability() in ("avx2", "avx512")


def sgd_option_grid(bounds):
    """Every valid combination of sgd_step_'s options, with the given (min, max) pairs."""
    return [
        dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx, shrink=s, min=lo, max=hi)
        for m, d, wd, n, mx, s, (lo, hi) in itertools.product(
            [0.0, 0.9], [0.0, 0.3], [0.0, 0.01], [False, True], [False, True], [0.0, 0.05], bounds
        )
        if not (n and (m == 0 or d != 0))  # nesterov needs momentum and no dampening
    ]


def bits_at_thread_counts(fn, counts=(1, 2, 3)):
    """``bits(fn())`` with torch set to each number of threads in turn
    (checked to take effect); the setting is restored afterwards."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            assert torch.get_num_threads() == threads
            results.append(bits(fn()))
    finally:
        torch.set_num_threads(before)
    return results


ROOT = Path(__file__).resolve().parents[1]


def child_env(**settings):
    """This process's environment with the repository (and tests/) on
    PYTHONPATH, each setting applied; a setting of None removes the variable
    (what a kernel-choosing variable such as TORCHITER_CPU_CAPABILITY needs,
    since it is read once per process)."""
    env = dict(os.environ)
    for key, value in settings.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")]))
    return env


def run_python(code, args=(), timeout=120, python_flags=(), **settings):
    """``python -c code args`` in a child with child_env(**settings)."""
    return subprocess.run(
        [sys.executable, *python_flags, "-c", code, *args],
        env=child_env(**settings), capture_output=True, text=True, timeout=timeout,
    )


def run_pytest(files, timeout=1800, **settings):
    """The given test files (CPU tests only, stopping at the first failure)
    in a child pytest run from the repository root with child_env(**settings)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-k", "not cuda", *files],
        cwd=ROOT, env=child_env(**settings), capture_output=True, text=True, timeout=timeout,
    )
