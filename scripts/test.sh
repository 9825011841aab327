#!/usr/bin/env bash
# Run the test suite (after scripts/setup.sh). Extra arguments go to pytest.
# The fast subset (`-m "not multirank"`: single-process tests only) runs on both cores with pytest-xdist;
# the tests that start rank processes run one at a time (they size threads and timeouts for the whole machine).
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
if [[ " $* " == *"not multirank"* ]] && .venv/bin/python -c "import xdist" 2>/dev/null; then
    args=(-n "${MOECLUSTER_TEST_WORKERS:-2}" "${args[@]}")
fi
exec .venv/bin/python -m pytest -q "${args[@]}"
