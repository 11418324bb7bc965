#!/usr/bin/env bash
# Install raycache (editable) with the extras named in $1 (default: none).
# torch: reuse an installed torch; otherwise ask for 2.13.0, which on these machines
# resolves to a local CPU wheel (PyPI's default torch is a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0" || "$PY" -m pip install --quiet torch
fi
if [ -n "$extras" ]; then
  "$PY" -m pip install --quiet -e ".[$extras]"
else
  "$PY" -m pip install --quiet -e .
fi
