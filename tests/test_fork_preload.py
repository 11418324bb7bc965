"""Forked DataLoader workers with a preload running: each item is read from the provider once.

A forked worker makes no Ray call, so it asks its parent about its misses
(``raycache.client.fork_reads``): items stored since its fork come back from the
parent's cache, misses a preload unit is reading are waited for in the parent, the
others are reserved for the worker, which reads them. Each test runs a user's script
in its own process: the provider is defined in that script (``__main__``), and every
read, in any process (the preload's Ray workers included), is logged to one file.
"""

from __future__ import annotations

import json
from collections import Counter

from conftest import run_python

N = 384

SCRIPT_HEAD = """
import json, logging, os, sys, time
import numpy as np
import torch
import raycache
from raycache import CachedDataset


class LoggedSlowProvider:
    "Items of 48 KiB; each read waits a little and is logged with the reading process."

    def __init__(self, n, log_path, latency_s):
        self.n, self.log_path, self.latency_s = n, log_path, latency_s

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{i} {os.getpid()}\\n".encode())
        finally:
            os.close(fd)
        time.sleep(self.latency_s)
        return {"image": np.full((96, 128), i, dtype=np.float32), "label": i}

def check(item, i):
    image = item["image"]
    image = image.numpy() if isinstance(image, torch.Tensor) else image
    assert image.dtype == np.float32 and image.shape == (96, 128), (i, image.dtype, image.shape)
    assert (image == i).all() and int(item["label"]) == i, i
"""


def _reads(log_path) -> Counter:
    with open(log_path) as f:
        return Counter(int(line.split()[0]) for line in f if line.strip())


def test_fork_workers_and_a_running_preload_read_each_item_once(ray_address, tmp_path):
    log_path = tmp_path / "reads.log"
    code = (
        SCRIPT_HEAD
        + f"""
LOG = {str(log_path)!r}
provider = LoggedSlowProvider({N}, LOG, 0.01)
config = {{
    "data_set": {{"preload_cache": True, "preload_threads": 2}},
    "raycache": {{"name": "fork-preload-{tmp_path.name[-8:]}", "chunk_size": 32}},
}}
ds = CachedDataset(provider, config)
loader = torch.utils.data.DataLoader(
    ds, batch_size=16, num_workers=2, multiprocessing_context="fork",
    collate_fn=list, timeout=60,
)
seen = 0
for k, batch in enumerate(loader):
    for j, item in enumerate(batch):
        check(item, 16 * k + j)
        seen += 1
assert ds.cache.wait_for_preload(timeout=60)
client = ds.cache.stats()["client"]
print(json.dumps({{"seen": seen, "pid": os.getpid(), "hits": client["hits"],
                  "misses": client["misses"]}}))
ds.cache.close()
raycache.drop_cache(config["raycache"]["name"])
"""
    )
    out = json.loads(run_python(code, ray_address, timeout=90).strip().splitlines()[-1])
    assert out["seen"] == N
    reads = _reads(log_path)
    twice = sorted(i for i, n in reads.items() if n > 1)
    assert not twice, f"read more than once: {twice[:20]} ({len(twice)} indices)"
    assert set(reads) == set(range(N)), "some index was never read"
    # The workers' reads reach the parent's stats(), and some came from the cache: items
    # the preload stored after the fork, or waited for while its units read them.
    assert out["hits"] + out["misses"] == N, out
    assert out["hits"] > 0, out


def test_a_child_whose_parent_stops_answering_falls_back_and_is_right(ray_address, tmp_path):
    log_path = tmp_path / "reads.log"
    script = SCRIPT_HEAD + _FALLBACK.format(log=str(log_path), name=f"fork-fb-{tmp_path.name[-8:]}")
    out = json.loads(run_python(script, ray_address, timeout=90).strip().splitlines()[-1])
    assert out.get("ok"), out
    assert out["first_reads"] == 0, "the child read items stored after its fork from the provider"
    assert out["warnings"] == 1, out  # once, not per batch
    # Once its parent stopped answering, the child read each miss from the provider.
    assert sorted(_reads(log_path).elements()) == sorted(list(range(64)) * 2)


_FALLBACK = """
from raycache import fork_requests

warnings = []
class Count(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("raycache.client.fork_reads").addHandler(Count())

n = 64
LOG = {log!r}
provider = LoggedSlowProvider(n, LOG, 0.0)
ds = CachedDataset(provider, {{"raycache": {{"name": {name!r}, "chunk_size": 16}}}})
to_child_r, to_child_w = os.pipe()
to_parent_r, to_parent_w = os.pipe()
pid = os.fork()
if pid == 0:  # the child: no Ray call may happen here
    os.close(to_child_w); os.close(to_parent_r)
    result = {{}}
    try:
        assert os.read(to_child_r, 1) == b"1"
        for i, item in enumerate(ds.__getitems__(list(range(n)))):  # stored after the fork
            check(item, i)
        result["first_reads"] = sum(1 for _ in open(LOG))
        os.write(to_parent_w, b"a")
        assert os.read(to_child_r, 1) == b"2"
        items = ds.__getitems__(list(range(n))) + ds.__getitems__(list(range(n)))
        for i, item in enumerate(items):
            check(item, i % n)
        result["warnings"] = len(warnings)
        result["ok"] = True
    except BaseException as exc:
        result["error"] = repr(exc)
    os.write(to_parent_w, json.dumps(result).encode())
    os._exit(0)
os.close(to_child_r); os.close(to_parent_w)
for i in range(n):
    ds.cache.insert_into_cache(i, provider[i])
assert ds.cache.flush(timeout=30)
os.truncate(LOG, 0)  # the parent's own reads, just above
os.write(to_child_w, b"1")
import select
assert select.select([to_parent_r], [], [], 45)[0], "the child did not read its first batch"
assert os.read(to_parent_r, 1) == b"a"
fork_requests.stop_serving()  # the parent no longer answers this child
os.write(to_child_w, b"2")
assert select.select([to_parent_r], [], [], 45)[0], "the child did not finish"
result = os.read(to_parent_r, 1 << 16).decode()
_, status = os.waitpid(pid, 0)
assert status == 0, status
ds.cache.close()
raycache.drop_cache({name!r})
print(result)
"""


_DIES = """
import select
LOG = {log!r}
class FirstSlow(LoggedSlowProvider):
    "The preload is still running, short of index 64, when the child reserves."

    def __getitem__(self, i):
        # The first items slowest; each other item takes 20 ms, so that the preload's
        # two threads need ~0.6 s to reach index 64 even where the child's fork and
        # call run late (a busy machine), and ~1.3 s for the child's 128 items.
        self.latency_s = 0.15 if i < 8 else 0.02
        return super().__getitem__(i)

n = 192
provider = FirstSlow(n, LOG, 0.0)
config = {{
    "data_set": {{"preload_cache": True, "preload_threads": 2}},
    "raycache": {{"name": {name!r}, "chunk_size": 16}},
}}
ds = CachedDataset(provider, config)
out_r, out_w = os.pipe()
pid = os.fork()
if pid == 0:  # reserve the top of what the preload has not reached, then die unread
    os.close(out_r)
    held = ds.cache.miss_reads.being_preloaded(np.arange(64, n, dtype=np.int64))
    os.write(out_w, str(int((~held).sum())).encode())
    os._exit(0)
os.close(out_w)
assert select.select([out_r], [], [], 45)[0], "the child did not reserve"
reserved = int(os.read(out_r, 64))
os.waitpid(pid, 0)
died = time.monotonic()
assert ds.cache.wait_for_preload(timeout=60)
after = time.monotonic() - died
print(json.dumps({{"reserved": reserved, "after": after, "cached": ds.cache.stats()["items"]}}))
ds.cache.close()
raycache.drop_cache({name!r})
"""


def test_what_a_dead_child_reserved_is_given_back_to_the_preload(ray_address, tmp_path):
    log_path = tmp_path / "reads.log"
    script = SCRIPT_HEAD + _DIES.format(log=str(log_path), name=f"fork-dies-{tmp_path.name[-8:]}")
    out = json.loads(run_python(script, ray_address, timeout=90).strip().splitlines()[-1])
    assert out["reserved"] > 0, out  # the child's misses were reserved for it, by its parent
    reads = _reads(log_path)
    assert sorted(reads) == list(range(192)) and max(reads.values()) == 1, reads
    # Given back when the child's socket closed: the preload read them at once, without
    # waiting for the reservations' lease (5 s and more) to run out.
    assert out["after"] < 4.0, out
