#!/usr/bin/env bash
# Install raycache with its test dependencies, lint, build the docs, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh "test,dev,docs"
"$PY" -m ruff check raycache tests benchmarks examples scripts
"$PY" -m sphinx -W --keep-going -q -b html docs docs/_build/html
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
