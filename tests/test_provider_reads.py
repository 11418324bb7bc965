"""Reading a provider as raycache does: every DataCache in the thread is inert meanwhile.

A provider may itself read through a DataCache (a Hyrax dataset whose cache is on). When
raycache reads it, for a preload or a miss, that inner cache must stay out of the way
(``bypass_active``), and only for the read: the thread's own reads before and after go
through their caches as usual, whether the provider's read returned or raised.
"""

from __future__ import annotations

import threading

import pytest

from raycache.provider import bypass_active, read_raw, read_raw_many

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A map-style provider that records whether the bypass was on at each read."""

    def __init__(self, fail_at: int | None = None):
        self.seen: list[tuple[int, bool]] = []
        self.fail_at = fail_at

    def __len__(self) -> int:
        return 10

    def __getitem__(self, idx: int) -> dict:
        self.seen.append((idx, bypass_active()))
        if idx == self.fail_at:
            raise KeyError(f"no item {idx}")
        return {"x": idx}


class Nested(Recorder):
    """Reads a second provider from inside its own read, as raycache itself would."""

    def __init__(self, inner: Recorder):
        super().__init__()
        self.inner = inner

    def __getitem__(self, idx: int) -> dict:
        item = super().__getitem__(idx)
        item["inner"] = read_raw(self.inner, idx)["x"]
        return item


class Resolver(Recorder):
    """A Hyrax-style provider: ``resolve_data`` is what raycache calls, not ``[]``."""

    def resolve_data(self, idx: int) -> dict:
        return {"x": -idx, "via": bypass_active()}


def test_the_bypass_holds_for_the_read_only():
    provider = Recorder()
    assert not bypass_active()
    assert read_raw(provider, 3) == {"x": 3}
    assert provider.seen == [(3, True)]
    assert not bypass_active()


def test_a_read_that_raises_ends_the_bypass_and_names_its_index():
    provider = Recorder(fail_at=4)
    with pytest.raises(KeyError) as info:
        read_raw(provider, 4)
    assert not bypass_active()
    assert any("4" in note for note in getattr(info.value, "__notes__", []))
    out: list = []
    with pytest.raises(KeyError):
        read_raw_many(provider, [1, 2, 4, 5], out)
    assert out == [{"x": 1}, {"x": 2}]  # the items read before the one that failed
    assert not bypass_active()


def test_nested_reads_keep_the_bypass_until_the_outer_read_ends():
    inner = Recorder()
    outer = Nested(inner)
    assert read_raw(outer, 2) == {"x": 2, "inner": 2}
    assert inner.seen == [(2, True)]
    assert outer.seen == [(2, True)]
    assert not bypass_active()


def test_the_bypass_is_per_thread():
    seen_elsewhere = []
    entered, release = threading.Event(), threading.Event()

    class Blocking(Recorder):
        def __getitem__(self, idx: int) -> dict:
            entered.set()
            assert release.wait(30)
            return super().__getitem__(idx)

    reader = threading.Thread(target=read_raw, args=(Blocking(), 0))
    reader.start()
    assert entered.wait(30)
    seen_elsewhere.append(bypass_active())  # this thread is not reading
    release.set()
    reader.join(30)
    assert seen_elsewhere == [False]


def test_resolve_data_is_read_where_the_provider_has_it():
    provider = Resolver()
    assert read_raw(provider, 5) == {"x": -5, "via": True}
    assert provider.seen == []  # ``[]`` was not used
