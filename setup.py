"""Build of torchiter: one extension, ``torchiter._C``, from ``csrc/``.

CUDA sources (``csrc/ops/cuda/*.cu``) are compiled when a CUDA toolkit is found
and torch can use it, or when ``FORCE_CUDA=1``; ``FORCE_ONLY_CPU=1`` (or
``TORCHITER_NO_CUDA=1``) opts out. CPU kernels are built for the widest vector
instruction set of the build machine (AVX-512, else AVX2+FMA, else plain
x86-64); ``TORCHITER_CPU_ISA=avx512|avx2|baseline`` chooses it.
Build against the installed torch: ``pip install --no-build-isolation .``
"""

import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# at::vec specialisations by instruction set, as ATen builds its own kernels:
# each defines CPU_CAPABILITY, which puts at::vec in a namespace of its own.
_ISA_FLAGS = {
    "avx512": (["avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"],
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]),
    "avx2": (["avx2", "fma"],
             ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]),
    "baseline": ([], []),
}


def _cpu_isa() -> str:
    """The widest instruction set of the build machine that the kernels use.

    TORCHITER_CPU_ISA=avx512|avx2|baseline overrides it (baseline also via
    TORCHITER_CPU_BASELINE=1), e.g. to build for other machines.
    """
    forced = os.environ.get("TORCHITER_CPU_ISA") or ("baseline" if _flag("TORCHITER_CPU_BASELINE") else "")
    if forced:
        if forced not in _ISA_FLAGS:
            raise SystemExit(f"TORCHITER_CPU_ISA must be one of {sorted(_ISA_FLAGS)}, got {forced!r}")
        return forced
    if platform.machine() not in ("x86_64", "AMD64"):
        return "baseline"
    try:
        with open("/proc/cpuinfo") as f:
            line = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        return "baseline"
    have = set(line.split(":", 1)[-1].split())
    for isa in ("avx512", "avx2"):
        if set(_ISA_FLAGS[isa][0]) <= have:
            return isa
    return "baseline"


def _use_cuda() -> bool:
    if _flag("FORCE_ONLY_CPU") or _flag("TORCHITER_NO_CUDA"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    import torch

    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def _cuda_library_headers() -> None:
    """Points CUDA_INC_PATH at the CUDA wheels' headers when the toolkit lacks them.

    ATen's CUDA headers include cuSPARSE/cuBLAS/cuSOLVER headers; a bare toolkit
    (nvcc and the runtime only) does not ship them, but the nvidia-* wheels that
    a CUDA build of torch depends on do. torch appends CUDA_INC_PATH after
    CUDA_HOME/include, so the toolkit's own headers still win.
    """
    if os.environ.get("CUDA_INC_PATH") or cpp_extension.CUDA_HOME is None:
        return
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return
    for root in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")):
                os.environ["CUDA_INC_PATH"] = inc
                return


def extensions():
    with_cuda = _use_cuda()
    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "ops", "**", "*.cpp"), recursive=True)
    )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
    # -ffp-contract=off: FMAs appear only where the kernels ask for them, so the
    # vector body and the partial-load tails round identically.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fvisibility=hidden"]
    vec = _cpu_isa()
    cxx += _ISA_FLAGS[vec][1]
    macros = []
    ext_cls = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    if with_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources += cuda_sources
        macros.append(("WITH_CUDA", None))
        # --fmad=false: like -ffp-contract=off for the CPU kernels, FMAs appear
        # only where the kernels ask for them, so CPU and CUDA round alike.
        extra["nvcc"] = [
            "-O3",
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "--fmad=false",
            "-Xcompiler",
            "-fvisibility=hidden",
        ]
        _cuda_library_headers()
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            import torch

            if torch.cuda.device_count() == 0:
                # No GPU to take the architecture from (a build or CI machine):
                # build for H100/H200. Set TORCH_CUDA_ARCH_LIST to override.
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    arch = f" (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})" if with_cuda else ""
    print(f"torchiter build: CPU kernels ({vec}), CUDA kernels: {'yes' if with_cuda else 'no'}{arch}")
    return [
        ext_cls(
            "torchiter._C",
            sources,
            define_macros=macros,
            extra_compile_args=extra,
        )
    ]


setup(
    name="torchiter",
    version="0.1.0",
    description="Fast iteration modules (forward pass = optimisation loop) for PyTorch",
    packages=find_packages(include=["torchiter", "torchiter.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.13,<2.15"],  # what CI tests: 2.13.0 CPU and 2.14.1
    zip_safe=False,
)
