"""Build of torchiter: one extension, ``torchiter._C``, from ``csrc/``.

CUDA sources (``csrc/ops/cuda/*.cu``) are compiled when a CUDA toolkit is found
and torch can use it, or when ``FORCE_CUDA=1``; ``FORCE_ONLY_CPU=1`` (or
``TORCHITER_NO_CUDA=1``) opts out. On x86-64 the CPU kernels are built in three
variants (plain x86-64, AVX2+FMA, AVX-512), whatever the build machine runs;
the library picks one when it loads (``TORCHITER_CPU_CAPABILITY`` forces a
narrower one). Elsewhere they are built once, on at::vec's portable code.
Build against the installed torch: ``pip install --no-build-isolation .``
Supported torch: ``TORCH_REQUIREMENT`` below; what differs between those
versions for the build is in ``_cxx_std()``.
"""

import glob
import os
import platform
import shlex

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The torch releases torchiter supports. CI builds and tests 2.11 (with the
# CUDA kernels), 2.13 and 2.14; scripts/bootstrap.sh reads this line.
TORCH_REQUIREMENT = "torch>=2.10,<2.15"
TORCH_MIN, TORCH_END = (2, 10), (2, 15)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# The CPU kernel files (csrc/ops/cpu/kernels/*.cpp) are compiled once per
# instruction-set variant, as ATen builds its own kernels: CPU_CAPABILITY names
# the variant and puts its code, at::vec included, in a namespace of that
# name; csrc/ops/cpu/capability.cpp picks one at run time. Only these files
# get instruction-set flags. Listed narrowest first: that is also the link
# order, so where variants share an inline function of a header (a std::
# template, say) the linker keeps the DEFAULT copy, which every CPU runs.
KERNEL_DIR = os.path.join("csrc", "ops", "cpu", "kernels")
CPU_VARIANTS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _openmp_flags() -> list:
    """-fopenmp when torch's parallel backend is OpenMP (its CPU wheels).

    at::parallel_for is a header template: its ``#pragma omp parallel`` is
    compiled into this library, so without -fopenmp every parallel loop runs
    on one thread. The link then needs libgomp.so.1, which resolves to the
    copy torch has already loaded (torch/lib), so torch.set_num_threads
    governs these loops too.
    """
    import torch

    if "OpenMP" not in torch.__config__.parallel_info() or platform.system() == "Darwin":
        return []
    return ["-fopenmp"]


def _torch_version() -> tuple:
    import torch

    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def _check_torch() -> None:
    """Refuses a torch outside the supported range (a build would fail obscurely or not be tested)."""
    import torch

    if not TORCH_MIN <= _torch_version() < TORCH_END and not _flag("TORCHITER_ANY_TORCH"):
        raise RuntimeError(
            f"torchiter supports {TORCH_REQUIREMENT}; the installed torch is {torch.__version__} "
            "(TORCHITER_ANY_TORCH=1 builds anyway, untested)"
        )


def _cxx_std() -> str:
    """The C++ standard of the installed torch's headers: -std=c++20 from torch 2.13, -std=c++17 before.

    The one place where the build differs between supported torch versions:
    each torch's cpp_extension compiles extensions with that standard, and
    torch 2.13's headers need C++20. The sources compile as either.
    """
    return "-std=c++20" if _torch_version() >= (2, 13) else "-std=c++17"


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


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the CPU kernel files once per variant.

    Each variant is compiled by the same (ninja) compile step as the other
    sources, into a folder of its own with its flags added, and its objects
    are linked into the extension after the others.
    """

    def build_extension(self, ext):
        variants = getattr(ext, "cpu_variants", None)
        if variants:
            kernels = sorted(glob.glob(os.path.join(KERNEL_DIR, "*.cpp")))
            base = ext.extra_compile_args
            objects = []
            for name in variants:
                flags = dict(base) if isinstance(base, dict) else {"cxx": list(base)}
                flags["cxx"] = list(flags["cxx"]) + CPU_VARIANTS[name]
                objects += self.compiler.compile(
                    kernels,
                    output_dir=os.path.join(self.build_temp, f"cpu_{name}"),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=flags if self.use_ninja else flags["cxx"],
                    depends=ext.depends,
                )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        if _links_libstdcxx_statically(self.compiler, self.build_temp, self.use_ninja):
            ext.extra_link_args = list(ext.extra_link_args or []) + ["-l:libstdc++.so.6"]
            print("torchiter build: the linker adds libstdc++ statically (-static-libstdc++ in its "
                  "configuration); linking the shared libstdc++.so.6 instead, as torch does")
        super().build_extension(ext)


def _links_libstdcxx_statically(compiler, build_temp, use_ninja) -> bool:
    """Whether this toolchain links a C++ shared library against a static libstdc++.

    Some toolchains (a compiler wrapper or specs file that adds
    ``-static-libstdc++``) do. The extension then carries its own copy of
    libstdc++ beside the shared one torch loads, and the two disagree about
    the ids of locale facets: formatting a number into an error message (every
    ``TORCH_CHECK`` that names a size or an index) reads the wrong facet, which
    truncated the message on one machine and crashed the process on another.
    Linking the shared library explicitly, after the objects, keeps libstdc++'s
    archive out. Found by linking a one-function probe and reading its
    ``NEEDED`` entries; False where that cannot be done (not Linux/ELF, no
    readelf), which leaves the link as it was.
    """
    import shutil
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or shutil.which("readelf") is None:
        return False
    probe_dir = os.path.join(build_temp, "libstdcxx_probe")
    os.makedirs(probe_dir, exist_ok=True)
    src = os.path.join(probe_dir, "probe.cpp")
    with open(src, "w") as f:
        f.write("#include <sstream>\n#include <string>\n"
                "std::string torchiter_probe(unsigned long n) { std::ostringstream s; s << n; return s.str(); }\n")
    try:
        # Under torch's ninja build, compile takes its flags per compiler.
        objects = compiler.compile([src], output_dir=probe_dir, extra_postargs={"cxx": ["-fPIC"]} if use_ninja else ["-fPIC"])
        lib = os.path.join(probe_dir, "libprobe.so")
        compiler.link_shared_object(objects, lib, target_lang="c++")
        dynamic = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
    except Exception:  # noqa: BLE001 - a failed probe must not fail the build
        return False
    return "libstdc++.so" not in dynamic


def extensions():
    _check_torch()
    std = _cxx_std()
    with_cuda = _use_cuda()
    sources = sorted(
        p
        for p in glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "ops", "**", "*.cpp"), recursive=True)
        if os.path.dirname(p) != KERNEL_DIR
    )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
    # -ffp-contract=off: FMAs appear only where the kernels ask for them, so the
    # vector body and the partial-load tails round identically.
    # -g0: Python's own CFLAGS ask for debug info, which makes every compile
    # of torch's headers about 40% slower and the library five times larger.
    # TORCHITER_CXXFLAGS adds flags after these (scripts/sanitize.sh: -g1).
    cxx = ["-O3", "-g0", std, "-ffp-contract=off", "-fvisibility=hidden"] + _openmp_flags()
    cxx += shlex.split(os.environ.get("TORCHITER_CXXFLAGS", ""))
    # TORCHITER_CPU_VARIANTS=default builds the plain x86-64 variant alone
    # (quicker builds where speed does not matter: sanitizers, compile checks).
    all_variants = _x86() and os.environ.get("TORCHITER_CPU_VARIANTS", "all").lower() != "default"
    variants = list(CPU_VARIANTS) if all_variants else ["default"]
    macros = [("TORCHITER_CPU_X86_VARIANTS", None)] if all_variants else []
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
            std,
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
    import torch

    print(f"torchiter build: torch {torch.__version__}, {std[5:].upper()}; CPU kernel variants {', '.join(variants)}; CUDA kernels: {'yes' if with_cuda else 'no'}{arch}")
    ext = ext_cls(
        "torchiter._C",
        sources,
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=_openmp_flags(),
        depends=sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)),
    )
    ext.cpu_variants = variants
    return [ext]


setup(
    name="torchiter",
    version="0.1.0",
    description="Fast iteration modules (forward pass = optimisation loop) for PyTorch",
    packages=find_packages(include=["torchiter", "torchiter.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=[TORCH_REQUIREMENT],
    zip_safe=False,
)
