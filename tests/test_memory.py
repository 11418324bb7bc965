"""Memory is shared, measured: K trainers on one node cost one copy of the cache.

K = 3 trainer processes attach to one cache of ~200 MB; the node's memory (PSS summed
over the Ray session's processes and the trainers, see ``raycache.memory``) is read
once every trainer is up and attached, and again once every trainer has read every
item. The growth must stay near 1x the data for the preload path and, within what
Ray's object store allows, for the fill-on-miss path; one dict cache per trainer
(Hyrax's own cache) is measured the same way and costs ~Kx.

This file is also the trainer: ``python tests/test_memory.py MODE ADDRESS NAME ITEMS``
follows a line protocol on stdin/stdout (``ready``, ``go``, ``loaded``, ``exit``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

K = 3
ITEMS = 4096  # 4096 x 48 KiB images: ~201 MB
SHAPE = (3, 64, 64)
WAIT_S = 240.0
MB = 1024 * 1024


# --------------------------------------------------------------------- trainer side
def _trainer(mode: str, address: str, name: str, items: int, rank: int) -> None:
    import numpy as np

    from raycache.train.data import SyntheticCutouts

    provider = SyntheticCutouts(items, SHAPE)
    if mode != "dict":
        from raycache.runtime import ensure_ray

        ensure_ray(address)
    _say("ready")
    _expect("go")
    if mode == "dict":
        cache = {i: provider[i] for i in range(items)}  # Hyrax: one dict per trainer
        _say("loaded", checked=int(np.array_equal(cache[7]["image"], provider.expected(7)["image"])))
        _expect("exit")
        return
    from raycache import CachedDataset

    config = {
        "data_set": {"use_cache": True, "preload_cache": mode == "preload"},
        "raycache": {"name": name, "address": address, "timeout_s": 120.0},
    }
    ds = CachedDataset(provider, config)
    if mode == "preload":
        if not ds.cache.wait_for_preload(timeout=WAIT_S):
            raise TimeoutError("preload did not finish")
    else:
        # Epoch 1 of a DDP rank: its own shard, every read a miss filled from the provider.
        order = np.random.default_rng(rank).permutation(np.arange(rank, items, K))
        for start in range(0, len(order), 64):
            ds.__getitems__(order[start : start + 64].tolist())
        if not ds.cache.flush(timeout=WAIT_S):
            raise TimeoutError("inserted items were not sent")
        _say("filled")
        _expect("go")
    checked = 0
    for start in range(0, items, 256):  # every item read: every chunk mapped
        batch = ds.collate(ds.__getitems__(list(range(start, min(items, start + 256)))))
        want = provider.expected(start)
        checked += int(np.array_equal(batch["image"][0].numpy(), want["image"]))
    stats = ds.cache.stats()
    _say("loaded", checked=checked, items=stats["items"], bytes=stats["bytes"])
    _expect("exit")
    ds.cache.close()


def _say(what: str, **extra: object) -> None:
    print(json.dumps({"event": what, **extra}), flush=True)


def _expect(what: str) -> None:
    line = sys.stdin.readline().strip()
    if line != what:
        raise RuntimeError(f"expected {what!r} from the test, got {line!r}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _trainer(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    sys.exit(0)


# --------------------------------------------------------------------- test side
import pytest  # noqa: E402
import ray  # noqa: E402

from raycache import drop_cache  # noqa: E402
from raycache.memory import node_memory, pss, ray_processes  # noqa: E402

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/smaps_rollup"), reason="PSS needs Linux"
)

DATA_BYTES = ITEMS * 4 * SHAPE[0] * SHAPE[1] * SHAPE[2]
RESULTS = Path(os.environ.get("RAYCACHE_MEMORY_RESULTS", "")) if os.environ.get(
    "RAYCACHE_MEMORY_RESULTS"
) else None


@pytest.fixture(scope="module")
def ray_address():
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=1024 * MB,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


class _Trainers:
    """K trainer processes driven through their stdin and stdout."""

    def __init__(self, mode: str, address: str, name: str, k: int = K, items: int = ITEMS):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.procs = [
            subprocess.Popen(
                [sys.executable, __file__, mode, address, name, str(items), str(rank)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for rank in range(k)
        ]
        self.lines: queue.Queue = queue.Queue()
        for rank, proc in enumerate(self.procs):
            threading.Thread(target=self._pump, args=(rank, proc), daemon=True).start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _pump(self, rank: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.startswith("{"):
                self.lines.put((rank, json.loads(line)))
        self.lines.put((rank, {"event": "exited"}))

    def wait(self, event: str, timeout: float = WAIT_S) -> list[dict]:
        got: dict[int, dict] = {}
        while len(got) < len(self.procs):
            try:
                rank, msg = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"trainers did not all say {event!r} in {timeout}s") from None
            if msg["event"] == "exited":
                code = self.procs[rank].wait(timeout=30)
                raise RuntimeError(f"trainer {rank} exited with {code} waiting for {event!r}")
            assert msg["event"] == event, msg
            got[rank] = msg
        return [got[r] for r in range(len(self.procs))]

    def send(self, line: str) -> None:
        for p in self.procs:
            p.stdin.write(line + "\n")
            p.stdin.flush()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.write("exit\n")
                    p.stdin.flush()
                except (BrokenPipeError, OSError):
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=30)


def _measure(mode: str, address: str, name: str) -> dict:
    trainers = _Trainers(mode, address, name)
    try:
        trainers.wait("ready")
        before = node_memory(trainers.pids)
        trainers.send("go")
        if mode == "fill":
            trainers.wait("filled")
            trainers.send("go")
        loaded = trainers.wait("loaded")
        after = node_memory(trainers.pids)
    finally:
        trainers.stop()
        if mode != "dict":
            drop_cache(name, address=address)
    out = {
        "mode": mode,
        "data_mb": DATA_BYTES / MB,
        "extra_mb": (after["total"] - before["total"]) / MB,
        "extra_x": (after["total"] - before["total"]) / DATA_BYTES,
        "before": {k: v / MB for k, v in before.items() if k != "processes"},
        "after": {k: v / MB for k, v in after.items() if k != "processes"},
        "new_processes": {
            pid: usage["pss"] / MB
            for pid, usage in after["processes"].items()
            if pid not in before["processes"]
        },
        "trainers": loaded,
    }
    if RESULTS is not None:
        with open(RESULTS, "a") as f:
            f.write(json.dumps(out) + "\n")
    print(json.dumps(out, indent=1))
    return out


def test_pss_helpers(ray_address):
    mine = pss(os.getpid())
    assert mine is not None and mine["pss"] > 0 and mine["anon"] > 0
    assert pss(2**22 + 12345) is None  # no such process
    procs = ray_processes()
    assert procs, "the Ray session's processes were not found"
    usage = node_memory([os.getpid()])
    assert usage["trainers"] == usage["processes"][os.getpid()]["pss"]
    assert usage["ray"] > 0 and usage["total"] == usage["ray"] + usage["trainers"]


def test_preloaded_cache_costs_one_copy(ray_address):
    result = _measure("preload", ray_address, "mem-preload")
    assert all(t["checked"] == ITEMS // 256 for t in result["trainers"])
    assert all(t["items"] == ITEMS for t in result["trainers"])
    assert result["extra_x"] <= 1.3, result


def test_fill_on_miss_cost(ray_address):
    result = _measure("fill", ray_address, "mem-fill")
    assert all(t["checked"] == ITEMS // 256 for t in result["trainers"])
    assert all(t["items"] == ITEMS for t in result["trainers"])
    # See docs/memory.md: a temporary object per insert leaves its pages resident.
    assert result["extra_x"] <= 2.5, result


def test_dict_cache_per_trainer_costs_k_copies(ray_address):
    result = _measure("dict", ray_address, "mem-dict")
    assert all(t["checked"] == 1 for t in result["trainers"])
    assert result["extra_x"] >= 0.8 * K, result
