"""``raycache.hyrax``: version pick, ``install()``, and the 0.9+ ``DataCache`` API itself.

These tests need no Hyrax: ``install()`` is tried against a stand-in ``hyrax`` package
put in ``sys.modules`` (its version and its ``datasets.data_cache`` module), and the
0.9+ class is driven the way Hyrax's ``DataProvider.resolve_data`` drives it, over a
dataset with an ``augment_cache_key``. ``tests/test_hyrax09_real.py`` runs real Hyrax.
"""

from __future__ import annotations

import pickle
import sys
import types
import uuid
from collections import Counter

import numpy as np
import pytest
import torch

import raycache
import raycache.hyrax
from raycache.hyrax.keyed import AugmentSlots, check_key, slot_of
from raycache.hyrax.plain import plain_item
from raycache.hyrax.versions import UnsupportedHyraxError, class_path_for


@pytest.mark.parametrize(
    "version,path",
    [
        ("0.8.3", "raycache.data_cache:DataCache"),
        ("0.9.0", "raycache.hyrax.cache_v09:DataCache"),
        ("0.11.2", "raycache.hyrax.cache_v09:DataCache"),
        ("0.13", "raycache.hyrax.cache_v09:DataCache"),
    ],
)
def test_version_picks_the_class(version, path):
    assert class_path_for(version) == path


@pytest.mark.parametrize("version", ["0.7.9", "0.14.0", "1.0", "not-a-version"])
def test_unsupported_versions_are_refused_naming_the_supported(version):
    with pytest.raises(UnsupportedHyraxError, match=r"0\.8\.x and 0\.9-0\.13"):
        class_path_for(version)


@pytest.fixture
def fake_hyrax(monkeypatch):
    """A ``hyrax`` package with a version and a ``datasets.data_cache.DataCache``."""

    def make(version):
        hyrax = types.ModuleType("hyrax")
        hyrax.__version__ = version
        datasets = types.ModuleType("hyrax.datasets")
        data_cache = types.ModuleType("hyrax.datasets.data_cache")
        data_cache.DataCache = object
        monkeypatch.setitem(sys.modules, "hyrax", hyrax)
        monkeypatch.setitem(sys.modules, "hyrax.datasets", datasets)
        monkeypatch.setitem(sys.modules, "hyrax.datasets.data_cache", data_cache)
        return data_cache

    return make


def test_install_swaps_the_class_hyrax_imports(fake_hyrax):
    module = fake_hyrax("0.13")
    assert raycache.hyrax.install() is raycache.hyrax.DataCache
    assert module.DataCache is raycache.hyrax.DataCache
    module = fake_hyrax("0.8.3")
    assert raycache.hyrax.install() is raycache.DataCache
    assert module.DataCache is raycache.DataCache


def test_install_refuses_an_unsupported_hyrax(fake_hyrax):
    module = fake_hyrax("0.14")
    with pytest.raises(UnsupportedHyraxError, match="Hyrax 0.14 is not supported"):
        raycache.hyrax.install()
    assert module.DataCache is object  # left as it was


def test_keys_map_to_slots_and_must_be_int64():
    assert {slot_of(k, 7) for k in range(1000)} == set(range(7))
    assert slot_of(-5, 10) == slot_of(-5, 10)
    assert check_key(np.int64(-3), "data") == -3
    with pytest.raises(TypeError, match="augment_cache_key of dataset 'data' returned str"):
        check_key("3", "data")
    with pytest.raises(TypeError, match="outside int64"):
        check_key(2**63, "data")


def test_plain_item_converts_str_subclasses_and_keeps_plain_items():
    class Tomlish(str):
        pass

    image = np.zeros(3)
    item = {Tomlish("image"): image, "id": Tomlish("7")}
    out = plain_item(item)
    assert [type(k) for k in out] == [str, str] and type(out["id"]) is str
    assert out["image"] is image
    plain = {"image": image, "id": "7"}
    assert plain_item(plain) is plain


READS: Counter = Counter()


class AugmentedDataset:
    """A Hyrax 0.9+ dataset: ``get_<field>`` getters and an ``augment_cache_key``."""

    def __init__(self, n: int, tag: str, variants: int = 2):
        self.n, self.tag, self.variants = n, tag, variants

    @property
    def reads(self):
        # Kept outside the dataset's state: the state is the cache's identity.
        return READS[self.tag, id(self)]

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        return self.get_image(idx)

    def get_image(self, idx):
        READS[self.tag, id(self)] += 1
        return np.full((4, 4), idx, dtype=np.float32)

    def augment_cache_key(self, real_idx, rng_seed):
        if rng_seed < 0:
            return None  # this seed's result is not worth caching
        return np.int64(real_idx * self.variants + rng_seed % self.variants)


def resolve(cache, dataset, idx, seed=None):
    """What Hyrax 0.13's ``resolve_data`` does for one dataset named ``data``."""
    cached, augmented = cache.try_fetch("data", idx, seed)
    if cached is not None and (augmented or seed is None):
        return cached
    base = cached if cached is not None else {"image": dataset.get_image(idx)}
    if cached is None:
        cache.insert_base("data", idx, base)
    if seed is None:
        return base
    out = {"image": base["image"] + seed % dataset.variants}
    cache.insert_augmented("data", idx, seed, out)
    return out


def config(**raycache_keys):
    return {"data_set": {"use_cache": True}, "raycache": dict(linger_s=1.0, **raycache_keys)}


def test_api_returns_hyrax_types_and_shares_by_dataset_identity(ray_address):
    tag = uuid.uuid4().hex
    first, second = AugmentedDataset(20, tag), AugmentedDataset(20, tag)
    train = raycache.hyrax.DataCache(config(), {"data": first}, {"data": False})
    validate = raycache.hyrax.DataCache(config(), {"data": second}, {"data": False})
    try:
        assert train.try_fetch("data", 3) == (None, False)
        for idx in range(20):
            resolve(train, first, idx)
        # Another provider over an equal dataset reads nothing: one shared cache.
        for idx in range(20):
            item = resolve(validate, second, idx)
            np.testing.assert_array_equal(item["image"], np.full((4, 4), idx))
        assert (first.reads, second.reads) == (20, 0)
        name = train.shared_caches["data"].name
        assert validate.shared_caches["data"].name == name
        assert raycache.list_caches().count(name) == 1
        with pytest.raises(KeyError, match="no dataset named 'other'"):
            train.try_fetch("other", 0)
        with pytest.raises(IndexError):
            train.insert_base("data", 20, {"image": np.zeros(1)})
        assert train._data_size({"a": np.zeros(10)}) >= 80
    finally:
        train.disable()
        validate.disable()
        raycache.drop_cache(name)


def test_augmented_items_live_under_their_keys(ray_address):
    dataset = AugmentedDataset(10, uuid.uuid4().hex)
    cache = raycache.hyrax.DataCache(config(), {"data": dataset}, {"data": True})
    # Room enough that these 20 keys get 20 rows (slot_of is deterministic).
    cache.augment_slots_per_item = 1000
    try:
        for seed in (np.int64(4), np.int64(5)):  # two variants per index
            for idx in range(10):
                resolve(cache, dataset, idx, seed)
        assert dataset.reads == 10
        for idx in range(10):
            item, augmented = cache.try_fetch("data", idx, np.int64(9))  # 9 % 2 == 5 % 2
            assert augmented and item["image"][0, 0] == idx + 1
            item, augmented = cache.try_fetch("data", idx, np.int64(-1))  # opted out
            assert not augmented and item["image"][0, 0] == idx
    finally:
        cache.disable()
        base = next(n for n in raycache.list_caches() if n.startswith("AugmentedDataset"))
        raycache.drop_cache(base)
        raycache.drop_cache(f"{base}-augmented")


class DictTable:
    """The two calls ``AugmentSlots`` makes of a shared cache, on a dict (first value kept)."""

    def __init__(self):
        self.rows = {}

    def try_fetch(self, idx):
        return self.rows.get(idx)

    def insert_into_cache(self, idx, data):
        self.rows.setdefault(idx, data)


def test_a_key_whose_row_holds_another_key_is_a_miss():
    slots = AugmentSlots(DictTable(), 5)
    first = 11
    other = next(k for k in range(12, 1000) if slot_of(k, 5) == slot_of(first, 5))
    slots.put(first, {"v": 1})
    slots.put(other, {"v": 2})  # same row: not stored, the first key keeps it
    assert slots.get(first) == {"v": 1}
    assert slots.get(other) is None


def test_disable_detaches_and_pickled_copies_attach(ray_address):
    dataset = AugmentedDataset(8, uuid.uuid4().hex)
    cache = raycache.hyrax.DataCache(config(), {"data": dataset}, {"data": False})
    for idx in range(8):
        resolve(cache, dataset, idx)
    name = cache.shared_caches["data"].name
    copy = pickle.loads(pickle.dumps(cache))
    try:
        assert copy.shared_caches["data"].client is not None  # attached on unpickling
        assert copy.try_fetch("data", 5)[0] is not None
        cache.disable()
        assert cache.try_fetch("data", 5) == (None, False)
        assert cache.shared_caches == {}
        assert copy.try_fetch("data", 5)[0] is not None  # the shared cache stays
    finally:
        copy.disable()
        raycache.drop_cache(name)


def test_use_cache_off_caches_nothing(ray_address):
    dataset = AugmentedDataset(4, uuid.uuid4().hex)
    off = {"data_set": {"use_cache": False}}
    cache = raycache.hyrax.DataCache(off, {"data": dataset}, {"data": False})
    cache.insert_base("data", 1, {"image": np.zeros(1)})
    assert cache.try_fetch("data", 1) == (None, False)
    assert cache.shared_caches == {}


class LoggedDataset(AugmentedDataset):
    """Logs each read to a file: forked workers' reads are counted in the test process."""

    def __init__(self, n, tag, log):
        super().__init__(n, tag)
        self.log = str(log)

    def get_image(self, idx):
        with open(self.log, "a") as f:
            f.write(f"{idx}\n")
        return super().get_image(idx)


class HyraxLike(torch.utils.data.Dataset):
    """A provider the way Hyrax 0.13 uses its cache, for a torch DataLoader."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.cache = raycache.hyrax.DataCache(config(), {"data": dataset}, {"data": False})

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        return resolve(self.cache, self.dataset, idx)["image"]


@pytest.mark.parametrize("persistent", [True, False])
def test_forked_workers_read_each_item_once(ray_address, tmp_path, persistent):
    log = tmp_path / "reads.log"
    provider = HyraxLike(LoggedDataset(64, uuid.uuid4().hex, log))
    sampler = torch.utils.data.RandomSampler(
        provider, replacement=True, num_samples=96, generator=torch.Generator().manual_seed(3)
    )
    loader = torch.utils.data.DataLoader(
        provider,
        batch_size=8,
        sampler=sampler,
        num_workers=2,
        persistent_workers=persistent,
        multiprocessing_context="fork",  # as Hyrax 0.9+ does
    )
    name = provider.cache.shared_caches["data"].name
    try:
        seen = set()
        for _ in range(3):
            for batch in loader:
                seen.update(int(v) for v in batch[:, 0, 0])
        counts = Counter(int(line) for line in log.read_text().split())
        assert set(counts) == seen
        assert max(counts.values()) == 1, {i: n for i, n in counts.items() if n > 1}
    finally:
        del loader
        provider.cache.disable()
        raycache.drop_cache(name)


def test_forked_worker_asks_its_parent_once_per_miss(ray_address, tmp_path, monkeypatch):
    """A miss in a forked worker is one question to the parent (the Hyrax cache's own).

    The worker reads what was mapped at its fork locally; the raycache client's own
    question to the parent (``ForkReads.take``) is not asked on top of it.
    """
    from raycache.client.fork_reads import ForkReads

    asked = tmp_path / "asked.log"
    take = ForkReads.take

    def logged_take(self, idx, wait):
        with open(asked, "a") as f:
            f.write(f"{idx}\n")
        return take(self, idx, wait)

    monkeypatch.setattr(ForkReads, "take", logged_take)  # inherited by the forked workers
    log = tmp_path / "reads.log"
    provider = HyraxLike(LoggedDataset(32, uuid.uuid4().hex, log))
    loader = torch.utils.data.DataLoader(
        provider, batch_size=8, num_workers=2, multiprocessing_context="fork"
    )
    name = provider.cache.shared_caches["data"].name
    try:
        for _ in range(2):
            images = torch.cat(list(loader))
            assert images[:, 0, 0].tolist() == [float(i) for i in range(32)]
        assert sorted(int(line) for line in log.read_text().split()) == list(range(32))
        assert not asked.exists(), asked.read_text()
    finally:
        del loader
        provider.cache.disable()
        raycache.drop_cache(name)
