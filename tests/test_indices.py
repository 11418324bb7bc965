"""``index_array``: a batch of indices checked at once, the first bad one named."""

from __future__ import annotations

import numpy as np
import pytest

from raycache.indices import index_array


@pytest.mark.parametrize(
    ("indices", "bad"),
    [
        ([3, -1, 2], -1),
        ([0, 10], 10),
        (np.array([1, 2**63 - 1]), 2**63 - 1),
        (np.array([4, 2**64 - 1], dtype=np.uint64), 2**64 - 1),
        (np.array([-5], dtype=np.int8), -5),
    ],
)
def test_an_index_out_of_range_is_named(indices, bad):
    with pytest.raises(IndexError, match=rf"cache index {bad} is out of range \[0, 10\)"):
        index_array(indices, 10)


def test_valid_indices_come_back_as_int64():
    for given in ([0, 9, 4], np.array([0, 9, 4], np.uint32), np.array([0, 9, 4], np.int16)):
        out = index_array(given, 10)
        assert out.dtype == np.int64 and out.tolist() == [0, 9, 4]
    assert index_array([], 10).tolist() == []


def test_a_non_integer_index_is_refused():
    with pytest.raises(RuntimeError, match="must be an int"):
        index_array([1, 2.5], 10)
