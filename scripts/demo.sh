#!/usr/bin/env bash
# Install raycache and run its demo on an embedded local Ray (arguments go to the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m raycache.cli demo "$@"
