"""Which trainers are attached to a cache, when each was last heard from, and their counts.

The directory actor forgets a client it has not heard from for a while (a trainer can
die without detaching) and frees a non-detached cache once no client has been attached
for ``linger_s``; this table answers both questions. No Ray call, no lock of its own:
the actor calls it under its lock.
"""

from __future__ import annotations

import time

__all__ = ["ClientTable"]


class ClientTable:
    """The clients attached to a cache, when each was last heard from, and their counts.

    Not thread-safe: the actor calls it under its lock.
    """

    def __init__(self) -> None:
        self.info: dict[str, dict] = {}
        self.idle_since: float | None = time.monotonic()  # None while a client is attached
        self.hits = 0
        self.misses = 0

    def attach(self, client_id: str, info: dict, now: float) -> None:
        """Register ``client_id`` with its ``info`` (host, pid)."""
        self.info[client_id] = dict(info, last_seen=now)
        self.idle_since = None

    def seen(self, client_id: str, now: float, hits: int = 0, misses: int = 0) -> None:
        """Record that ``client_id`` is alive, with its hits and misses since last time."""
        self.hits += hits
        self.misses += misses
        if client_id in self.info:
            self.info[client_id]["last_seen"] = now

    def detach(self, client_id: str, now: float) -> None:
        """Forget ``client_id``; the cache is idle from ``now`` if it was the last one."""
        self.info.pop(client_id, None)
        if not self.info:
            self.idle_since = now

    def silent(self, now: float, timeout: float) -> list[str]:
        """Forget and return the clients not heard from for ``timeout`` seconds."""
        gone = [c for c, i in self.info.items() if now - i["last_seen"] > timeout]
        for c in gone:
            self.detach(c, now)
        return gone

    def idle_for(self, now: float) -> float:
        """Return how long no client has been attached (0 while one is)."""
        return 0.0 if self.idle_since is None else now - self.idle_since
