"""Chunk layout and value rules: exact round trips, refusals, sizes (no Ray)."""

import math
import pickle
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from raycache import DataCache, UnsupportedValueError
from raycache.chunk import Chunk, flatten_checked, flatten_item
from raycache.chunk_builder import ChunkBuilder
from raycache.columns import NumberColumn, ObjectColumn
from raycache.values import check_item, copy_item


def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def rich_item(i):
    return {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3) + i,
        "f16": np.ones(4, dtype=np.float16) * i,
        "u64": np.array([2**63 + i], dtype=np.uint64),
        "c64": np.array([1 + 2j * i], dtype=np.complex64),
        "bool": np.array([True, i % 2 == 0]),
        "scalar0d": np.array(3.5 + i),
        "empty": np.zeros((0, 3), dtype=np.int16),
        "ustr": np.array(["ab", "c" * (i + 1)]),
        "ragged": np.arange(i + 1, dtype=np.int32),
        "int": i,
        "big": 2**80 + i,
        "float": 0.1 * i,
        "nan": float("nan"),
        "inf": float("-inf"),
        "flag": i % 2 == 0,
        "s": "x" * i,
        "b": bytes([i % 256]) * 3,
        "none": None,
        "npscalar": np.float32(i) / 3,
        "nested": {"list": [1, "two", (3.0, None)], "tuple": (np.int8(i), [b"x"])},
        "tensor": torch.arange(3, dtype=torch.int16) * i,
        "tensor_ragged": torch.ones(i + 1),
    }


def test_columnar_round_trip_is_exact():
    items = [rich_item(i) for i in range(5)]
    chunk = Chunk.from_rows(range(100, 105), [copy_item(x) for x in items])
    assert chunk.template is not None
    for r, item in enumerate(items):
        assert_same(chunk.row(r), item)
    assert list(chunk.indices) == list(range(100, 105))


@pytest.mark.parametrize("kind", [np.int64, np.int8, np.uint32, np.float32, np.float64, np.bool_])
def test_numpy_scalars_of_one_type_are_one_array_and_come_back_as_that_type(kind):
    values = [kind(i % 2 if kind is np.bool_ else i) for i in range(9)]
    chunk = Chunk.from_rows(range(9), [{"label": v} for v in values])
    (column,) = chunk.columns
    assert isinstance(column, NumberColumn) and column.data.dtype == np.dtype(kind)
    for r, v in enumerate(values):
        assert_same(chunk.row(r)["label"], v)
    taken = column.take(np.array([4, 1]))
    assert_same(taken.row(0, True), values[4])


@pytest.mark.parametrize(
    "values",
    [
        [np.int64(1), np.int32(2)],  # two numpy types
        [np.int64(1), 2],  # numpy and Python
        [np.datetime64("2020-01-01"), np.datetime64("2020-01-02")],  # not a number
        [np.str_("a"), np.str_("b")],
    ],
    ids=["two-types", "numpy-and-python", "datetime", "str"],
)
def test_values_that_are_not_numpy_numbers_of_one_type_stay_as_they_are(values):
    chunk = Chunk.from_rows(range(len(values)), [{"v": v} for v in values])
    assert isinstance(chunk.columns[0], ObjectColumn)
    for r, v in enumerate(values):
        assert_same(chunk.row(r)["v"], v)


def test_a_number_column_pickled_before_numpy_scalars_had_one_reads_python_numbers():
    column = NumberColumn(np.arange(3, dtype=np.int64))
    del column.__dict__["scalar"]  # as a chunk stored by an earlier version unpickles
    assert_same(pickle.loads(pickle.dumps(column)).row(2, True), 2)


def _column_kinds(chunk):
    return [(type(c).__name__, getattr(c, "data", np.empty(0)).dtype) for c in chunk.columns]


def _built(items, order, keep=None):
    """Add ``items`` to a builder from 4 threads in ``order``; build the ``keep`` rows."""
    builder = ChunkBuilder(len(items))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: builder.add(p, items[p]), order))
    keep = np.arange(len(items)) if keep is None else np.asarray(keep)
    return builder.build(keep + 100, keep)


def fixed_item(i):
    """``rich_item`` without the leaves whose shape or dtype changes with ``i``."""
    item = rich_item(i)
    for key in ("ragged", "tensor_ragged", "ustr"):
        del item[key]
    return item


@pytest.mark.parametrize(
    "make",
    [rich_item, fixed_item, lambda i: np.full((2, 3), i, dtype=np.float32)],
    ids=["ragged", "fixed", "bare-array"],
)
def test_chunk_builder_makes_the_chunk_from_rows_makes(make):
    items = [make(i) for i in range(7)]
    order = [3, 0, 6, 1, 5, 2, 4]
    for keep in (None, [0, 2, 3, 6]):  # every row, and with failed reads left out
        chunk = _built(items, order, keep)
        rows = list(range(7)) if keep is None else keep
        want = Chunk.from_rows([r + 100 for r in rows], [copy_item(items[r]) for r in rows])
        assert list(chunk.indices) == list(want.indices)
        assert chunk.template == want.template
        assert _column_kinds(chunk) == _column_kinds(want)
        for r, i in enumerate(rows):
            assert_same(chunk.row(r), items[i])


def test_chunk_builder_copies_and_falls_back_for_items_that_do_not_fit():
    base = [{"x": np.full(3, i, dtype=np.int64), "t": torch.ones(2) * i} for i in range(4)]
    odd = [
        {"x": np.arange(5), "t": torch.ones(2)},  # another shape: ragged column
        {"x": np.arange(3, dtype=np.int32), "t": torch.ones(2)},  # another dtype
        {"x": np.arange(3), "t": np.ones(2, dtype=np.float32)},  # an array, not a tensor
        {"x": np.arange(3)},  # another structure
        {"x": 3, "t": torch.ones(2)},  # a number where the others hold an array
    ]
    for other in odd:
        items = base + [other]
        builder = ChunkBuilder(len(items))
        for p, item in enumerate(items):
            builder.add(p, item)
        chunk = builder.build(np.arange(len(items)), np.arange(len(items)))
        want = Chunk.from_rows(range(len(items)), [copy_item(x) for x in items])
        assert chunk.template == want.template
        assert _column_kinds(chunk) == _column_kinds(want)
        for r, item in enumerate(items):
            assert_same(chunk.row(r), item)
    # The builder copies: changing an added item afterwards changes nothing cached.
    source = {"x": np.zeros(3), "t": torch.zeros(2)}
    builder = ChunkBuilder(1)
    builder.add(0, source)
    source["x"][:] = 9
    source["t"][:] = 9
    row = builder.build(np.array([5]), np.array([0])).row(0)
    assert row["x"].sum() == 0 and row["t"].sum() == 0
    nothing = np.array([], dtype=np.int64)
    assert builder.build(nothing, nothing).indices.size == 0


Pair = namedtuple("Pair", "x y")


def test_a_namedtuple_leaf_keeps_its_fields_in_line():
    # A namedtuple is a leaf of the item's structure; its fields once shifted the
    # columns after it, serving one field's value for another.
    items = [{"a": Pair(i, np.full(2, i)), "b": i + 10} for i in range(3)]
    for chunk in (Chunk.from_rows(range(3), items), _built(items, [2, 0, 1])):
        for r, item in enumerate(items):
            row = chunk.row(r)
            assert row["b"] == item["b"]
            assert type(row["a"]) is Pair and row["a"].x == item["a"].x
            np.testing.assert_array_equal(row["a"].y, item["a"].y)
            assert not np.shares_memory(row["a"].y, item["a"].y)


def test_mixed_structures_fall_back_to_rows():
    items = [{"a": 1}, {"b": np.arange(3)}, [1, 2], (None,), np.ones(2)]
    chunk = Chunk.from_rows(range(5), [copy_item(x) for x in items])
    assert chunk.template is None
    for r, item in enumerate(items):
        assert_same(chunk.row(r), item)


def test_take_and_concat_keep_rows():
    a = Chunk.from_rows([0, 1, 2], [rich_item(i) for i in range(3)])
    b = Chunk.from_rows([7, 8], [rich_item(i) for i in (7, 8)])
    c = Chunk.concat([a.take(np.array([2, 0])), b])
    assert list(c.indices) == [2, 0, 7, 8]
    for r, i in enumerate([2, 0, 7, 8]):
        assert_same(c.row(r), rich_item(i))


def test_concat_keeps_each_chunk_arrays_or_tensors():
    # Segments of one item each, as a trainer filling on miss sends them when it flushes
    # often: a field that is a tensor in some items and an array in others.
    items = [
        {"x": torch.full((2,), float(i)) if i % 2 else np.full(2, i, dtype=np.float32)}
        for i in range(4)
    ]
    merged = Chunk.concat([Chunk.from_rows([i], [copy_item(item)]) for i, item in enumerate(items)])
    for r, item in enumerate(items):
        assert_same(merged.row(r), item)


def test_big_endian_arrays_keep_their_byte_order_in_every_column():
    stacked = [np.arange(3).astype(">f4") for _ in range(3)]
    ragged = [np.arange(i + 1).astype(">i8") for i in range(3)]
    items = [{"s": s, "r": r} for s, r in zip(stacked, ragged)]
    chunks = [Chunk.from_rows([i], [copy_item(item)]) for i, item in enumerate(items)]
    for chunk in [Chunk.from_rows(range(3), [copy_item(x) for x in items]), Chunk.concat(chunks)]:
        for r, item in enumerate(items):
            row = chunk.row(r)
            assert row["s"].dtype.str == ">f4" and row["r"].dtype.str == ">i8", row
            assert_same(row, item)


def test_rows_are_copies_unless_zero_copy():
    chunk = Chunk.from_rows([0], [{"x": np.zeros(3)}])
    row = chunk.row(0)
    row["x"][:] = 5
    assert chunk.row(0)["x"].sum() == 0
    view = chunk.row(0, copy=False)["x"]
    assert np.shares_memory(view, chunk.columns[0].data)


def test_copy_item_does_not_share_buffers():
    src = {"a": np.zeros(4), "t": torch.zeros(2)}
    out = copy_item(src)
    src["a"][:] = 1
    src["t"][:] = 1
    assert out["a"].sum() == 0 and out["t"].sum() == 0


@pytest.mark.parametrize(
    "item,path",
    [
        ({"data": {"bad": {1, 2}}}, "data.bad"),
        ({"x": [0, object()]}, "x[1]"),
        ({"obj": np.array([None, 1], dtype=object)}, "obj"),
        ({"m": np.ma.masked_array([1.0, 2.0], mask=[0, 1])}, "m"),
        ({"mat": np.matrix([[1, 2]])}, "mat"),
        (lambda: 0, "<item>"),
    ],
)
def test_unsupported_values_name_their_path(item, path):
    with pytest.raises(UnsupportedValueError) as err:
        copy_item(item)
    assert isinstance(err.value, RuntimeError)  # the seed's error type
    assert repr(path) in str(err.value)


@pytest.mark.parametrize(
    "item,path",
    [
        ({"data": {"bad": {1, 2}}}, "data.bad"),
        ({"x": [0, object()]}, "x[1]"),
        ({"t": (1, (2, [3, object()]))}, "t[1][1][1]"),
        ({"obj": np.array([None, 1], dtype=object)}, "obj"),
        ({"nt": Pair(1, object())}, "nt[1]"),
        (lambda: 0, "<item>"),
    ],
)
def test_flattening_an_insert_refuses_what_check_item_refuses(item, path):
    """One walk validating and flattening raises check_item's error, same path."""
    with pytest.raises(UnsupportedValueError) as checked:
        check_item(item)
    with pytest.raises(UnsupportedValueError) as flattened:
        flatten_checked(item, [])
    assert str(flattened.value) == str(checked.value)
    assert repr(path) in str(flattened.value)


@pytest.mark.parametrize(
    "item", [rich_item(3), {"nt": Pair(1, 2.0), "l": [Pair(3, "x")]}, [1, (2, [3])], 7]
)
def test_flattening_an_insert_gives_flatten_items_template_and_leaves(item):
    """The validating walk yields the very template and leaves of flatten_item."""
    plain, checked = [], []
    assert flatten_checked(item, checked) == flatten_item(item, plain)
    assert len(plain) == len(checked)
    assert all(a is b for a, b in zip(plain, checked))


def test_data_size_counts_shared_base_once():
    base = np.zeros(10_000, dtype=np.float64)
    one = DataCache._data_size({"a": base})
    two = DataCache._data_size({"a": base[:5000], "b": base[5000:]})
    assert 80_000 <= one < 81_000
    assert 80_000 <= two < 81_000
    assert DataCache._data_size({"a": np.zeros(10), "b": np.zeros(10)}) > 160
    with pytest.raises(RuntimeError):
        DataCache._data_size({"s": {1}})
