# Sourced by scripts/main.sh and scripts/test.sh: gets a Python environment
# with torch, the build tools and the given extra packages, and builds
# torchiter into it. Exports PY (the interpreter to use).
#
# Inside an active virtual environment that one is used; otherwise .venv in the
# repository is created (once) and used, so the system Python stays untouched.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$(command -v python)"
else
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "== creating $ROOT/.venv"
    python3 -m venv "$ROOT/.venv"
  fi
  PY="$ROOT/.venv/bin/python"
fi
export PY
# torch 2.13.0 (CPU build) is what torchiter is built and tested against here;
# the build needs C++20 headers from it, ninja for parallel compiles.
echo "== installing torch 2.13.0, build tools and: $*"
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0" numpy ninja "setuptools>=70" wheel "$@"
echo "== building torchiter (pip install --no-build-isolation -e .)"
# MAX_JOBS keeps the compile within the machine's cores and memory.
MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --use-pep517 --no-deps -e "$ROOT"
"$PY" -c "import torchiter, torch; print('== torchiter ready: torch', torch.__version__, '| CUDA kernels:', torch._C._dispatch_has_kernel_for_dispatch_key('torchiter::sgd_step_', 'CUDA'))"
