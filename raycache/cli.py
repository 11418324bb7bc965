"""The raycache command: fill, inspect and drop caches; run the demo and benchmarks.

Every command exits 0 on success and otherwise prints one line on stderr and exits
non-zero (1: the operation failed, 2: bad usage or config, 3: no Ray running or none
answering). Inspection commands (list, stats, drop) never start a Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, NoReturn

from raycache.command_text import (
    DEFAULT_NAMESPACE,
    positive_seconds,
    seconds_text,
    suggested_command,
)

__all__ = ["EXIT_FAILED", "EXIT_NO_RAY", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_RAY = 3

DESCRIPTION = """\
raycache keeps training data in Ray's shared object store, one cache per name,
shared by every process on the cluster. Run 'raycache COMMAND --help' for a
command's options.

exit status: 0 success, 1 the operation failed, 2 bad usage or config,
3 no Ray running or none answering at the address.
"""


class CommandError(Exception):
    """A command failed; the message is the one line shown to the user."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, then exit 2.

    Every usage error (unknown option, missing or extra argument, bad choice, bad value)
    reads ``PROG: message (see 'PROG --help')``, where PROG is ``raycache`` or
    ``raycache COMMAND``; the usage block argparse prints is left to ``--help``.
    """

    def error(self, message: str) -> NoReturn:
        """Print the usage error as one line and exit with status 2.

        Parameters
        ----------
        message : str
            What argparse found wrong.
        """
        text = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: {text} (see '{self.prog} --help')\n")


class _DropTokenNotice(logging.Filter):
    """Drop Ray's notice that token authentication is on (it is, and stays on).

    Ray logs it on every ``ray.init`` of a process that finds a token; on a command
    the user runs many times it is noise. Authentication itself is untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


def _quiet_ray() -> None:
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropTokenNotice()
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray address (host:port, ray://host:port or auto); default: RAY_ADDRESS, "
        "then a Ray started with 'ray start', then this user's node Ray",
    )
    parser.add_argument(
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help="Ray namespace of the caches (default: raycache, or the config's for preload)",
    )


def _human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _list(args: argparse.Namespace) -> int:
    from raycache.admin import cache_summaries
    from raycache.runtime import NoRayRunningError

    namespace = None if args.all_namespaces else args.namespace
    try:
        rows = cache_summaries(namespace, args.address, timeout=args.timeout)
    except NoRayRunningError as exc:
        if args.json:
            print("[]")
        print(f"raycache list: {exc}; no caches", file=sys.stderr)
        return EXIT_OK
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        where = "any namespace" if namespace is None else f"namespace {namespace!r}"
        print(f"no caches in {where}", file=sys.stderr)
        return EXIT_OK
    header = ("NAME", "NAMESPACE", "ITEMS", "BYTES", "CLIENTS", "KEPT", "PRELOAD")
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append((row["name"], row["namespace"], "-", "-", "-", "-", row["error"]))
            continue
        lines.append(
            (
                row["name"],
                row["namespace"],
                f"{row['items']}/{row['length']}",
                _human_bytes(row["bytes"]),
                str(row["clients"]),
                "yes" if row["detached"] else "no",
                str(row["preload"]),
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [str(c).ljust(w) for c, w in zip(line[:-1], widths)]
        print("  ".join([*cells, str(line[-1])]))
    return EXIT_OK


def _no_such_cache(args: argparse.Namespace) -> CommandError:
    """Return the error for a cache not found, with the list command that shows the caches."""
    listing = suggested_command("list", namespace=args.namespace, address=args.address)
    return CommandError(
        f"no cache named {args.name!r} in namespace {args.namespace!r} "
        f"('{listing}' shows the caches there)"
    )


def _text_value(value: Any) -> str:
    """Return a stats value as text mode prints it: strings bare, the rest as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _stats(args: argparse.Namespace) -> int:
    from ray.exceptions import GetTimeoutError

    from raycache.admin import cache_stats

    try:
        stats = cache_stats(args.name, args.namespace, args.address, timeout=args.timeout)
    except ValueError as exc:
        raise _no_such_cache(args) from exc
    except GetTimeoutError as exc:
        raise CommandError(
            f"cache {args.name!r} in namespace {args.namespace!r} did not answer within "
            f"--timeout {seconds_text(args.timeout)} seconds; it may be busy: try again, "
            "or give a larger --timeout"
        ) from exc
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return EXIT_OK
    for key, value in stats.items():
        if key in ("bytes", "max_bytes") and isinstance(value, (int, float)):
            print(f"{key}: {value} ({_human_bytes(value)})")
        else:
            print(f"{key}: {_text_value(value)}")
    return EXIT_OK


def _drop(args: argparse.Namespace) -> int:
    from raycache.admin import drop_cache

    if drop_cache(args.name, args.namespace, args.address):
        print(f"dropped {args.name}")
        return EXIT_OK
    raise _no_such_cache(args)


def _parser() -> _OneLineParser:
    parser = _OneLineParser(
        prog="raycache",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "demo",
        help="train a small CNN on synthetic cutouts, with and without the cache",
        add_help=False,
    )
    sub.add_parser(
        "bench",
        help="run the benchmark suite (source tree); report to --out DIR",
        add_help=False,
    )

    from raycache import preload_command

    p = sub.add_parser(
        "preload",
        help="fill a cache from the provider a config names, then exit",
        description=preload_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preload_command.add_arguments(p)
    _common(p)
    p.set_defaults(namespace=None)  # the config's raycache.namespace unless given
    p.set_defaults(func=preload_command.run)
    _add_cache_commands(sub)
    parser.set_defaults(commands=sub.choices)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a usage error prints one line and exits 2 (``_OneLineParser``).

    Arguments left over after a command (``raycache list --json extra``) are reported by
    that command's parser, so that the line names the command.
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # The command is the first word argparse did not take as an option: what comes
        # before it was left over by ``raycache`` itself, the rest by the command.
        before = argv[: argv.index(args.command)]
        where = parser if any(arg in extra for arg in before) else args.commands[args.command]
        where.error(f"unrecognized arguments: {' '.join(extra)}")
    del args.commands
    return args


def _add_cache_commands(sub: argparse._SubParsersAction) -> None:
    """Add the commands that look at or free caches on a running Ray: list, stats, drop."""
    p = sub.add_parser(
        "list",
        help="list the caches, with size and clients",
        description="List the caches on the running Ray: items cached of the provider's "
        "length, bytes, attached clients, whether it is kept (detached) and the preload "
        "state. With no Ray running, say so and exit 0; never start a Ray.",
    )
    _common(p)
    p.add_argument("--all-namespaces", action="store_true", help="list every namespace")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=5.0,
        help="seconds (> 0) to wait for the caches' answers (default: 5)",
    )
    p.set_defaults(func=_list)

    p = sub.add_parser(
        "stats",
        help="print one cache's counters",
        description="Print a cache's counters (as DataCache.stats() without the client "
        "entry). Exit 1 if there is no such cache, 3 if no Ray is running.",
    )
    p.add_argument("name", help="the cache name")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of key: value lines")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=10.0,
        help="seconds (> 0) to wait for the answer (default: 10)",
    )
    p.set_defaults(func=_stats)

    p = sub.add_parser(
        "drop",
        help="free a cache",
        description="Free a cache, whoever created it; attached clients fall back to their "
        "provider. Exit 1 if there is no such cache, 3 if no Ray is running.",
    )
    p.add_argument("name", help="the cache name")
    _common(p)
    p.set_defaults(func=_drop)


def main(argv: list[str] | None = None) -> int:
    """Run the ``raycache`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 success, 1 the operation failed, 2 bad usage or config,
        3 no Ray running or none answering at the address.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from raycache.tools.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "bench":
        from raycache.tools.bench import main as bench_main

        return bench_main(argv[1:])
    args = _parse(argv)
    _quiet_ray()
    from raycache.preload_command import PreloadError
    from raycache.runtime import NoRayRunningError, RayUnreachableError

    try:
        return args.func(args)
    except (CommandError, PreloadError) as exc:
        print(f"raycache {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except (NoRayRunningError, RayUnreachableError) as exc:
        print(f"raycache {args.command}: {exc}", file=sys.stderr)
        return EXIT_NO_RAY
    except KeyboardInterrupt:
        print(f"raycache {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, never a traceback: the command's contract
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"raycache {args.command}: {type(exc).__name__}: {first}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
