"""The CPU kernels' instruction-set variants: run-time choice, the forcing
environment variable, the op suites under every variant this CPU runs, and a
look at the machine code that only kernel variants use wide vector registers.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchiter

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = torchiter._C._cpu_capabilities()
ALL = ["default", "avx2", "avx512"]


def _run(code, capability=None, **kw):
    env = dict(os.environ)
    env.pop("TORCHITER_CPU_CAPABILITY", None)
    if capability is not None:
        env["TORCHITER_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, **kw)


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
OP_SUITES = ["tests/test_sgd_step.py", "tests/test_quadratic_descent.py", "tests/test_threads.py"]


@pytest.mark.parametrize("capability", [c for c in ALL if c != torchiter.cpu_capability()])
def test_op_suites_under_variant(capability):
    if capability not in SUPPORTED:
        pytest.skip(f"this CPU does not run the {capability} variant")
    env = dict(os.environ, TORCHITER_CPU_CAPABILITY=capability)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-k", "not cuda", *OP_SUITES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
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
    assert any("::AVX512::" in n for n in wide) and any("::AVX2::" in n for n in wide), "no variant code found"
    offenders = []
    for n, used in wide.items():
        if "::AVX512::" in n:
            continue
        if "::AVX2::" in n and "avx512" not in used:
            continue
        offenders.append(f"{n}: {sorted(used)}")
    assert not offenders, "wide instructions outside the kernel variants:\n" + "\n".join(offenders[:20])
