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
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
