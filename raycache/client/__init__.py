"""The trainer side of a cache: one process's connection to the directory actor.

The package is split along the protocol with the actor (``raycache.protocol``):

- ``link``: the actor handle and the one place that decides the cache is lost;
- ``local_map``: the local copy of the map, the mapped chunks, syncing;
- ``write_buffer``: buffered inserts and the thread that sends them (and heartbeats);
- ``preload_waits``: waits on preload units, reservations and spare reads;
- ``forking``: fork hooks, so DataLoader workers forked from a trainer can read;
- ``cache_client``: ``CacheClient``, which composes the parts.

``directory_actor`` (defined beside the actor in ``raycache.directory``) and the
timing constants are importable from here too.
"""

from raycache.client.cache_client import CacheClient, ClientState
from raycache.client.local_map import MIN_SYNC_S, POLL_S, STALE_S
from raycache.client.preload_waits import INFLIGHT_WAIT_S, SPARE_BLOCK, SPARE_BLOCK_MAX
from raycache.client.write_buffer import ALONE_FLUSH_S, FLUSH_BYTES, HEARTBEAT_S, WRITE_IDLE_S
from raycache.directory import directory_actor

__all__ = [
    "ALONE_FLUSH_S",
    "FLUSH_BYTES",
    "HEARTBEAT_S",
    "INFLIGHT_WAIT_S",
    "MIN_SYNC_S",
    "POLL_S",
    "SPARE_BLOCK",
    "SPARE_BLOCK_MAX",
    "STALE_S",
    "WRITE_IDLE_S",
    "CacheClient",
    "ClientState",
    "directory_actor",
]
