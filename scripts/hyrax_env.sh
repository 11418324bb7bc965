#!/usr/bin/env bash
# Install Hyrax 0.13 and the few of its dependencies the real-Hyrax tests need into a
# target directory (default: .hyrax-0.13 at the repository root), apart from the main
# environment: Hyrax 0.13 declares ~40 dependencies (mlflow, chromadb, lancedb, onnx, ...)
# that a cache test never uses. The tests put this directory on PYTHONPATH of the Hyrax
# subprocesses they start, and stand in for the rest (tests/hyrax09_standins.py), among
# them torchvision, whose registry wheel does not load against the CPU torch here.
#
# Usage: scripts/hyrax_env.sh [TARGET]     (tests read RAYCACHE_HYRAX013_DIR if set)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:-${RAYCACHE_HYRAX013_DIR:-$root/.hyrax-0.13}}"
mkdir -p "$target"
# --no-deps: only these, never an upgrade of torch, numpy or ray in the main environment.
python3 -m pip install --quiet --no-deps --target "$target" \
    "hyrax==0.13" "pytorch-ignite==0.5.3" tomlkit toml more-itertools \
    astropy pyerfa astropy-iers-data
# Nothing in the directory is the project's: keep it out of git.
echo '*' > "$target/.gitignore"
echo "Hyrax 0.13 installed in $target"
