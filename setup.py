"""Build of torchiter: one extension, ``torchiter._C``, from ``csrc/``.

CUDA sources (``csrc/ops/cuda/*.cu``) are compiled when a CUDA toolkit is found
and torch can use it, or when ``FORCE_CUDA=1``; ``FORCE_ONLY_CPU=1`` (or
``TORCHITER_NO_CUDA=1``) opts out. CPU kernels are built for AVX2+FMA when the
build machine has them (``TORCHITER_CPU_BASELINE=1`` builds for plain x86-64).
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


def _cpu_has_avx2_fma() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _use_cuda() -> bool:
    if _flag("FORCE_ONLY_CPU") or _flag("TORCHITER_NO_CUDA"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    import torch

    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def extensions():
    with_cuda = _use_cuda()
    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "ops", "**", "*.cpp"), recursive=True)
    )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
    # -ffp-contract=off: FMAs appear only where the kernels ask for them, so the
    # vector body and the partial-load tails round identically.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fvisibility=hidden"]
    vec = "baseline"
    if not _flag("TORCHITER_CPU_BASELINE") and _cpu_has_avx2_fma():
        # ATen's own AVX2 kernels are built the same way: this selects the
        # at::vec AVX2 specialisations in a namespace of their own.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
        vec = "AVX2+FMA"
    macros = []
    ext_cls = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    if with_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources += cuda_sources
        macros.append(("WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    print(f"torchiter build: CPU kernels ({vec}), CUDA kernels: {'yes' if with_cuda else 'no'}")
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
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
