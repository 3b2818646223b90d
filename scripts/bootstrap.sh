# Sourced by scripts/main.sh and scripts/test.sh: gets a Python environment
# with torch, the build tools and the given extra packages, and builds
# torchiter into it unless the build there is already from the same sources.
# Exports PY (the interpreter to use) and ROOT (the repository).
#
# Inside an active virtual environment that one is used; otherwise .venv in the
# repository is created (once) and used, so the system Python stays untouched.
#
# Supported torch: 2.13 and 2.14 (CI tests 2.13.0 CPU and 2.14.1). A torch of
# that range already in the environment is kept; otherwise 2.13.0 (the CPU
# build) is installed. TORCHITER_REBUILD=1 forces the build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SUPPORTED=">=2.13,<2.15"
TORCH_DEFAULT="2.13.0"
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$(command -v python)"
else
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "== creating $ROOT/.venv"
    python3 -m venv "$ROOT/.venv"
  fi
  PY="$ROOT/.venv/bin/python"
fi
export PY ROOT
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if "$PY" -c "import sys, torch; sys.exit(0 if (2, 13) <= tuple(map(int, torch.__version__.split('.')[:2])) < (2, 15) else 1)" 2>/dev/null
then
  TORCH_REQ="torch$TORCH_SUPPORTED"
else
  # A bare `pip install torch` would pull a multi-GB CUDA build: pin the
  # version, which resolves to the CPU build where the index has one.
  TORCH_REQ="torch==$TORCH_DEFAULT"
fi
echo "== installing $TORCH_REQ, build tools and: $*"
"${PIP[@]}" "$TORCH_REQ" numpy ninja "setuptools>=70" wheel "$@"

# The build is reused when its fingerprint matches: every source and build
# file, the torch it was built against, the build options and the machine's
# CPU flags (a build copied to another machine is rebuilt rather than
# trusted). The fingerprint is written beside torchiter/_C*.so after a
# successful build.
build_fingerprint() {
  {
    (cd "$ROOT" && find csrc setup.py pyproject.toml -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    "$PY" -c "import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)"
    for v in FORCE_CUDA FORCE_ONLY_CPU TORCHITER_NO_CUDA TORCHITER_CPU_VARIANTS TORCH_CUDA_ARCH_LIST CUDA_HOME; do
      echo "$v=${!v:-}"
    done
    grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m
  } | sha256sum | cut -d' ' -f1
}
STAMP="$ROOT/torchiter/_C.build-fingerprint"
FINGERPRINT="$(build_fingerprint)"
# The editable install must point at this checkout (a copied .venv or another
# checkout's install would import other sources).
installed_here() {
  (cd / && "$PY" -c "import sys, torchiter; sys.exit(0 if torchiter.__file__.startswith(sys.argv[1]) else 1)" \
    "$ROOT/torchiter/") >/dev/null 2>&1
}
if [ "${TORCHITER_REBUILD:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$FINGERPRINT" ] \
  && compgen -G "$ROOT/torchiter/_C*.so" >/dev/null && installed_here; then
  echo "== reusing the torchiter build (sources, torch and build options unchanged; TORCHITER_REBUILD=1 rebuilds)"
else
  echo "== building torchiter (pip install --no-build-isolation -e .)"
  rm -f "$STAMP"
  # MAX_JOBS keeps the compile within the machine's cores and memory.
  MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" --no-build-isolation --use-pep517 --no-deps -e "$ROOT"
  echo "$FINGERPRINT" >"$STAMP"
fi
"$PY" -c "import torchiter, torch; print('== torchiter ready: torch', torch.__version__, '| CUDA kernels:', torch._C._dispatch_has_kernel_for_dispatch_key('torchiter::sgd_step_', 'CUDA'))"
