"""Scale of the map: a million-item cache, a new client's start-up and the actor's memory.

Runs only the ``scale`` scenario of ``raycache bench``: it preloads a cache of
``--scale-items`` items (default 1,000,000) of 128 B, times a new process that attaches
and reads one item, and reads the directory actor's RSS and PSS and the size of its map
and event-log arrays. Prints the table; ``--report`` also writes the page with this
scenario alone into ``--out`` (normally ``run_benchmarks.py`` writes it with every
scenario).
"""

import sys
from pathlib import Path

# Run as a script, this file's folder is on the path, not the one holding the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.suite import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    report = "--report" in argv
    argv = [a for a in argv if a != "--report"]
    sys.exit(main(["--only", "scale", *argv, *([] if report else ["--no-report"])]))
