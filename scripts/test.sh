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
exec "$PY" -m pytest -q -p no:cacheprovider --durations=15 "$@"
