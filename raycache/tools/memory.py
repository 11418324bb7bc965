"""How much memory a cache costs the node, counted so that shared pages count once.

Each trainer's RSS includes every page of the object store it has mapped, so adding
RSS over processes counts the shared cache once per process and shows K copies where
there is one. The proportional set size (PSS) splits each shared page between the
processes that map it, so the sum of PSS over all processes that map a page counts
it exactly once. ``node_memory`` sums PSS over the processes of one Ray session
(GCS, raylet, which holds the object store's pages, its workers and actors, agents,
dashboard) and the trainer processes given by the caller.

Only Linux has ``/proc/<pid>/smaps_rollup``; elsewhere ``node_memory`` raises.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["node_memory", "pss", "ray_processes", "session_name"]

_FIELDS = {"Pss:": "pss", "Pss_Anon:": "anon", "Pss_File:": "file", "Pss_Shmem:": "shmem"}


def pss(pid: int) -> dict[str, int] | None:
    """Return the proportional set size of one process, in bytes.

    Parameters
    ----------
    pid : int
        The process.

    Returns
    -------
    dict or None
        ``pss`` (total), ``anon`` (heap and other private allocations), ``file``
        (mapped files: libraries), ``shmem`` (shared memory: the object store).
        None if the process is gone or its memory cannot be read.
    """
    out = dict.fromkeys(_FIELDS.values(), 0)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                key = _FIELDS.get(parts[0]) if parts else None
                if key is not None:
                    out[key] = int(parts[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return out


def session_name() -> str | None:
    """Return the name of the Ray session this process is connected to, if any.

    Returns
    -------
    str or None
        For example ``session_2026-11-25_05-04-22_584899_6008``; None when this
        process is not connected to Ray.
    """
    import ray

    if not ray.is_initialized():
        return None
    node = ray._private.worker.global_worker.node
    return getattr(node, "session_name", None)


def _processes() -> dict[int, tuple[int, str]]:
    """Return ``pid -> (ppid, command line)`` for every process we can read."""
    procs: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # The command name in stat is in parentheses and may hold spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        procs[pid] = (ppid, cmdline)
    return procs


def ray_processes(session: str | None = None) -> list[int]:
    """Return the pids of one Ray session's processes on this node.

    A process belongs to the session when its command line names the session (GCS
    server, raylet, dashboard, monitors: other agents' Ray instances on the same
    machine are left out this way) or when it descends from such a process (workers
    and actors, which rename themselves ``ray::...`` and lose their arguments).

    Parameters
    ----------
    session : str, optional
        Session name; default the session of this process's Ray. Without either
        there is no telling this machine's Ray instances apart: none is returned.

    Returns
    -------
    list of int
        Pids, sorted.
    """
    session = session or session_name()
    if session is None:
        return []
    procs = _processes()
    roots = [p for p, (_, cmd) in procs.items() if session in cmd]
    return sorted(_descendants(procs, roots))


def _descendants(procs: dict[int, tuple[int, str]], roots: Iterable[int]) -> set[int]:
    """Return ``roots`` and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [p for p in roots if p in procs]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def node_memory(
    pids: Iterable[int] | None = None,
    session: str | None = None,
    include_ray: bool = True,
    children: bool = False,
) -> dict:
    """Return the memory that a Ray session and some trainer processes cost this node.

    Parameters
    ----------
    pids : iterable of int, optional
        Trainer processes (drivers, DataLoader workers) to count besides Ray's.
    session : str, optional
        Ray session whose processes are counted; default this process's.
    include_ray : bool
        Count the Ray session's processes (the object store's pages are in the
        raylet's share of PSS and in each reader's). Without a session (this process
        is not connected to Ray and none is named) no Ray process is counted.
    children : bool
        Count the descendants of ``pids`` too (DataLoader workers) as trainers.

    Returns
    -------
    dict
        ``total``, ``anon``, ``file``, ``shmem``: PSS in bytes summed over the
        processes (each shared page counted once); ``ray`` and ``trainers``: the
        total for each group; ``processes``: ``{pid: pss dict}``.

    Raises
    ------
    OSError
        Where ``/proc/<pid>/smaps_rollup`` does not exist (not Linux).
    """
    if not os.path.exists(f"/proc/{os.getpid()}/smaps_rollup"):
        raise OSError("node_memory needs Linux's /proc/<pid>/smaps_rollup")
    trainers = {int(p) for p in (pids or ())}
    if children and trainers:
        trainers = _descendants(_processes(), trainers)
    ray_pids = set(ray_processes(session)) - trainers if include_ray else set()
    out: dict = {"total": 0, "anon": 0, "file": 0, "shmem": 0, "ray": 0, "trainers": 0}
    per_process: dict[int, dict[str, int]] = {}
    for pid in sorted(trainers | ray_pids):
        usage = pss(pid)
        if usage is None:
            continue
        per_process[pid] = usage
        for key in ("anon", "file", "shmem"):
            out[key] += usage[key]
        out["total"] += usage["pss"]
        out["trainers" if pid in trainers else "ray"] += usage["pss"]
    out["processes"] = per_process
    return out
