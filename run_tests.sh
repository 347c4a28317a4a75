#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (created on first use), on one pytest-xdist worker per
# core (at most 4: each holds TensorFlow and models) unless TEST_WORKERS says otherwise (TEST_WORKERS=0: serially).
# The tests of one cluster or server share a worker (tests/conftest.py: XDIST_GROUPS). Arguments go to pytest,
# after these defaults, so `-n 1` or `-p no:xdist` there wins.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
parallel=()
if [ "$workers" -gt 1 ]; then parallel=(-n "$workers" --dist loadgroup); fi
exec python -m pytest "${parallel[@]}" "$@"  # pytest.ini: testpaths = tests
