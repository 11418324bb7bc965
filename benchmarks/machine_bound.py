"""The machine's own bound on a preload: the same reads and one copy, with no cache around them.

A preload can be no faster than this machine lets the provider's reads run and the
items land in shared memory. ``MachineBound`` measures that, so that the preload-alone
rows judge raycache against what the machine can do where that is slower than the
ideal ``items x latency / threads``: ``processes`` worker processes (as many as the
preload runs tasks: one per CPU Ray has), started and handed the provider beforehand,
untimed (as the preload's Ray workers are warmed untimed), each read their share of
the items with ``threads / processes`` threads and copy every item into a shared-memory
buffer of their own (``multiprocessing.shared_memory``, the same ``/dev/shm`` pages the
object store writes). The time is from handing out the shares to the last process's
answer.

That is the least any cache in shared memory does per item: the provider call (its
latency, the thread's wake-up, the item's allocation) and one copy into shared pages.
What it leaves out is raycache's own work: units, claims, packing a chunk, the copy
into the object store and the actor registering it. Each process keeps its buffer from
round to round, growing it when a share is bigger: its first use writes fresh pages,
later ones reuse them, as the object store does with pages it has written before.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

__all__ = ["MachineBound"]

REPLY_TIMEOUT_S = 600.0  # a share of a benchmark's items; this long only if a process hung


def _copy_into(buffer: np.ndarray, offset: int, item: dict) -> int:
    """Copy ``item``'s arrays into ``buffer`` from byte ``offset``; return the next offset."""
    for value in item.values():
        if isinstance(value, np.ndarray):
            raw = value.reshape(-1).view(np.uint8)
            buffer[offset : offset + raw.size] = raw
            offset += raw.size
    return offset


def _read_share(provider: Any, indices: Sequence[int], threads: int, shm: SharedMemory) -> None:
    """Read ``indices`` with ``threads`` threads, each item copied into ``shm`` at its row."""
    buffer = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)
    row = shm.size // max(1, len(indices))

    def read(pos: int) -> None:
        _copy_into(buffer, pos * row, provider[indices[pos]])

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(read, range(len(indices))):  # re-raises a read's error
            pass


def _serve(conn: Any) -> None:
    """Serve one bound process: take the provider, then read shares until told to stop."""
    provider = None
    shm: SharedMemory | None = None
    try:
        while True:
            message = conn.recv()
            if message[0] == "provider":
                provider = message[1]
                conn.send(("ok", None))
            elif message[0] == "read":
                _, indices, threads, nbytes = message
                if shm is None or shm.size < nbytes:
                    if shm is not None:
                        shm.close()
                        shm.unlink()
                    shm = SharedMemory(create=True, size=max(1, nbytes))
                start = time.perf_counter()
                _read_share(provider, indices, threads, shm)
                conn.send(("ok", time.perf_counter() - start))
            else:
                break
    finally:
        if shm is not None:
            shm.close()
            shm.unlink()
        conn.close()


class MachineBound:
    """Worker processes that time the machine's bound on a preload (see the module doc).

    Use as a context manager; leaving it stops the processes.

    Parameters
    ----------
    processes : int
        Worker processes (the preload's task count: one per CPU).
    """

    def __init__(self, processes: int):
        self.processes = max(1, processes)
        ctx = mp.get_context("spawn")  # this process is connected to Ray: never fork it
        self._conns = []
        self._procs = []
        for _ in range(self.processes):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs,), daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(mine)
            self._procs.append(proc)

    def set_provider(self, provider: Any) -> None:
        """Hand every process the provider (pickled), untimed.

        Parameters
        ----------
        provider : Any
            The provider.
        """
        for conn in self._conns:
            conn.send(("provider", provider))
        self._replies()

    def seconds(self, length: int, threads: int, item_bytes: int) -> float:
        """Time reading ``length`` items with ``threads`` threads over all the processes.

        Parameters
        ----------
        length : int
            Items, split into one contiguous share per process.
        threads : int
            Reads in flight over all processes (at least one per process).
        item_bytes : int
            Bytes of one item's arrays (the row each item is copied into).

        Returns
        -------
        float
            Seconds from handing out the shares to the last process's answer.
        """
        shares = np.array_split(np.arange(length), len(self._conns))
        per_process = max(1, -(-threads // len(self._conns)))
        start = time.perf_counter()
        for conn, share in zip(self._conns, shares):
            conn.send(("read", share.tolist(), per_process, len(share) * item_bytes))
        self._replies()
        return time.perf_counter() - start

    def _replies(self) -> list:
        out = []
        for conn in self._conns:
            if not conn.poll(REPLY_TIMEOUT_S):
                raise TimeoutError(f"a machine-bound process gave no answer in {REPLY_TIMEOUT_S} s")
            _, value = conn.recv()
            out.append(value)
        return out

    def close(self) -> None:
        """Stop the processes (each frees its shared memory)."""
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):  # it ended already: nothing to stop
                pass
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)

    def __enter__(self) -> MachineBound:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
