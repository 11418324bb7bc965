"""Ports for a Ray head that a test starts with ``ray start`` (which needs them named).

A port found by binding to port 0 comes from the kernel's ephemeral range, from which
every other process binding port 0 (the Ray processes of tests running beside this one,
in the other pytest-xdist worker) is served too: it may be taken again before the head
binds it. These ports are drawn at random below that range and above Ray's default
worker ports (10002-19999), where no process is handed a port it did not name.
"""

from __future__ import annotations

import random
import socket

__all__ = ["free_ports"]

LOW = 20000  # above Ray's default worker ports


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports that are free now, outside the ephemeral range.

    Parameters
    ----------
    count : int
        How many ports.

    Returns
    -------
    list of int
        The ports, each checked free by binding it on every interface.
    """
    high = _ephemeral_start()
    candidates = random.sample(range(LOW, high), min(high - LOW, 50 * count))
    ports = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports between {LOW} and {high}")
