#!/usr/bin/env bash
# Install raycache with its test dependencies, lint, and run the whole test suite (which
# builds the documentation site with warnings as errors: tests/test_docs_site.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh "test,dev,docs"
"$PY" -m ruff check raycache tests benchmarks examples scripts
# Hyrax 0.13 for the real-Hyrax tests, in a directory of its own (see the script).
[ -d .hyrax-0.13/hyrax ] || bash scripts/hyrax_env.sh
# The suite runs in two parts. First every test but the memory measurements, in two
# pytest-xdist workers that take whole files (a module keeps its Ray for all its tests:
# tests/conftest.py); then the tests marked `alone` (they measure the node's memory, which
# another test's processes beside them would move), one after another.
# Exit status 5 (no test selected: arguments that pick only one part) counts as success
# unless both parts select nothing.
run() { "$PY" -m pytest -q -p no:cacheprovider --durations=15 "$@"; }
status=0
run -n "${RAYCACHE_TEST_WORKERS:-2}" --dist loadfile -m "not alone" "$@" || status=$?
alone=0
run -m alone "$@" || alone=$?
if [ "$status" -eq 5 ] && [ "$alone" -ne 5 ]; then status=0; fi
if [ "$alone" -ne 0 ] && [ "$alone" -ne 5 ]; then status=$alone; fi
exit "$status"
