"""``raycache preload CONFIG.toml``: fill a cache before training, then exit.

The config is the TOML a training script reads (``[data_set]``, ``[raycache]``) plus
``raycache.provider = "package.module:callable"`` (or ``"path/to/file.py:callable"``):
the callable is called with the config (as a dict, without that key) and returns the
provider, a map-style dataset or a Hyrax-style provider. The cache is filled with
``DataCache``'s own preload, so a training script that builds the same provider with
the same config attaches to the full cache and reads the provider 0 times.

This module uses only ``DataCache``'s public API. It guarantees one outcome line: exit
0 when every item is cached; otherwise one line on stderr that says what failed
(config, provider import, provider error at an index, items left out) and a non-zero
exit status.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import site
import sys
import time
from pathlib import Path
from typing import Any

from raycache.command_text import positive_seconds, seconds_text, suggested_command

__all__ = ["DESCRIPTION", "add_arguments", "load_callable", "run"]

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Fill a cache from the provider named in a config, then exit.

CONFIG.toml is the config a training script uses ([data_set], [raycache]) plus
  [raycache]
  provider = "package.module:callable"   (or "path/to/file.py:callable")
The callable gets the config as a dict (without raycache.provider) and returns the
provider: a map-style dataset or a Hyrax-style provider. data_set.use_cache and
data_set.preload_cache are forced on.

The cache is kept (detached) after this command exits, until 'raycache drop NAME'
(with the --namespace and --address it was made with).
With --no-keep it is not detached: it stays while this command runs and is freed
raycache.linger_s seconds after the last process using it has gone, so a training
job must attach within that time to find it full.

Exit status: 0 every item is cached; 1 the provider failed, has no items or items
are missing; 2 bad config, bad option or provider not importable; 3 no Ray answers
at --address.
"""

# Seconds between progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 5.0
POLL_S = 0.5


class PreloadError(Exception):
    """The preload did not fill the cache; the message is the one line to show."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``preload`` command's arguments to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The sub-command's parser.
    """
    parser.add_argument("config", help="the TOML config ([data_set], [raycache])")
    parser.add_argument(
        "--provider",
        default=None,
        help="module:callable or file.py:callable that returns the provider "
        "(overrides raycache.provider)",
    )
    parser.add_argument(
        "--no-keep",
        action="store_true",
        help="do not keep the cache after exit: it is freed raycache.linger_s seconds "
        "after the last process using it has gone",
    )
    parser.add_argument(
        "--on-error",
        choices=("stop", "continue"),
        default="continue",
        help="at a provider error: 'continue' fills every other item and exits 1 at the "
        "end; 'stop' exits 1 at the first error reported (default: continue)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=None,
        help="give up (exit 1) after this many seconds (> 0); default: wait until done",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "log"),
        default="auto",
        help="a progress bar (on a terminal by default) or a log line every few seconds",
    )


def load_callable(spec: str) -> Any:
    """Return the callable named by ``module:callable`` or ``path/file.py:callable``.

    A file is loaded as a module named after it; its module (and a module found in the
    working directory) is then pickled by value, so Ray's preload workers, which cannot
    import it, receive the provider's code with the provider.

    Parameters
    ----------
    spec : str
        ``package.module:name`` (``name`` may be dotted: ``module:Class.factory``) or
        ``path/to/file.py:name``.

    Returns
    -------
    Any
        The named object.

    Raises
    ------
    PreloadError
        With exit status 2 if the spec is malformed, the module or file cannot be
        imported, or has no such name.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise PreloadError(
            f"provider {spec!r} must be 'module:callable' or 'file.py:callable'", code=2
        )
    if target.endswith(".py") or os.sep in target:
        module = _load_file(Path(target))
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as 'python -m' would: local modules import
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise PreloadError(
                f"cannot import provider module {target!r}: {type(exc).__name__}: {exc}", code=2
            ) from exc
    _ship_by_value(module)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PreloadError(
                f"provider module {module.__name__!r} has no attribute {attr!r}", code=2
            ) from exc
    if not callable(obj):
        raise PreloadError(f"provider {spec!r} is a {type(obj).__name__}, not a callable", code=2)
    return obj


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise PreloadError(f"provider file {str(path)!r} does not exist", code=2)
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PreloadError(f"provider file {str(path)!r} cannot be loaded as a module", code=2)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PreloadError(
            f"provider file {str(path)!r} raised {type(exc).__name__}: {exc}", code=2
        ) from exc
    return module


def _ship_by_value(module: Any) -> None:
    """Pickle ``module``'s classes by value unless it is installed (workers import it)."""
    import ray.cloudpickle

    filename = getattr(module, "__file__", None)
    if filename is None or module.__name__ == "__main__":
        return
    installed = [*site.getsitepackages(), site.getusersitepackages()]
    if any(os.path.abspath(filename).startswith(os.path.abspath(p)) for p in installed):
        return
    ray.cloudpickle.register_pickle_by_value(module)


def _read_config(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise PreloadError(f"config file {path!r} does not exist", code=2) from exc
    except tomllib.TOMLDecodeError as exc:
        raise PreloadError(f"config file {path!r} is not valid TOML: {exc}", code=2) from exc
    except OSError as exc:
        raise PreloadError(f"cannot read config file {path!r}: {exc}", code=2) from exc


def _configs(args: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Return (provider spec, config for the provider, config for the cache)."""
    config = _read_config(args.config)
    table = config.get("raycache", {})
    if not isinstance(table, dict):
        raise PreloadError(f"[raycache] in {args.config!r} must be a table", code=2)
    table = dict(table)
    spec = table.pop("provider", None)
    if args.provider is not None:
        spec = args.provider
    if not spec or not isinstance(spec, str):
        raise PreloadError(
            f"no provider: set raycache.provider = 'module:callable' in {args.config!r} "
            "or pass --provider",
            code=2,
        )
    for_provider = dict(config, raycache=dict(table))
    if args.address is not None:
        table["address"] = args.address
    if args.namespace is not None:
        table["namespace"] = args.namespace
    table["detached"] = not args.no_keep
    data_set = config.get("data_set", {})
    if not isinstance(data_set, dict):
        raise PreloadError(f"[data_set] in {args.config!r} must be a table", code=2)
    data_set = dict(data_set, use_cache=True, preload_cache=True)
    return spec, for_provider, dict(config, data_set=data_set, raycache=table)


def run(args: argparse.Namespace) -> int:
    """Run ``raycache preload`` with parsed arguments.

    Parameters
    ----------
    args : argparse.Namespace
        From the parser :func:`add_arguments` filled (plus ``address``, ``namespace``).

    Returns
    -------
    int
        0 when every item is cached.

    Raises
    ------
    PreloadError
        When it is not, with the line to show and the exit status.
    """
    from raycache.config import ConfigError
    from raycache.data_cache import DataCache

    spec, for_provider, for_cache = _configs(args)
    factory = load_callable(spec)
    try:
        provider = factory(for_provider)
    except Exception as exc:
        raise PreloadError(f"provider factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    try:
        cache = DataCache(for_cache, provider)  # no Ray yet: the cache is made on first use
    except ConfigError as exc:
        raise PreloadError(f"bad config {args.config!r}: {exc}", code=2) from exc
    try:
        _check_length(provider, spec)
    except PreloadError:
        cache.close()
        raise
    from raycache.runtime import NoRayRunningError, ensure_ray

    # The preload's own log lines (one per failing index) would repeat what the summary
    # line says; the command reports errors itself. A kept cache must outlive this
    # process, which a private Ray (the node Ray unusable) would not let it do.
    try:
        ensure_ray(cache.config.address, log_to_driver=False, private_ok=args.no_keep)
    except NoRayRunningError as exc:
        raise NoRayRunningError(
            f"{exc}; the cache could not be kept after this command exits. Start a Ray "
            "for it ('ray start --head', or pass --address), or pass --no-keep"
        ) from exc
    try:
        return _fill(cache, args)
    finally:
        cache.close()


def _check_length(provider: Any, spec: str) -> None:
    """Refuse a provider without items (or without a length) before any cache is made."""
    from raycache.provider import provider_length

    try:
        length = provider_length(provider)
    except Exception as exc:
        raise PreloadError(
            f"the provider from {spec!r} has no usable length: {type(exc).__name__}: {exc}"
        ) from exc
    if length == 0:
        raise PreloadError(
            f"the provider from {spec!r} has no items (its length is 0): nothing to preload, "
            "no cache was made; check the data set the config names"
        )


def _fill(cache: Any, args: argparse.Namespace) -> int:
    length = len(cache)
    name = cache.name
    start = time.monotonic()
    cache.start_preload_thread()
    reporter = _Reporter(name, length, args.progress)
    try:
        while True:
            done = _wait_or_drop(cache, POLL_S)
            stats = cache.stats()
            errors = stats.get("preload_errors") or []
            reporter.update(stats["items"], stats["bytes"], len(errors))
            if errors and args.on_error == "stop":
                raise PreloadError(_error_line(name, errors, stopped=True))
            if done:
                break
            if args.timeout is not None and time.monotonic() - start > args.timeout:
                raise PreloadError(
                    f"cache {name!r}: {stats['items']} of {length} items cached after "
                    f"{seconds_text(args.timeout)} s (--timeout); the preload goes on in the "
                    "cluster"
                )
    finally:
        reporter.close()
    stats = cache.stats()
    errors = stats.get("preload_errors") or []
    if errors:
        raise PreloadError(_error_line(name, errors, stopped=False))
    if stats["items"] < length:
        raise PreloadError(
            f"cache {name!r}: only {stats['items']} of {length} items cached "
            f"({stats['bytes']} bytes, max_bytes {stats.get('max_bytes')}); raise "
            "raycache.max_bytes or the object store size"
        )
    seconds = time.monotonic() - start
    if stats.get("detached"):
        drop = suggested_command(
            "drop", name, namespace=cache.config.namespace, address=cache.config.address
        )
        kept = f"kept until '{drop}'"
    else:
        kept = "not kept"
    print(
        f"cache {name!r}: {length} items, {stats['bytes']} bytes cached in {seconds:.1f} s; {kept}"
    )
    return 0


def _wait_or_drop(cache: Any, timeout: float) -> bool:
    """Wait for the preload; if it failed outright, drop the cache when it holds nothing.

    A preload that stored nothing (every task or every read failed) would otherwise leave
    an empty cache kept until ``raycache drop``, and the node Ray with it.
    """
    from raycache.errors import PreloadFailedError

    try:
        return cache.wait_for_preload(timeout=timeout)
    except PreloadFailedError as exc:
        stats = cache.stats()
        dropped = ""
        if stats["items"] == 0 and stats.get("clients", 0) <= 1:  # no other process uses it
            from raycache.admin import drop_cache

            cache.close()
            drop_cache(cache.name, cache.config.namespace)  # the Ray this process uses
            dropped = "; the empty cache was dropped"
        raise PreloadError(f"{exc}{dropped}") from exc


def _error_line(name: str, errors: list[dict], stopped: bool) -> str:
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    action = "stopped at" if stopped else "failed at"
    return (
        f"cache {name!r}: preload {action} a provider error at index {first.get('index')}: "
        f"{first.get('error')}{more}"
    )


class _Reporter:
    """A tqdm bar on a terminal, else a log line every LOG_INTERVAL_S seconds."""

    def __init__(self, name: str, length: int, mode: str):
        self.name = name
        self.length = length
        self.start = time.monotonic()
        self.last_log = self.start
        self.items = 0
        self.bar = None
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=length, unit="item", desc=f"preload {name}", file=sys.stderr)

    def update(self, items: int, nbytes: int, errors: int) -> None:
        if self.bar is not None:
            self.bar.update(items - self.items)
            self.bar.set_postfix_str(f"{nbytes / 2**20:.1f} MiB, {errors} errors", refresh=True)
        elif time.monotonic() - self.last_log >= LOG_INTERVAL_S:
            self.last_log = time.monotonic()
            elapsed = self.last_log - self.start
            rate = items / elapsed if elapsed > 0 else 0.0
            # No ETA until an item is cached: before that there is no rate to go by.
            eta = f"{(self.length - items) / rate:.0f} s" if rate > 0 else "?"
            print(
                f"preload {self.name}: {items}/{self.length} items, {nbytes / 2**20:.1f} MiB, "
                f"{rate:.0f} items/s, ETA {eta}, {errors} errors",
                file=sys.stderr,
                flush=True,
            )
        self.items = items

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
