#!/usr/bin/env bash
# Install raycache with its test dependencies and run the test suite.
# Reuses an installed torch (pip would otherwise pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0" || "$PY" -m pip install --quiet torch
fi
"$PY" -m pip install --quiet -e ".[test]"
"$PY" -m ruff --version >/dev/null 2>&1 || "$PY" -m pip install --quiet "ruff>=0.6"
"$PY" -m ruff check raycache tests benchmarks examples
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
