"""``raycache bench``: find the benchmark suite in the source tree and run it.

The suite (``benchmarks/``) and its report template (``docs/benchmarks-template.md``) are
part of the repository, not of the installed package: they need the ``bench`` extra and
write figures about this repository. An editable install (``pip install -e '.[bench]'``)
has both next to the ``raycache`` package; a wheel has neither, and ``main`` then says so
in one line and returns 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import raycache

__all__ = ["BenchmarksNotFound", "main", "source_root"]

# What must exist under the source root for the suite to run.
_NEEDED = ("benchmarks/suite.py", "docs/benchmarks-template.md")


class BenchmarksNotFound(RuntimeError):
    """The benchmark suite is not next to the installed ``raycache`` package."""


def source_root(root: Path | None = None) -> Path:
    """Return the source tree that holds ``benchmarks/`` and the report template.

    Parameters
    ----------
    root : Path, optional
        Where to look; default the folder above the imported ``raycache`` package.

    Returns
    -------
    Path
        The source root.

    Raises
    ------
    BenchmarksNotFound
        If ``benchmarks/suite.py`` or ``docs/benchmarks-template.md`` is missing there.
    """
    root = Path(raycache.__file__).resolve().parent.parent if root is None else Path(root)
    missing = [name for name in _NEEDED if not (root / name).is_file()]
    if missing:
        raise BenchmarksNotFound(
            f"the benchmark suite runs from raycache's source tree, and {root} has no "
            f"{' or '.join(missing)}: clone the repository and install it with "
            "pip install -e '.[bench]', or run python benchmarks/run_benchmarks.py there"
        )
    return root


def main(argv: list[str] | None = None) -> int:
    """Run ``raycache bench`` with ``argv`` (see ``raycache bench --help``).

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The suite's exit status; 2 when the suite is not found.
    """
    try:
        root = source_root()
    except BenchmarksNotFound as exc:
        print(f"raycache bench: {exc}", file=sys.stderr)
        return 2
    if not sys.path or sys.path[0] != str(root):
        sys.path.insert(0, str(root))  # first: no other ``benchmarks`` may shadow it
    import benchmarks

    found = Path(benchmarks.__file__).resolve().parent
    if found != root / "benchmarks":
        print(
            f"raycache bench: the module benchmarks was imported from {found}, not from "
            f"{root / 'benchmarks'}: run raycache bench in a fresh process",
            file=sys.stderr,
        )
        return 2
    from benchmarks.suite import main as suite_main

    return suite_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
