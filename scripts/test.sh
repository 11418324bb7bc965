#!/usr/bin/env bash
# Install raycache with its test dependencies, lint, build the docs, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh "test,dev,docs"
"$PY" -m ruff check raycache tests benchmarks examples scripts
"$PY" -m sphinx -W --keep-going -q -b html docs docs/_build/html
# Hyrax 0.13 for the real-Hyrax tests, in a directory of its own (see the script).
[ -d .hyrax-0.13/hyrax ] || bash scripts/hyrax_env.sh
exec "$PY" -m pytest -q -p no:cacheprovider --durations=15 "$@"
