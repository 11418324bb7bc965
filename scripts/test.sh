#!/usr/bin/env bash
# Install raycache with its test dependencies, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh "test,dev"
"$PY" -m ruff check raycache tests benchmarks examples
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
