"""The CPU kernels' instruction-set variants: run-time choice, the forcing
environment variable, the op suites under every variant this CPU runs, and a
look at the machine code that only kernel variants use wide vector registers.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import torchiter
from _util import run_pytest, run_python

SUPPORTED = torchiter._C._cpu_capabilities()
ALL = ["default", "avx2", "avx512"]


def _run(code, capability=None, args=()):
    return run_python(code, args, TORCHITER_CPU_CAPABILITY=capability)


def test_widest_supported_variant_is_the_default():
    assert SUPPORTED[0] == "default" and set(SUPPORTED) <= set(ALL)
    proc = _run("import torchiter; print(torchiter.cpu_capability())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == SUPPORTED[-1]
    if os.uname().machine in ("x86_64", "AMD64"):
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        if " avx2" in flags and " fma" in flags:
            assert "avx2" in SUPPORTED


@pytest.mark.parametrize("capability", ALL)
def test_environment_variable_forces_a_narrower_variant(capability):
    proc = _run(
        "import torch, torchiter; print(torchiter.cpu_capability());"
        "p = torch.zeros(100); torch.ops.torchiter.sgd_step_([p], [torch.ones(100)], [], 0.5, min=-0.25);"
        "print(p.unique().tolist())",
        capability=capability.upper() if capability == "avx2" else capability,  # any case
    )
    assert proc.returncode == 0, proc.stderr
    name, values = proc.stdout.split()
    assert values == "[-0.25]"
    if capability in SUPPORTED:
        assert name == capability and "not supported" not in proc.stderr
    else:
        # Never wider than the CPU runs: the widest supported one, with a warning.
        assert name == SUPPORTED[-1] and "not supported by this CPU" in proc.stderr


def test_unknown_variant_name_is_an_error():
    proc = _run(
        "import torch, torchiter\n"
        "try:\n"
        "    torch.ops.torchiter.sgd_step_([torch.zeros(3)], [torch.ones(3)], [], 0.1)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n",
        capability="sse9",
    )
    assert proc.returncode == 0, proc.stderr
    assert "TORCHITER_CPU_CAPABILITY must be one of default, avx2, avx512, got 'sse9'" in proc.stdout


# The op suites, once per variant other than the one this process uses (the
# main run covers that one). -x: the first failure says enough.
OP_SUITES = [
    "tests/test_sgd_step.py",
    "tests/test_quadratic_descent.py",
    "tests/test_quadratic_descent_half.py",
    "tests/test_quadratic_descent_rest.py",
    "tests/test_quadratic_descent_fixed.py",
    "tests/test_quadratic_descent_ahead.py",
    "tests/test_quadratic_descent_per_sample_rows.py",
    "tests/test_threads.py",
]


# TORCHITER_TEST_VARIANTS (comma-separated) narrows the variants run here:
# CI sets it to leave out `default`, whose op suites its sanitizer part runs
# (scripts/sanitize.sh builds that variant alone).
_ONLY = [v.strip() for v in os.environ.get("TORCHITER_TEST_VARIANTS", "").split(",") if v.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("capability", [c for c in ALL if c != torchiter.cpu_capability()])
def test_op_suites_under_variant(capability):
    if capability not in SUPPORTED:
        pytest.skip(f"this CPU does not run the {capability} variant")
    if _ONLY and capability not in _ONLY:
        pytest.skip(f"TORCHITER_TEST_VARIANTS={','.join(_ONLY)} leaves out {capability}")
    proc = run_pytest(OP_SUITES, TORCHITER_CPU_CAPABILITY=capability)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"torchiter CPU kernels: {capability} variant" in proc.stdout, tail
    assert proc.returncode == 0, tail
    assert re.search(r"\d+ passed", proc.stdout), tail


def _functions_using(so_path):
    """{demangled function name: set of register classes / VEX use} from objdump."""
    out = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", str(so_path)], capture_output=True, text=True, check=True
    ).stdout
    funcs = {}
    name = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            continue
        if name is None or "\t" not in line:
            continue
        insn = line.split("\t", 1)[1].strip()
        used = funcs.setdefault(name, set())
        if "%zmm" in insn or re.search(r"%k[1-7]\b", insn):
            used.add("avx512")
        elif "%ymm" in insn or insn.startswith(("vfmadd", "vfmsub", "vfnmadd")):
            used.add("avx2")
        elif re.match(r"v[a-z]", insn) and not insn.startswith("vzeroupper"):
            used.add("vex")
    return funcs


@pytest.mark.skipif(shutil.which("objdump") is None or os.uname().machine != "x86_64", reason="needs objdump on x86-64")
def test_only_kernel_variants_use_wide_instructions():
    # Code outside the kernel files runs before the CPU is known: any AVX (VEX
    # encoded) instruction there, or in a header function the linker took
    # from a wide variant, would crash an older CPU.
    so = Path(torchiter._C.__file__)
    funcs = _functions_using(so)
    wide = {n: u for n, u in funcs.items() if u}
    # The compiler's own local copies of a function (IPA clones such as
    # "[clone .constprop.0]") belong to the file that made them and are called
    # from it alone: wide ones come from a variant's file, whatever they copy
    # (a std::vector constructor, say). Global and weak symbols stay checked.
    nm = subprocess.run(["nm", "-C", "--defined-only", str(so)], capture_output=True, text=True, check=True).stdout
    local_clones = {
        line.split(" ", 2)[2] for line in nm.splitlines()
        if line.count(" ") >= 2 and line.split(" ", 2)[1] == "t" and "[clone ." in line
    }
    assert any("::AVX512::" in n for n in wide) and any("::AVX2::" in n for n in wide), "no variant code found"
    offenders = []
    for n, used in wide.items():
        # OpenMP's outlined copies of a variant's loops ("._omp_fn.0") keep
        # their mangled names; the variant namespace is then in the template
        # arguments, as "9torchiter3cpu6AVX512", which makes them that
        # variant's own code as much as a demangled "::AVX512::" does.
        if "::AVX512::" in n or "9torchiter3cpu6AVX512" in n:
            continue
        if ("::AVX2::" in n or "9torchiter3cpu4AVX2" in n) and "avx512" not in used:
            continue
        if n in local_clones:
            continue
        offenders.append(f"{n}: {sorted(used)}")
    assert not offenders, "wide instructions outside the kernel variants:\n" + "\n".join(offenders[:20])


_SAME_RESULTS = """
import sys
import torch, torchiter
torch.manual_seed(0)
out = {}
for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    p, g, b = (torch.randn(10007, dtype=torch.float64).to(dt) for _ in range(3))
    torch.ops.torchiter.sgd_step_([p], [g], [b], 0.1, momentum=0.9, weight_decay=0.01, shrink=0.01, min=-0.5)
    out[f"sgd_step_ {dt}"] = torch.stack([p, b])
for dt in (torch.float32, torch.float64):
    for shape in [(3, 50, 23, 23), (1000, 3), (64, 9, 7, 5), (3, 7, 90)]:
        y0, b = torch.randn(shape, dtype=dt), torch.randn(shape, dtype=dt)
        A = torch.eye(shape[1], dtype=dt) + 0.01 * torch.randn(shape[1], shape[1], dtype=dt)
        out[f"blocked {dt} {shape}"] = torch.ops.torchiter.quadratic_descent(y0, A, b, 0.3, 20, min=0.0)[0]
        out[f"sweeps {dt} {shape}"] = torch.ops.torchiter.quadratic_descent(y0, A, b, 0.3, 20, tol=1e-30, min=0.0)[0]
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not {"avx2", "avx512"} <= set(SUPPORTED), reason="needs a CPU that runs both AVX2 and AVX-512")
def test_avx2_and_avx512_variants_agree_bitwise(tmp_path):
    # Both use vector FMA in the same order per element (a vector lane is one
    # element or position), so only the width differs: the results must not.
    results = {}
    for cap in ("avx2", "avx512"):
        path = tmp_path / f"{cap}.pt"
        proc = _run(_SAME_RESULTS, capability=cap, args=[str(path)])
        assert proc.returncode == 0, proc.stderr
        results[cap] = torch.load(path)
    for key, a in results["avx2"].items():
        assert torch.equal(a, results["avx512"][key]), f"{key}: AVX2 and AVX-512 results differ"
