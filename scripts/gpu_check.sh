#!/usr/bin/env bash
# The GPU check: one command for a machine with an NVIDIA GPU, the CUDA toolkit
# (nvcc) and a CUDA build of a supported torch. About 5-8 minutes on one H200
# with 16 cores. Usage: bash scripts/gpu_check.sh
#
# 1. build: torchiter with its CUDA kernels (FORCE_CUDA=1) for the card's
#    architecture, one compile per core (scripts/bootstrap.sh: the same
#    environment as the README's commands; offline it installs nothing);
# 2. tests: tests/test_cuda*.py and the op suites on `cuda`
#    (test_sgd_step.py, test_quadratic_descent.py, test_quadratic_descent_ex.py);
# 3. backward: the CUDA backward of quadratic_descent (test_quadratic_descent_grad.py);
# 4. cuda_graph: the CUDA-graph variant of compiled iterations (test_compiled.py);
# 5. memcheck, racecheck, synccheck: compute-sanitizer on a short op test
#    (both ops, every kernel path, a few sizes), where it is installed and runs;
# 6. bench_cuda: benchmarks/bench_cuda.py; vs_compile: benchmarks/bench_vs_compile.py
#    --device cuda (the whole-loop op against a compiled loop, with and without
#    CUDA graphs).
# Every step runs even when an earlier one failed (a GPU's time is short); the
# raw output of each goes to benchmarks/results/<gpu>_<step>.txt (<gpu> as
# bench_cuda.py names it, e.g. nvidia-h200) and a summary to
# benchmarks/results/<gpu>_summary.txt. Exits non-zero when a step failed.
#
# Without a GPU it builds (with the CUDA kernels when torch is a CUDA build and
# nvcc is there, for TORCH_CUDA_ARCH_LIST, default 9.0), says that each GPU step
# is skipped, writes into build/gpu_check/ instead and exits 0.
#
# Environment (optional): TORCH_CUDA_ARCH_LIST (default: the GPU's compute
# capability), MAX_JOBS (default: the cores), CUDA_HOME (default: nvcc's
# folder's parent, else /usr/local/cuda), GPU_CHECK_BENCH_ARGS (arguments
# for bench_cuda.py), GPU_CHECK_SANITIZER_TIMEOUT (seconds per tool, default 150).
# Each step has a time limit (build 15 min, GPU_CHECK_BUILD_TIMEOUT seconds;
# tests 5, bench_cuda 4, others 2-2.5), so a hang costs one step, not the
# machine's whole time.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS

if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null; then CUDA_HOME="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"; else CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME
export PATH="$PATH:$CUDA_HOME/bin"

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ' || true)"
if [ -n "$GPU_NAME" ]; then
  GPU="$(echo "$GPU_NAME" | sed -E 's/[^A-Za-z0-9]+/-/g; s/^-+|-+$//g' | tr 'A-Z' 'a-z')"
  OUT=benchmarks/results
  [ -n "$CAP" ] && export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CAP}"
else
  GPU=nogpu
  OUT=build/gpu_check
fi
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
SUMMARY="$OUT/${GPU}_summary.txt"
: >"$SUMMARY"
FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS, its output
# to the terminal and to $OUT/<gpu>_NAME.txt, and notes PASS/FAIL and the time.
step() {
  local name="$1" limit="$2" t0=$SECONDS rc
  shift 2
  echo; echo "== $name: $*"
  { echo "# $(date -Iseconds) ${GPU_NAME:-no GPU}: $*"; timeout --kill-after=10 "$limit" "$@" 2>&1; } | tee "$OUT/${GPU}_$name.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    note "$name: PASS ($((SECONDS - t0)) s)"
  else
    [ "$rc" = 124 ] && rc="timed out after $limit s" || rc="exit $rc"
    note "$name: FAIL ($rc, $((SECONDS - t0)) s; $OUT/${GPU}_$name.txt)"
    FAILED=1
  fi
  return 0
}

note "# gpu_check $(date -Iseconds): ${GPU_NAME:-no GPU} (compute capability ${CAP:-?}), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# 1. The build, in the environment bootstrap.sh picks: the active virtual
# environment, else .venv, else (before .venv exists) python3's packages.
if [ -n "${VIRTUAL_ENV:-}" ]; then CANDIDATE=python; elif [ -x .venv/bin/python ]; then CANDIDATE=.venv/bin/python; else CANDIDATE=python3; fi
TORCH_KIND="$("$CANDIDATE" -c 'import torch; print("cuda" if torch.version.cuda else "cpu")' 2>/dev/null || echo none)"
if [ -n "$GPU_NAME" ] || { [ -x "$CUDA_HOME/bin/nvcc" ] && [ "$TORCH_KIND" = cuda ]; }; then
  export FORCE_CUDA=1
fi
# bootstrap.sh runs once, in a subshell (it exits on failure), and leaves
# the interpreter it picked in a file.
PY_FILE="$(mktemp "${TMPDIR:-/tmp}/torchiter-py.XXXXXX")"
step build "${GPU_CHECK_BUILD_TIMEOUT:-$([ -n "$GPU_NAME" ] && echo 900 || echo 3600)}" bash -c 'source scripts/bootstrap.sh pytest -- hypothesis numpy && echo "$PY" >"$1"' bootstrap "$PY_FILE"
PY="$(cat "$PY_FILE")"
rm -f "$PY_FILE"
if grep -q "^build: FAIL" "$SUMMARY" || [ -z "$PY" ]; then
  note "gpu_check: the build failed; nothing else can run"
  exit 1
fi

# The short op test that runs under compute-sanitizer (step 5); argument: the device.
SAN_TEST="$(mktemp "${TMPDIR:-/tmp}/torchiter-sanitize.XXXXXX.py")"
trap 'rm -f "$SAN_TEST"' EXIT
cat >"$SAN_TEST" <<'EOF'
"""Both ops on the GPU, each kernel path at a few sizes (tails, many tensors,
every channel bucket and the cuBLAS path, stop tests, per-sample statistics,
the backward), checked against the CPU kernels. Seconds without a tool."""
import sys

import torch
from torchiter.ops import quadratic_descent, quadratic_descent_ex, sgd_step_

d = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.float64):
    for sizes in ((1,), (7, 33), (4097,), (70001,), tuple(range(1, 40))):
        for momentum in (0.0, 0.9):
            p = [torch.randn(n).to(dtype) for n in sizes]
            g = [torch.randn(n).to(dtype) for n in sizes]
            b = [torch.zeros(n, dtype=dtype) for n in sizes] if momentum else []
            pc, gc, bc = ([t.to(d) for t in ts] for ts in (p, g, b))
            for params, grads, bufs in ((p, g, b), (pc, gc, bc)):
                sgd_step_(params, grads, bufs, 0.1, momentum, 0.0, 0.01, False, False, True, 0.01, -1.0, 1.0)
            for x, y in zip(p, pc):
                torch.testing.assert_close(y.cpu(), x, rtol=2e-3, atol=2e-3)
for B, C, spatial in ((1, 1, ()), (1000, 3, ()), (37, 9, ()), (5, 17, (3,)), (3, 33, (7, 7)), (2, 50, (9,)),
                      (2, 65, (5,))):
    q, _ = torch.linalg.qr(torch.randn(C, C, dtype=torch.float64))
    A = (q * torch.linspace(0.5, 1.5, C, dtype=torch.float64)) @ q.T
    y0, b = (torch.randn(B, C, *spatial, dtype=torch.float64) for _ in range(2))
    for dtype in (torch.float32, torch.float64):
        cpu = [t.to(dtype) for t in (y0, A, b)]
        gpu = [t.to(d) for t in cpu]
        for tol, proj in ((0.0, {}), (1e-4, dict(min=0.0)), (1e-4, dict(shrink=0.01))):
            ref = quadratic_descent(*cpu, 0.3, 20, tol, **proj)[0]
            out = quadratic_descent(*gpu, 0.3, 20, tol, **proj)[0]
            torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
            for per_sample, trace in ((True, False), (False, True)):
                ref = quadratic_descent_ex(*cpu, 0.3, 20, tol, per_sample=per_sample, trace=trace, **proj).y
                out = quadratic_descent_ex(*gpu, 0.3, 20, tol, per_sample=per_sample, trace=trace, **proj).y
                torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    Ag = A.to(d).float().requires_grad_(True)
    bg = b.to(d).float().requires_grad_(True)
    quadratic_descent(y0.to(d).float(), Ag, bg, 0.3, 20)[0].sum().backward()
if d.type == "cuda":
    torch.cuda.synchronize()
print("sanitizer op test: done")
EOF

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  TV="$("$PY" -c 'import torch; print(torch.__version__)')"
  for s in tests backward cuda_graph memcheck racecheck synccheck bench_cuda vs_compile; do
    note "$s: skipped (no CUDA device visible to torch $TV)"
  done
  # What can run without one: the sanitizer's op test on the CPU kernels and
  # the benchmark's no-GPU path.
  step san_test_on_cpu 300 "$PY" "$SAN_TEST" cpu
  step bench_cuda_without_gpu 60 "$PY" benchmarks/bench_cuda.py --no-save
  note "gpu_check: built, no GPU here: the GPU steps were skipped ($((SECONDS - START)) s; outputs in $OUT)"
  exit "$FAILED"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch
import torchiter  # noqa: F401

p = torch.cuda.get_device_properties(0)
print(f"# torch {torch.__version__} (CUDA {torch.version.cuda}), {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"{p.multi_processor_count} SMs, compute capability {p.major}.{p.minor}")
for op in ("sgd_step_", "sgd_step_.tensor_lr", "quadratic_descent", "quadratic_descent_ex", "quadratic_descent_backward"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"torchiter::{op}", "CUDA"):
        print(f"registered: FAIL: no CUDA kernel for torchiter::{op}")
EOF
grep -q "^registered: FAIL" "$SUMMARY" && FAILED=1

# 2-4. The CUDA tests. -rs lists why anything skipped.
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
step tests 300 "${PYTEST[@]}" tests/test_cuda*.py tests/test_sgd_step.py tests/test_quadratic_descent.py \
  tests/test_quadratic_descent_ex.py tests/test_quadratic_descent_rest.py tests/test_quadratic_descent_fixed.py -k cuda
step backward 120 "${PYTEST[@]}" tests/test_quadratic_descent_grad.py -k cuda
step cuda_graph 120 "${PYTEST[@]}" tests/test_compiled.py tests/test_cuda.py -k cuda_graph

# 5. compute-sanitizer on a short op test. The caching allocator is off, so
# every tensor is an allocation of its own and an access past its end is seen.
SANITIZER="$(command -v compute-sanitizer || true)"
[ -z "$SANITIZER" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
for tool in memcheck racecheck synccheck; do
  if [ -z "$SANITIZER" ]; then
    note "$tool: skipped (compute-sanitizer not found on PATH or in $CUDA_HOME/bin)"
    continue
  fi
  t0=$SECONDS
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${GPU_CHECK_SANITIZER_TIMEOUT:-150}" \
    "$SANITIZER" --tool "$tool" --print-limit 50 "$PY" "$SAN_TEST" >"$OUT/${GPU}_$tool.txt" 2>&1
  rc=$?
  tail -n 5 "$OUT/${GPU}_$tool.txt"
  f="$OUT/${GPU}_$tool.txt"
  if grep -q "ERROR SUMMARY: 0 errors" "$f" && grep -q "sanitizer op test: done" "$f"; then
    note "$tool: PASS, no errors ($((SECONDS - t0)) s)"
  elif grep -qE "ERROR SUMMARY: [1-9]" "$f"; then
    note "$tool: FAIL, errors reported ($f)"; FAILED=1
  elif [ "$rc" = 124 ]; then
    note "$tool: FAIL, timed out after ${GPU_CHECK_SANITIZER_TIMEOUT:-150} s ($f)"; FAILED=1
  elif grep -q "ERROR SUMMARY" "$f"; then
    note "$tool: FAIL, the op test failed under the tool (exit $rc; $f)"; FAILED=1
  else
    # No summary: the tool could not attach (no support in this driver or
    # container), which says nothing about the kernels.
    note "$tool: skipped, compute-sanitizer did not run here (exit $rc; $f)"
  fi
done

# 6. The benchmark (its own result file is not written: the raw output is
# kept here as <gpu>_bench_cuda.txt).
# shellcheck disable=SC2086
step bench_cuda 240 "$PY" benchmarks/bench_cuda.py --no-save ${GPU_CHECK_BENCH_ARGS:-}
step vs_compile 300 "$PY" benchmarks/bench_vs_compile.py --device cuda --rounds 3 --min-time 0.1

note "gpu_check: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL) ($((SECONDS - START)) s); outputs in $OUT/${GPU}_*.txt"
exit "$FAILED"
