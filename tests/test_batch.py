"""Batched reads: ``__getitems__`` + ``ds.collate`` against the stock collate, real Ray."""

from __future__ import annotations

import contextlib
import uuid

import numpy as np
import pytest
import torch
from test_values import assert_same, rich_item
from torch.utils.data import DataLoader, default_collate

import raycache
import raycache.batch
import raycache.client.warm_index
import raycache.copy_choice
from raycache import CachedDataset, GatheredBatch
from raycache.protocol import chunk_ids


class ItemsProvider:
    """A map-style dataset over a function of the index (filled on miss, never pickled)."""

    def __init__(self, n, make):
        self.n = n
        self.make = make

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(int(i))


def plain_item(i):
    return {
        "image": np.full((3, 4, 4), i, dtype=np.float32),
        "label": i,
        "weight": i / 4,
        "flag": i % 3 == 0,
        "name": f"obj-{i}",
        "tensor": torch.arange(2, dtype=torch.int16) + i,
        "nested": {"pair": [np.array([i, -i], dtype=np.int64), 2 * i], "tup": (0.5 * i, "t")},
    }


@contextlib.contextmanager
def filled(name, make, n=200, chunk_size=16, order=None):
    """A dataset whose every item is cached, in chunks of at most ``chunk_size``."""
    config = {"raycache": {"name": name, "chunk_size": chunk_size}}
    ds = CachedDataset(ItemsProvider(n, make), config)
    try:
        for i in range(n) if order is None else order:
            ds[int(i)]
        assert ds.cache.flush(timeout=30)
        ds.cache.attach().sync(force=True)
        assert ds.cache.stats()["items"] == n
        yield ds
    finally:
        ds.cache.close()
        raycache.drop_cache(name)


def chunk_of(ds):
    return chunk_ids(ds.cache.client.inspect().locations)


def assert_collated_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_collated_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_collated_equal(x, y)
    else:
        assert type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def plain(ray_address):
    # Read-only for the tests that use it (test_modifying... checks that it stays so).
    rng = np.random.default_rng(0)
    name = f"t-plain-{uuid.uuid4().hex[:8]}"
    with filled(name, plain_item, order=rng.permutation(200)) as ds:  # chunks of scattered rows
        yield ds


@pytest.fixture
def grouping(monkeypatch, usual_path):
    # Gather per chunk as soon as each chunk holds 4 rows of the batch, so that the
    # small chunks of these tests take that path too (it normally needs 64).
    monkeypatch.setattr(raycache.batch, "GROUP_MIN_ROWS", 4)


def batches_for_every_path(ds):
    """Index batches that take the single-chunk, grouped and row-by-row gathers."""
    cids = chunk_of(ds)
    by_chunk = [np.flatnonzero(cids == c) for c in np.unique(cids)]
    single = by_chunk[0][::-1]
    grouped = np.concatenate([g[:4] for g in by_chunk[:3]])
    rows = np.array([g[0] for g in by_chunk])
    shuffled = np.random.default_rng(1).permutation(len(cids))[:64]
    return {"single": single, "grouped": grouped, "rows": rows, "shuffled": shuffled}


def test_gathered_items_equal_provider_items_on_every_path(plain, grouping):
    for path, idx in batches_for_every_path(plain).items():
        batch = plain.__getitems__(idx.tolist())
        assert isinstance(batch, GatheredBatch), path
        assert len(batch) == len(idx)
        for i, item in zip(idx, batch):
            assert_same(item, plain_item(int(i)))


def test_collate_equals_default_collate(plain, grouping):
    for path, idx in batches_for_every_path(plain).items():
        batch = plain.__getitems__(idx.tolist())
        fast = plain.collate(batch)
        assert_collated_equal(fast, default_collate(batch))
        assert_collated_equal(fast, default_collate([plain_item(int(i)) for i in idx]))
        assert fast["image"].shape == (len(idx), 3, 4, 4), path
        assert fast["name"] == [f"obj-{i}" for i in idx]


def test_dataloader_with_ds_collate_matches_stock_collate(plain):
    def loader(**kw):
        g = torch.Generator().manual_seed(7)
        return DataLoader(plain, batch_size=64, shuffle=True, generator=g, **kw)

    batches = 0
    for fast, stock in zip(loader(collate_fn=plain.collate), loader()):
        assert_collated_equal(fast, stock)
        batches += 1
    assert batches == 4


def test_modifying_batches_does_not_change_the_cache(plain):
    idx = batches_for_every_path(plain)["shuffled"].tolist()
    batch = plain.__getitems__(idx)
    for item in batch:
        item["image"] += 1000
        item["tensor"].mul_(0)
        item["nested"]["pair"][0][:] = 7
        item["label"] = -1
    collated = plain.collate(plain.__getitems__(idx))
    collated["image"].zero_()
    collated["tensor"].add_(5)
    collated["nested"]["pair"][0].fill_(9)
    for i, item in zip(idx, plain.__getitems__(idx)):
        assert_same(item, plain_item(i))
    assert_same(plain[idx[0]], plain_item(idx[0]))


def test_collated_tensors_own_their_memory(plain):
    idx = batches_for_every_path(plain)["rows"].tolist()
    first = plain.collate(plain.__getitems__(idx))
    second = plain.collate(plain.__getitems__(idx))
    first["image"].fill_(-1)
    assert torch.equal(second["image"][:, 0, 0, 0], torch.tensor(idx, dtype=torch.float32))


def test_rich_values_gather_exactly(ray_address, cache_name):
    with filled(cache_name, rich_item, n=48, chunk_size=8) as ds:
        idx = np.random.default_rng(2).permutation(48).tolist()
        batch = ds.__getitems__(idx)
        for i, item in zip(idx, batch):
            assert_same(item, rich_item(i))
        fast = ds.collate(batch)
        assert fast["int"].tolist() == idx
        assert fast["float"].dtype == torch.float64
        assert [t.tolist() for t in fast["ragged"]] == [list(range(i + 1)) for i in idx]
        assert fast["s"] == ["x" * i for i in idx]
        assert fast["none"] == [None] * len(idx)


LABELS = np.arange(48, dtype=np.int64) * 3
WEIGHTS = np.linspace(0, 1, 48, dtype=np.float32)


def numpy_scalars(i):
    # Labels and weights read from numpy arrays are numpy scalars, not Python numbers.
    return {"image": np.full(4, i, dtype=np.float32), "label": LABELS[i], "w": WEIGHTS[i]}


def test_numpy_scalar_fields_keep_their_type_in_items_and_tensors(ray_address, cache_name):
    with filled(cache_name, numpy_scalars, n=48, chunk_size=8) as ds:
        for idx in (np.random.default_rng(3).permutation(48)[:20].tolist(), [5, 6, 7]):
            batch = ds.__getitems__(idx)
            assert isinstance(batch, GatheredBatch)
            for i, got in zip(idx, batch):
                assert_same(got, numpy_scalars(i))
            fast = ds.collate(batch)
            assert_collated_equal(fast, default_collate([numpy_scalars(i) for i in idx]))
            assert fast["label"].dtype == torch.int64 and fast["w"].dtype == torch.float32
            assert fast["label"].tolist() == LABELS[idx].tolist()
            assert_collated_equal(default_collate(ds.__getitems__(idx)), fast)


def ragged_or_stacked(i):
    # Blocks of 32 indices alternate between one shape and a shape per item.
    side = 2 if (i // 32) % 2 == 0 else 1 + i % 3
    return {"image": np.full((side, side), i, dtype=np.int32), "label": i, "name": str(i)}


def test_ragged_and_mixed_chunks(ray_address, cache_name):
    with filled(cache_name, ragged_or_stacked, n=128, chunk_size=16) as ds:
        stacked_only = [i for i in range(128) if (i // 32) % 2 == 0][:40]
        mixed = list(range(0, 128, 3))
        for idx in (stacked_only, mixed):
            batch = ds.__getitems__(idx)
            assert isinstance(batch, GatheredBatch)
            for i, item in zip(idx, batch):
                assert_same(item, ragged_or_stacked(i))
            fast = ds.collate(batch)
            assert fast["label"].tolist() == idx
            assert fast["name"] == [str(i) for i in idx]
            images = fast["image"]
            if idx is stacked_only:
                assert isinstance(images, torch.Tensor) and images.shape == (len(idx), 2, 2)
                assert_collated_equal(fast, default_collate(batch))
            else:
                assert isinstance(images, list)
            for i, image in zip(idx, images):
                expected = torch.from_numpy(ragged_or_stacked(i)["image"])
                assert torch.equal(torch.as_tensor(image), expected)


def number_types_differ(i):
    # A field that is an int in some chunks and a float in others.
    return {"x": i if i < 16 else float(i), "v": np.full(2, i, dtype=np.float32)}


def test_field_of_other_kinds_in_other_chunks(ray_address, cache_name):
    with filled(cache_name, number_types_differ, n=32, chunk_size=16) as ds:
        idx = [0, 20, 3, 31]
        batch = ds.__getitems__(idx)
        for i, item in zip(idx, batch):
            assert_same(item, number_types_differ(i))
        fast = ds.collate(batch)
        assert fast["x"] == [0, 20.0, 3, 31.0]
        assert torch.equal(fast["v"][:, 0], torch.tensor(idx, dtype=torch.float32))


def other_structures(i):
    return {"a": i} if i % 2 else [i, np.arange(i)]


def test_items_of_different_structures_come_back_as_a_list(ray_address, cache_name):
    with filled(cache_name, other_structures, n=20, chunk_size=8) as ds:
        idx = list(range(20))
        batch = ds.__getitems__(idx)
        assert not isinstance(batch, GatheredBatch)
        for i, item in zip(idx, batch):
            assert_same(item, other_structures(i))


def test_partly_cached_batch_reads_misses_from_provider(ray_address, cache_name):
    ds = CachedDataset(ItemsProvider(40, plain_item), {"raycache": {"name": cache_name}})
    try:
        for i in range(0, 40, 2):
            ds[i]
        assert ds.cache.flush(timeout=30)
        idx = list(range(10))
        batch = ds.__getitems__(idx)
        for i, item in zip(idx, batch):
            assert_same(item, plain_item(i))
        assert_collated_equal(ds.collate(batch), default_collate([plain_item(i) for i in idx]))
    finally:
        ds.cache.close()
        raycache.drop_cache(cache_name)


def shares_memory(tensor, array):
    return tensor.untyped_storage().data_ptr() == array.__array_interface__["data"][0]


def test_default_collate_returns_the_gathered_arrays_without_stacking_again(plain, grouping):
    for path, idx in batches_for_every_path(plain).items():
        batch = plain.__getitems__(idx.tolist())
        images = [item["image"] for item in batch]
        stacked = torch.from_numpy(np.stack(images))
        tensors = torch.stack([item["tensor"] for item in batch])
        out = default_collate(batch)
        assert_collated_equal(out, default_collate([plain_item(int(i)) for i in idx]))
        # The fast path: the batch tensor is the array the items are rows of.
        assert shares_memory(out["image"], images[0]), path
        assert torch.equal(out["image"], stacked) and torch.equal(out["tensor"], tensors)
        out["image"].fill_(-5)  # private memory: the cache is untouched
        assert_same(plain[int(idx[0])], plain_item(int(idx[0])))


def test_default_collate_copies_rows_that_are_not_one_whole_batch_in_order(plain):
    idx = batches_for_every_path(plain)["shuffled"].tolist()
    batch = plain.__getitems__(idx)
    for items, which in ((batch[::-1], idx[::-1]), (batch[:10], idx[:10])):
        out = default_collate(items)
        assert_collated_equal(out, default_collate([plain_item(i) for i in which]))
        assert not shares_memory(out["image"], batch[0]["image"])
    other = plain.__getitems__(idx)
    mixed = batch[:32] + other[32:]
    assert_collated_equal(default_collate(mixed), default_collate([plain_item(i) for i in idx]))
    derived = [{**item, "image": item["image"] * 2} for item in batch]
    out = default_collate(derived)
    assert torch.equal(out["image"][:, 0, 0, 0], 2 * torch.tensor(idx, dtype=torch.float32))


def test_default_collate_hands_the_gathered_array_out_once(plain):
    idx = batches_for_every_path(plain)["rows"].tolist()
    batch = plain.__getitems__(idx)
    first, second = default_collate(batch), default_collate(batch)
    first["image"].fill_(-1)
    first["tensor"].fill_(-1)
    assert torch.equal(second["image"][:, 0, 0, 0], torch.tensor(idx, dtype=torch.float32))
    assert second["tensor"][:, 0].tolist() == idx
    batch = plain.__getitems__(idx)
    fast = plain.collate(batch)
    stock = default_collate(batch)
    fast["image"].fill_(-1)
    assert torch.equal(stock["image"][:, 0, 0, 0], torch.tensor(idx, dtype=torch.float32))


def test_stock_collate_of_other_arrays_is_unchanged():
    arrays = [np.full((2, 2), i, dtype=np.float32) for i in range(4)]
    views = list(np.arange(12.0).reshape(3, 4))  # rows of an array raycache did not gather
    assert torch.equal(default_collate(arrays), torch.from_numpy(np.stack(arrays)))
    out = default_collate(views)
    assert torch.equal(out, torch.arange(12.0, dtype=torch.float64).reshape(3, 4))
    assert not shares_memory(out, views[0])
    with pytest.raises(TypeError):
        default_collate([np.array(["a"]), np.array(["b"])])


def test_stock_collate_in_forked_workers_matches_the_main_process(plain):
    def loader(**kw):
        g = torch.Generator().manual_seed(11)
        return DataLoader(plain, batch_size=32, shuffle=True, generator=g, **kw)

    batches = 0
    ctx = torch.multiprocessing.get_context("fork")
    for mine, theirs in zip(loader(), loader(num_workers=2, multiprocessing_context=ctx)):
        assert_collated_equal(mine, theirs)
        for i, image in zip(theirs["label"].tolist(), theirs["image"]):
            assert torch.equal(image, torch.full((3, 4, 4), float(i)))
        batches += 1
    assert batches == 7


def test_a_gathered_batch_behaves_as_its_list_of_items(ray_address):
    # The items are built on first use as a list; every way of using it sees them.
    import copy
    import pickle

    idx = [9, 2, 30, 2]
    want = [plain_item(i) for i in idx]
    with filled(f"t-{uuid.uuid4().hex[:8]}", plain_item, n=40, chunk_size=8) as ds:
        uses = {
            "len": lambda b: [len(b)] * len(idx),
            "iter": list,
            "index": lambda b: [b[k] for k in range(len(idx))],
            "slice": lambda b: b[::-1][::-1],
            "reversed": lambda b: list(reversed(b))[::-1],
            "concat": lambda b: ([0] + b)[1:],
            "concat right": lambda b: (b + [0])[:-1],
            "repeat": lambda b: (2 * b)[len(idx) :],
            "pickle": lambda b: pickle.loads(pickle.dumps(b)),
            "deepcopy": copy.deepcopy,
            "tuple": tuple,
            "pop": lambda b: [b.pop(0) for _ in range(len(idx))],
        }
        for use, read in uses.items():
            got = read(ds.__getitems__(idx))
            if use == "len":
                assert got == [len(idx)] * len(idx), use
                continue
            assert len(got) == len(idx), use
            for item, expected in zip(got, want):
                assert_same(item, expected)
        batch = ds.__getitems__(idx)
        tensors = ds.collate(batch)  # from the gathered arrays alone
        assert tensors["label"].tolist() == idx
        for item, expected in zip(batch, want):  # built after collate: still right
            assert_same(item, expected)
        stacked = default_collate(batch)
        assert torch.equal(stacked["image"], tensors["image"])
        stacked["image"] += 1  # a copy: collate's tensors and the items keep their values
        assert torch.equal(tensors["image"], default_collate(want)["image"])
        assert_same(batch[0], want[0])


@pytest.fixture
def torch_threads():
    """Set torch's intra-op threads for a test (copy_rows is used with 2 or more)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def copy_calls(monkeypatch, copy_counter):
    """Count copy_rows calls; every copy big enough for it takes it (not measured)."""
    monkeypatch.setattr(raycache.copy_choice.CHOOSER, "forced", True)
    return copy_counter


@pytest.fixture
def copy_counter(monkeypatch, torch_threads):
    """Count copy_rows calls; torch gets 2 threads, so that batches may take it."""
    torch_threads(2)
    raycache.copy_choice.CHOOSER.reset()
    calls = []
    real = raycache.batch.copy_rows

    def counted(*args):
        calls.append(len(args[0]))
        return real(*args)

    monkeypatch.setattr(raycache.batch, "copy_rows", counted)
    return calls


@pytest.fixture
def usual_path(monkeypatch):
    """Read every batch the usual way: no warm index serves it (``client/warm_index.py``)."""
    monkeypatch.setattr(raycache.client.warm_index.WarmReads, "batch", lambda self, idx: None)


@pytest.fixture
def copying(monkeypatch, copy_calls, usual_path):
    # Copy every array column of a batch with one copy_rows call, however small the batch
    # (by default only columns of 512 KiB a batch and more are).
    monkeypatch.setattr(raycache.batch, "COPY_ROWS_MIN_BYTES", 1)
    return copy_calls


def test_one_copy_over_all_chunks_gathers_exactly_on_every_path(plain, copying):
    for path, idx in batches_for_every_path(plain).items():
        del copying[:]
        batch = plain.__getitems__(idx.tolist())
        assert copying, path  # the array columns (image, tensor, nested pair) took it
        for i, item in zip(idx, batch):
            assert_same(item, plain_item(int(i)))
        batch = plain.__getitems__(idx.tolist())
        expected = default_collate([plain_item(int(i)) for i in idx])
        assert_collated_equal(plain.collate(batch), expected)
        batch = plain.__getitems__(idx.tolist())
        images = [item["image"] for item in batch]
        assert shares_memory(default_collate(images), images[0].base)  # not stacked again


def test_one_copy_over_all_chunks_gathers_rich_values_exactly(ray_address, cache_name, copying):
    with filled(cache_name, rich_item, n=48, chunk_size=8) as ds:
        idx = np.random.default_rng(3).permutation(48).tolist()
        batch = ds.__getitems__(idx)
        assert copying
        for i, item in zip(idx, batch):
            assert_same(item, rich_item(i))
        fast = ds.collate(ds.__getitems__(idx))
        f32 = np.stack([rich_item(i)["f32"] for i in idx])
        assert torch.equal(fast["f32"], torch.from_numpy(f32))
        assert torch.equal(fast["tensor"], torch.stack([rich_item(i)["tensor"] for i in idx]))


def big_item(i):
    return {"image": np.full((16, 1024), i, dtype=np.float32), "label": i}


def test_big_shuffled_batches_are_copied_at_once_by_default(ray_address, cache_name, copy_calls):
    # 64 KiB rows: a batch of 16 is 1 MiB, over the default COPY_ROWS_MIN_BYTES.
    order = np.random.default_rng(4).permutation(96)
    with filled(cache_name, big_item, n=96, chunk_size=8, order=order) as ds:
        loader = DataLoader(ds, batch_size=16, shuffle=True, collate_fn=ds.collate)
        seen = []
        for batch in loader:
            labels = batch["label"].tolist()
            assert torch.equal(batch["image"][:, 5, 7], torch.tensor(labels, dtype=torch.float32))
            assert torch.equal(batch["image"].amin(dim=(1, 2)), batch["image"].amax(dim=(1, 2)))
            seen += labels
        assert sorted(seen) == list(range(96))
        assert len(copy_calls) == 6  # one per batch


def test_with_one_torch_thread_big_batches_are_copied_row_by_row(
    ray_address, cache_name, copy_counter, torch_threads
):
    torch_threads(1)
    order = np.random.default_rng(5).permutation(64)
    with filled(cache_name, big_item, n=64, chunk_size=8, order=order) as ds:
        idx = np.random.default_rng(6).permutation(64)[:32].tolist()
        batch = ds.collate(ds.__getitems__(idx))
        assert torch.equal(batch["image"][:, 3, 9], torch.tensor(idx, dtype=torch.float32))
        assert copy_counter == []


def test_big_batches_are_exact_whichever_way_the_copy_is_chosen(
    ray_address, cache_name, copy_counter
):
    # The chooser learns by timing both ways: the batches it learns on must be right too.
    order = np.random.default_rng(7).permutation(96)
    with filled(cache_name, big_item, n=96, chunk_size=8, order=order) as ds:
        rng = np.random.default_rng(8)
        for _ in range(12):
            idx = rng.permutation(96)[:16].tolist()
            batch = ds.collate(ds.__getitems__(idx))
            assert torch.equal(batch["image"][:, 2, 5], torch.tensor(idx, dtype=torch.float32))
    seen = raycache.copy_choice.CHOOSER.snapshot()
    assert seen["pool"]["samples"] >= 3 and seen["one_thread"]["samples"] >= 3
    assert len(copy_counter) >= 4  # the pool's copies, its first (unmeasured) included
