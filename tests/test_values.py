"""Chunk layout and value rules: exact round trips, refusals, sizes (no Ray)."""

import math

import numpy as np
import pytest
import torch

from raycache import DataCache, UnsupportedValueError
from raycache.chunk import Chunk
from raycache.values import copy_item


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
        (lambda: 0, "<item>"),
    ],
)
def test_unsupported_values_name_their_path(item, path):
    with pytest.raises(UnsupportedValueError) as err:
        copy_item(item)
    assert isinstance(err.value, RuntimeError)  # the seed's error type
    assert repr(path) in str(err.value)


def test_data_size_counts_shared_base_once():
    base = np.zeros(10_000, dtype=np.float64)
    one = DataCache._data_size({"a": base})
    two = DataCache._data_size({"a": base[:5000], "b": base[5000:]})
    assert 80_000 <= one < 81_000
    assert 80_000 <= two < 81_000
    assert DataCache._data_size({"a": np.zeros(10), "b": np.zeros(10)}) > 160
    with pytest.raises(RuntimeError):
        DataCache._data_size({"s": {1}})
