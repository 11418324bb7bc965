"""Large columns travel to the object store in pieces and are read back as one array.

Real Ray: a column over 1 MiB is pickled as pieces of at most ``PIECE_BYTES`` (Ray
copies each with one thread); read back from the store, the pieces lie back to back and
the column is one read-only array over the stored bytes, not a copy.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import ray

from raycache.columns import PIECE_BYTES, RaggedColumn, StackedColumn, join_pieces, split_pieces


def test_split_pieces_only_cuts_large_contiguous_arrays():
    assert split_pieces(np.ones(PIECE_BYTES // 8)) is None  # one piece: kept whole
    assert split_pieces(np.ones((2 * PIECE_BYTES // 8, 2))[:, 0]) is None  # not contiguous
    data = np.arange(3 * PIECE_BYTES // 4 + 5, dtype=np.float32)
    pieces = split_pieces(data)
    assert [len(p) for p in pieces] == [PIECE_BYTES, PIECE_BYTES, PIECE_BYTES, 20]
    joined = join_pieces(pieces, data.dtype, data.shape)
    assert np.shares_memory(joined, data) and np.array_equal(joined, data)
    copies = [p.copy() for p in pieces]  # apart: concatenated
    joined = join_pieces(copies, data.dtype, data.shape)
    assert not np.shares_memory(joined, copies[0]) and np.array_equal(joined, data)


@pytest.mark.parametrize("protocol", [4, 5])
def test_large_columns_survive_plain_pickle(protocol):
    stacked = StackedColumn(np.random.default_rng(0).random((300, 64, 64)), False)
    arrays = [np.full((n, 300), n, dtype=np.int32) for n in (500, 700, 900)]
    ragged = RaggedColumn.from_arrays(arrays, False)
    for column, data in ((stacked, stacked.data), (ragged, ragged.flat)):
        back = pickle.loads(pickle.dumps(column, protocol=protocol))
        got = back.data if isinstance(back, StackedColumn) else back.flat
        assert got.shape == data.shape and got.dtype == data.dtype
        np.testing.assert_array_equal(got, data)
    assert np.array_equal(back.row(1, True), arrays[1])


def test_a_column_read_from_the_store_is_one_view_of_the_stored_bytes(ray_address):
    data = np.random.default_rng(1).random((1365, 3, 64, 16)).astype(np.float32)
    back = ray.get(ray.put(StackedColumn(data, False)), timeout=60)
    np.testing.assert_array_equal(back.data, data)
    # Joined over the store's bytes: read-only and not a concatenated copy.
    assert not back.data.flags.writeable and not back.data.flags.owndata
    ragged = RaggedColumn.from_arrays([data[k] for k in range(40)], False)
    back = ray.get(ray.put(ragged), timeout=60)
    assert not back.flat.flags.writeable
    np.testing.assert_array_equal(back.row(7, True), data[7])
