"""Settings for a Ray that raycache starts itself (the node Ray, or a private one).

Such a Ray serves caches only: a directory actor and, while a cache preloads, its tasks.
These settings keep it small and private, and are shared by every place that starts one,
so the node Ray and a private Ray behave alike.
"""

from __future__ import annotations

__all__ = ["EMBEDDED_SYSTEM_CONFIG", "LOOPBACK_ENV"]

# Set in the process that starts Ray (before Ray is imported) and its children: with it,
# Ray keeps "127.0.0.1" as the node address instead of replacing it by the machine's IP.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Ray starts one idle worker per CPU when the first driver connects and keeps up to one
# per CPU once they have run something (~45-90 MiB each; figures in docs/memory.md): on a
# 2-core node that is two idle workers, on a 64-core node it would be 64. raycache needs
# none waiting: the actor starts its own worker, and preload tasks start theirs (~1 s,
# once per preload; ``raycache.preload.prestart_readers`` overlaps that with the actor's
# start) and give them back ~1 s after the last task. Metrics collection is for the
# dashboard, which raycache does not start.
EMBEDDED_SYSTEM_CONFIG = {
    "prestart_worker_first_driver": False,
    "num_workers_soft_limit": 0,
    "enable_metrics_collection": False,
}
