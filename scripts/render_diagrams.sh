#!/usr/bin/env bash
# Render the documentation's Graphviz sources to the SVGs checked in beside them
# (needs Graphviz's `dot`: `apt-get install graphviz`).
set -euo pipefail
cd "$(dirname "$0")/../docs/_static"
for src in *.dot; do
  dot -Tsvg "$src" -o "${src%.dot}.svg"
done
