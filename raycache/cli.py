"""The ``raycache`` command: run the demo or benchmarks, and inspect or drop caches."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _stats(args: argparse.Namespace) -> int:
    from raycache.admin import cache_stats

    print(json.dumps(cache_stats(args.name, args.namespace, args.address), indent=2, default=str))
    return 0


def _list(args: argparse.Namespace) -> int:
    from raycache.admin import list_caches

    for name in list_caches(args.namespace, args.address):
        print(name)
    return 0


def _drop(args: argparse.Namespace) -> int:
    from raycache.admin import drop_cache

    if drop_cache(args.name, args.namespace, args.address):
        print(f"dropped {args.name}")
        return 0
    print(f"no cache named {args.name!r} in namespace {args.namespace!r}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the ``raycache`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from raycache.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "bench":
        from raycache.bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="raycache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help="train a small CNN on synthetic cutouts, with and without the cache"
    )
    sub.add_parser("bench", help="run the benchmark suite and write docs/benchmarks.md")
    for command, helptext, func in (
        ("stats", "print a cache's counters as JSON", _stats),
        ("list", "list the caches on the cluster", _list),
        ("drop", "free a cache by name", _drop),
    ):
        p = sub.add_parser(command, help=helptext)
        if command != "list":
            p.add_argument("name")
        p.add_argument("--namespace", default="raycache")
        p.add_argument("--address", default=None, help="Ray address (default: the running Ray)")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
