"""How much of this process's CPUs other processes used lately, from ``/proc/stat``.

``raycache.copy_choice`` takes torch's thread pool for a batch copy only where it
measured the pool faster. On an idle node the pool's threads each have a core, and a
pool copy that merely ties with one thread per copy still shortens the epoch (it
leaves the trainer's thread free sooner); on a busy node the same tie hides a pool that
waits for threads sharing their cores. What tells the two apart is whether *other*
processes use the CPUs this process may run on.

Load averages and run-queue counts cannot say it: they count this process's own pool
threads, which keep spinning for a while after each copy. ``OthersLoad`` takes the busy
time of this process's CPUs (``/proc/stat``, per CPU) and subtracts this process's own
CPU time (``time.process_time``, every thread) over the same wall interval: what is
left is the other processes' share, in CPUs.

Guarantees: a figure only for intervals long enough for the kernel's tick-based
accounting to mean something (``min_window_s``); None wherever ``/proc/stat`` cannot be
read (not Linux) or the interval is too short, never a guess.
"""

from __future__ import annotations

import os
import time

__all__ = ["OthersLoad", "busy_seconds"]

_STAT = "/proc/stat"
# /proc/stat fields after the name: user nice system idle iowait irq softirq steal ...
_IDLE_FIELDS = (3, 4)


def busy_seconds(cpus: set[int] | None = None, stat_path: str = _STAT) -> float | None:
    """Return the seconds the given CPUs have been busy since boot, per ``/proc/stat``.

    Parameters
    ----------
    cpus : set of int, optional
        CPU numbers to add up; default those in this process's affinity mask.
    stat_path : str
        The file to read (a test hook).

    Returns
    -------
    float or None
        Busy (not idle, not waiting for I/O) seconds summed over ``cpus``; None where
        the file cannot be read or lists none of them.
    """
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        with open(stat_path, encoding="ascii") as f:
            lines = f.readlines()
    except OSError:
        return None
    busy = 0
    seen = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        # Only the first eight fields: guest time is already counted in user time.
        fields = [int(v) for v in rest.split()[:8]]
        busy += sum(fields) - sum(fields[i] for i in _IDLE_FIELDS)
        seen += 1
    return busy / tick if seen else None


class OthersLoad:
    """Measures the CPUs that processes other than this one keep busy.

    Parameters
    ----------
    min_window_s : float
        Shortest interval ``sample`` reports on: ``/proc/stat`` moves in clock ticks
        (10 ms per CPU here), so shorter intervals are mostly rounding.
    busy : callable, optional
        Returns busy seconds of this process's CPUs (``busy_seconds``); a test hook.
    own : callable, optional
        Returns this process's CPU seconds (``time.process_time``); a test hook.
    clock : callable, optional
        Returns wall seconds (``time.monotonic``); a test hook.
    """

    def __init__(self, min_window_s: float = 0.25, busy=None, own=None, clock=None):
        self.min_window_s = float(min_window_s)
        self._busy = busy_seconds if busy is None else busy
        self._own = time.process_time if own is None else own
        self._clock = time.monotonic if clock is None else clock
        self._last: tuple[float, float, float] | None = None
        self.latest: float | None = None
        self.restart()

    def restart(self) -> None:
        """Start a new interval now and forget the latest figure."""
        busy = self._busy()
        self._last = None if busy is None else (self._clock(), busy, self._own())
        self.latest = None

    def sample(self) -> float | None:
        """Return the CPUs others kept busy over the latest interval of ``min_window_s``.

        An interval ends (and the next begins) at the first call at least
        ``min_window_s`` after it began; calls before that return the figure of the
        interval before.

        Returns
        -------
        float or None
            Average CPUs busy with other processes' work (never below 0); None until a
            first interval has ended, or where ``/proc/stat`` cannot be read.
        """
        if self._last is None:
            return None
        now = self._clock()
        start, busy0, own0 = self._last
        if now - start < self.min_window_s:
            return self.latest
        busy = self._busy()
        if busy is None:
            return self.latest
        own = self._own()
        self.latest = max(0.0, (busy - busy0 - (own - own0)) / (now - start))
        self._last = (now, busy, own)
        return self.latest
