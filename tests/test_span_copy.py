"""``copy_rows``: one copy of rows from several arrays, checked on private arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycache.span_copy import copy_rows, row_span


def pieces(dtype, row_shape, counts, seed=0):
    """Separately allocated arrays of ``dtype`` with distinct values in every row."""
    rng = np.random.default_rng(seed)
    out = []
    for count in counts:
        raw = rng.integers(0, 256, size=(count,) + row_shape + (np.dtype(dtype).itemsize,))
        out.append(raw.astype(np.uint8).view(dtype).reshape((count,) + row_shape).copy())
    return out


def copy_of(sources, which, rows):
    spans = [row_span(s) for s in sources]
    return copy_rows(sources, spans, np.asarray(which), np.asarray(rows, dtype=np.int64))


@pytest.mark.parametrize(
    "dtype, row_shape",
    [
        (np.float32, (3, 8, 8)),  # copied as 8-byte words
        (np.int32, (3,)),  # 12-byte rows: 4-byte words
        (np.float16, (3,)),  # 6-byte rows: 2-byte words
        (np.uint8, (5,)),  # 5-byte rows: bytes
        (np.bool_, (2, 3)),
        (np.complex128, ()),  # one value per row
        ("<U3", (2,)),
        ("datetime64[s]", (4,)),
    ],
)
def test_rows_of_several_arrays_are_copied_exactly(dtype, row_shape):
    sources = pieces(dtype, row_shape, [7, 1, 12, 5])
    rng = np.random.default_rng(1)
    which = rng.integers(0, len(sources), size=50)
    rows = [int(rng.integers(0, len(sources[w]))) for w in which]
    got = copy_of(sources, which, rows)
    expected = np.stack([sources[w][r] for w, r in zip(which, rows)])
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got.view(np.uint8), expected.view(np.uint8))
    assert got.flags.owndata and got.flags.writeable


def test_rows_at_unaligned_addresses_are_copied_exactly():
    # Arrays starting 1 byte into a buffer: the copy falls back to narrower words.
    buffer = np.zeros(1 + 6 * 8 * 8, dtype=np.uint8)
    buffer[1:] = np.arange(6 * 8 * 8) % 251
    odd = buffer[1:].view(np.uint8).reshape(6, 8, 8)
    aligned = np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8)
    got = copy_of([odd, aligned], [0, 1, 0, 1], [5, 3, 0, 0])
    assert np.array_equal(got, np.stack([odd[5], aligned[3], odd[0], aligned[0]]))


def test_rows_of_views_with_a_row_stride_of_their_own():
    # Every other row of a bigger array: rows contiguous, row stride twice the row.
    base = np.arange(10 * 6, dtype=np.float64).reshape(10, 6)
    every_other = base[::2]
    other = np.full((3, 6), -1.0)
    got = copy_of([every_other, other], [0, 0, 1, 0], [4, 1, 2, 0])
    assert np.array_equal(got, np.stack([base[8], base[2], other[2], base[0]]))


def test_one_torch_thread_gives_the_same_rows():
    sources = pieces(np.float32, (16, 1024), [4, 4, 4])
    which, rows = [2, 0, 1, 2, 0], [3, 0, 1, 0, 2]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = copy_of(sources, which, rows)
    finally:
        torch.set_num_threads(before)
    expected = np.stack([sources[w][r] for w, r in zip(which, rows)])
    assert np.array_equal(single.view(np.uint8), expected.view(np.uint8))
    assert np.array_equal(copy_of(sources, which, rows).view(np.uint8), expected.view(np.uint8))


@pytest.mark.parametrize("bad_row", [4, -1])
def test_a_row_out_of_its_array_is_refused(bad_row):
    sources = pieces(np.int64, (2,), [4, 9])
    message = f"row {bad_row} is out of range of its chunk \\(4 rows\\)"
    with pytest.raises(IndexError, match=message):
        copy_of(sources, [1, 0], [8, bad_row])


def test_arrays_whose_rows_are_not_plain_contiguous_bytes_have_no_span():
    assert row_span(np.zeros((4, 6))[:, ::2]) is None  # each row strided
    assert row_span(np.zeros((4, 3))[::-1]) is None  # rows run backwards
    assert row_span(np.array([None, 1], dtype=object)) is None
    assert row_span(np.float32(1.0)) is None
    assert row_span(np.zeros(())) is None
    address, stride, count = row_span(np.zeros((5, 3), dtype=np.int16))
    assert (stride, count) == (6, 5) and address > 0
