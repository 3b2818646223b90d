#!/usr/bin/env bash
# Sets up and builds torchiter, then runs the test suite. Extra arguments go to
# pytest. Usage: bash scripts/test.sh [-k PATTERN]
# pytest is needed; the rest only by some tests, which skip themselves when
# it is missing (bootstrap.sh says which).
source "$(dirname "$0")/bootstrap.sh" pytest -- hypothesis numpy scikit-learn matplotlib tqdm mlxtend
cd "$ROOT"
echo "== running the tests"
"$PY" -m pytest -q tests "$@"
