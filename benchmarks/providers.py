"""The synthetic providers every scenario reads: fixed-size items, optional delay per item.

``Provider`` is pickled into Ray's preload tasks by reference, so this module must be
importable in Ray's worker processes: ``suite.main`` puts the source tree on their
``PYTHONPATH`` before it starts Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["BATCH", "KIB", "MIB", "Provider", "calibrate_spin", "shape_bytes", "spin"]

BATCH = 64
KIB = 1024
MIB = 1024 * 1024


def spin(iterations: int) -> int:
    """Do a fixed amount of pure-Python work, holding the GIL throughout.

    A fixed amount of work, not a fixed time: a loop that spins until a deadline would
    let GIL-bound threads appear to overlap (each deadline passes while another thread
    computes), hiding exactly the contention this benchmark is about.

    Parameters
    ----------
    iterations : int
        Loop iterations.

    Returns
    -------
    int
        A value depending on every iteration, so nothing can be skipped.
    """
    acc = 0
    for k in range(iterations):
        acc = (acc ^ k) & 0xFFFF  # the same cost for every k: calibration stays linear
    return acc


def calibrate_spin(seconds: float, trials: int = 7) -> int:
    """Return the ``spin`` iterations that take ``seconds`` on an idle core here.

    The fastest of several trials is used, so time taken by other processes on a
    shared machine does not inflate the work per item.

    Parameters
    ----------
    seconds : float
        Target CPU time per call.
    trials : int
        Timed trials.

    Returns
    -------
    int
        Iterations.
    """
    iterations = 10_000
    for _ in range(2):  # the second pass times about the target amount of work
        best = min(_timed(lambda n=iterations: spin(n)) for _ in range(trials))
        iterations = max(1, int(iterations * seconds / best))
    return iterations


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Provider:
    """A synthetic data provider: ``{"image": float32 array, "label": int}`` per index.

    Parameters
    ----------
    n : int
        Number of items.
    shape : tuple of int
        Shape of each image.
    latency_s : float
        Seconds to sleep per item (I/O latency; releases the GIL).
    spin_iterations : int
        ``spin`` iterations per item (CPU work; holds the GIL).
    """

    def __init__(
        self, n: int, shape: Sequence[int], latency_s: float = 0.0, spin_iterations: int = 0
    ):
        self.n = int(n)
        self.shape = tuple(int(s) for s in shape)
        self.latency_s = float(latency_s)
        self.spin_iterations = int(spin_iterations)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict:
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.spin_iterations:
            spin(self.spin_iterations)
        return {"image": np.full(self.shape, float(idx), dtype=np.float32), "label": int(idx)}


def shape_bytes(shape: Sequence[int]) -> int:
    """Return the bytes of one float32 image of ``shape``.

    Parameters
    ----------
    shape : Sequence[int]
        The shape.

    Returns
    -------
    int
        Size in bytes.
    """
    return int(np.prod(shape)) * 4
