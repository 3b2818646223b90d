#!/usr/bin/env bash
# Builds torchiter with AddressSanitizer and UndefinedBehaviorSanitizer into a
# separate folder (the normal build is left alone) and runs the op and module
# tests against that build. Any report fails the run: UBSan aborts on the
# first finding, ASan on the first bad access.
# Usage: bash scripts/sanitize.sh [pytest arguments, default: the op and module tests]
source "$(dirname "$0")/bootstrap.sh" pytest -- hypothesis
set -euo pipefail
cd "$ROOT"
OUT="${TORCHITER_SANITIZE_DIR:-$ROOT/build-sanitize}"
mkdir -p "$OUT"
# A copy of the sources: an in-place build there cannot clobber the real one.
# Timestamps are kept, so ninja recompiles only what changed since last time.
rm -rf "$OUT/csrc" "$OUT/torchiter"
cp -a csrc torchiter setup.py pyproject.toml "$OUT/"
rm -f "$OUT"/torchiter/*.so
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
echo "== building torchiter with ASan + UBSan into $OUT"
# The plain x86-64 kernel variant only: the others run the same code on
# wider vectors, and three sanitized builds would triple CI's build time.
# -g1: line tables for the reports' stack traces, at little compile time.
(cd "$OUT" && CFLAGS="$SAN" LDFLAGS="$SAN" TORCHITER_CXXFLAGS="-g1" FORCE_ONLY_CPU=1 TORCHITER_CPU_VARIANTS=default MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1) || { tail -50 "$OUT/build.log"; exit 1; }
# Python itself is not instrumented: the runtimes are preloaded. Leak checks
# are off (the interpreter keeps its own allocations until exit).
ASAN_LIB="$(gcc -print-file-name=libasan.so)"
UBSAN_LIB="$(gcc -print-file-name=libubsan.so)"
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  # test_cpu_variants.py's op suites (its OP_SUITES, read from there so the
  # two lists cannot drift apart) and more: this build is the plain x86-64
  # variant, so CI runs that variant's suites here.
  mapfile -t TESTS < <("$PY" - tests/test_cpu_variants.py <<'EOF'
import ast, sys
for node in ast.parse(open(sys.argv[1]).read()).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "OP_SUITES" for t in node.targets):
        print("\n".join(ast.literal_eval(node.value)))
EOF
  )
  [ ${#TESTS[@]} -gt 0 ] || { echo "== no OP_SUITES list found in tests/test_cpu_variants.py"; exit 1; }
  TESTS+=(tests/test_quadratic_descent_ex.py tests/test_no_silent_failures.py tests/test_properties.py
          tests/test_modules.py tests/test_models.py)
fi
echo "== running under the sanitizers: ${TESTS[*]}"
LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
PYTHONPATH="$OUT${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
