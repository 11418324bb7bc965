"""Data providers and helpers used by the tests (importable from subprocesses and Ray workers)."""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

import numpy as np

from raycache import DataCache


def wait_write_buffers_freed(cache: DataCache, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``cache``'s client to free its write buffers.

    The client keeps them only while its process inserts (``raycache.client.WRITE_IDLE_S``).
    Returns True once they are freed.
    """
    client = cache.client
    deadline = time.monotonic() + timeout
    while client.inspect().spare_buffers and time.monotonic() < deadline:
        time.sleep(0.05)
    return not client.inspect().spare_buffers


def make_item(i: int, scale: float = 1.0) -> dict:
    return {
        "data": {
            "image": np.full((3, 8, 8), i * scale, dtype=np.float32),
            "label": int(i),
        },
        "object_id": f"obj-{i}",
    }


class ArrayProvider:
    """A map-style dataset of small image items."""

    def __init__(self, n: int, scale: float = 1.0, fail_at: tuple = (), latency_s: float = 0.0):
        self.n = n
        self.scale = scale
        self.fail_at = tuple(fail_at)
        self.latency_s = latency_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i in self.fail_at:
            raise ValueError(f"provider cannot read item {i}")
        if self.latency_s:
            time.sleep(self.latency_s)
        return make_item(i, self.scale)


class HyraxStyleProvider:
    """Mimics Hyrax's DataProvider: it owns a DataCache and uses it in resolve_data."""

    def __init__(self, config: dict, n: int):
        self.n = n
        self.computed = 0
        self.data_cache = DataCache(config, self)

    def __len__(self) -> int:
        return self.n

    def resolve_data(self, idx: int) -> dict:
        cached = self.data_cache.try_fetch(idx)
        if cached is not None:
            return cached
        self.computed += 1
        item = make_item(idx)
        self.data_cache.insert_into_cache(idx, item)
        return item


class UnpicklableProvider(ArrayProvider):
    """Holds a lock, which cannot be pickled."""

    def __init__(self, n: int):
        super().__init__(n)
        self.lock = threading.Lock()


class CountingProvider(ArrayProvider):
    """Counts reads (in this process only)."""

    def __init__(self, n: int):
        super().__init__(n)
        self.reads = 0

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        return super().__getitem__(i)


class LoggedReadsProvider(ArrayProvider):
    """Appends each index it reads to a file, so reads in every process are counted."""

    def __init__(self, n: int, log_path: str, latency_s: float = 0.0, fail_at: tuple = ()):
        super().__init__(n, latency_s=latency_s, fail_at=fail_at)
        self.log_path = log_path

    def __getitem__(self, i: int) -> dict:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{i} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return super().__getitem__(i)

    def reads(self, pid: int | None = None) -> list[int]:
        """Every index read so far, by any process (or by process ``pid`` only)."""
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as f:
            rows = [line.split() for line in f if line.strip()]
        return [int(idx) for idx, by in rows if pid is None or int(by) == pid]


class SizeStepProvider(ArrayProvider):
    """Items of 8 floats up to index ``step``, of 512 after: the probe sees only small ones."""

    def __init__(self, n: int, step: int):
        super().__init__(n)
        self.step = step

    def __getitem__(self, i: int) -> dict:
        size = 8 if i < self.step else 512
        return {"image": np.full(size, i, dtype=np.float64), "label": i}


class CrashingProvider(ArrayProvider):
    """Ends the process that reads index ``crash_at``, unless it is process ``safe_pid``."""

    def __init__(self, n: int, crash_at: int, safe_pid: int):
        super().__init__(n)
        self.crash_at = crash_at
        self.safe_pid = safe_pid

    def __getitem__(self, i: int) -> dict:
        if i == self.crash_at and os.getpid() != self.safe_pid:
            os._exit(1)  # a preload worker dying mid-unit, as with a segfault or OOM kill
        return super().__getitem__(i)


class FailsHereProvider(ArrayProvider):
    """Raises for the indices in ``fail_here`` in the process that built it, and only there."""

    def __init__(self, n: int, fail_here: tuple, latency_s: float = 0.0):
        super().__init__(n, latency_s=latency_s)
        self.fail_here = tuple(fail_here)
        self.owner_pid = os.getpid()

    def __getitem__(self, i: int) -> dict:
        if i in self.fail_here and os.getpid() == self.owner_pid:
            raise ValueError(f"item {i} cannot be read in this process")
        return super().__getitem__(i)


EXIT_ON_READ_ENV = "RAYCACHE_TEST_EXIT_ON_READ"


class ExitOnReadProvider(ArrayProvider):
    """Ends the reading process at its first read where ``EXIT_ON_READ_ENV`` is set.

    A trainer that dies in the middle of its reads, with what it reserved not stored.
    """

    def __getitem__(self, i: int) -> dict:
        if os.environ.get(EXIT_ON_READ_ENV):
            os._exit(3)
        return super().__getitem__(i)


Pair = collections.namedtuple("Pair", "x y")


class TaggedList(list):
    """A list subclass, as a user's item may hold."""


def container_item(kind: str, i: int) -> Any:
    """An item of container ``kind`` whose types must survive the cache (see ContainerProvider)."""
    x = np.full(3, float(i), dtype=np.float32)
    if kind == "namedtuple":
        return Pair(x, i)
    if kind == "namedtuple_field":
        return {"p": Pair(x, i), "y": i}
    if kind == "ordered_dict":
        return collections.OrderedDict([("b", x), ("a", i)])
    if kind == "default_dict":
        item = collections.defaultdict(list)
        item["x"] = x
        return item
    if kind == "bool_or_int_keys":  # equal dict keys of different types
        return {1: x} if i % 2 else {True: x}
    if kind == "float_or_int_keys":
        return {1: x, "y": i} if i % 2 else {1.0: x, "y": i}
    if kind == "list_subclass":
        return TaggedList([x, i])
    raise ValueError(kind)


class ContainerProvider:
    """Items whose containers are subclasses, or whose dict keys are equal across types."""

    def __init__(self, kind: str, n: int = 16):
        self.kind, self.n = kind, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return container_item(self.kind, i)


class BigEndianProvider:
    """Arrays in big-endian byte order, as FITS files hold them."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"x": (np.arange(3) + i).astype(">f4"), "y": i}


class ReusedBufferProvider:
    """Refills one buffer per call and returns a view of it: ragged items, so each is kept
    whole by a preload unit rather than copied into its columns."""

    def __init__(self, n: int = 12):
        self.n = n
        self.buffer = np.zeros(4, dtype=np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.buffer[:] = i
        return {"x": self.buffer[: i % 3 + 1], "y": i}
