"""Run raycache's whole benchmark suite; the same as ``raycache bench``.

Every option of ``raycache bench --help`` is accepted, for example
``python benchmarks/run_benchmarks.py --rounds 3 --only warm``. The report goes to
``./raycache-bench-results/benchmarks.md`` and ``benchmarks.png``; ``--out DIR`` changes
the folder (``--out docs`` rewrites the repository's page).
"""

import sys
from pathlib import Path

# Run as a script, this file's folder is on the path, not the one holding the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
