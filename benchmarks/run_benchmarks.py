"""Run raycache's whole benchmark suite; the same as ``raycache bench``.

Every option of ``raycache bench --help`` is accepted, for example
``python benchmarks/run_benchmarks.py --rounds 3 --only warm``. The report goes to
``docs/benchmarks.md`` and ``docs/benchmarks.png`` (``--out`` changes the folder).
"""

import sys

from raycache.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
