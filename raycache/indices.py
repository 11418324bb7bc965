"""Validating provider indices with the errors Hyrax's ``DataCache`` raises.

Code written for Hyrax catches ``RuntimeError`` for an index of the wrong type and
``IndexError`` for one out of range; every raycache entry point raises exactly those,
naming the offending index. A batch is checked with one numpy pass, not per index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["check_index", "index_array"]


def check_index(idx: Any, length: int) -> int:
    """Return ``idx`` as an int, or raise the seed's error types.

    Parameters
    ----------
    idx : Any
        A provider index.
    length : int
        Number of provider items.

    Returns
    -------
    int
        The index.

    Raises
    ------
    RuntimeError
        If ``idx`` is not an integer (bool included).
    IndexError
        If ``idx`` is out of range.
    """
    if isinstance(idx, (bool, np.bool_)) or not isinstance(idx, (int, np.integer)):
        raise RuntimeError(
            f"cache index must be an int or numpy integer, got {type(idx).__name__} {idx!r}"
        )
    idx = int(idx)
    if not 0 <= idx < length:
        raise IndexError(f"cache index {idx} is out of range [0, {length})")
    return idx


def index_array(indices: Sequence[int], length: int) -> np.ndarray:
    """Validate a batch of indices at once; return them as int64.

    Parameters
    ----------
    indices : Sequence[int]
        Provider indices (Python or numpy integers, or an integer array).
    length : int
        Number of provider items.

    Returns
    -------
    numpy.ndarray
        The indices (the input itself where it is an int64 array already).

    Raises
    ------
    RuntimeError
        If an index is not an integer.
    IndexError
        If an index is out of range (the first such is named).
    """
    given = np.asarray(indices)
    if given.ndim != 1 or given.dtype.kind not in "iu":
        return np.array([check_index(i, length) for i in indices], dtype=np.int64)
    idx = given.astype(np.int64, copy=False)
    # One reduction checks both ends: a negative index read as unsigned is above length
    # (as is an unsigned index too big for int64).
    if len(idx) and idx.view(np.uint64).max() >= length:
        bad = (given < 0) | (given >= length)
        raise IndexError(f"cache index {int(given[bad][0])} is out of range [0, {length})")
    return idx
