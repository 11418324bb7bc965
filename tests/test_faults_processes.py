"""Fault matrix, the trainers' side: a trainer SIGKILLed while it fills the cache, and
DataLoader workers (spawned and forked) whose attach fails.

Each row runs real processes; the rows that leave a cache behind end with an epoch read
through ``CachedDataset`` and compared with the provider (``assert_epoch_matches``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import TESTS, run_python
from fault_helpers import assert_epoch_matches
from providers import ArrayProvider

import raycache
from raycache import CachedDataset

N = 1024


def cfg(name: str) -> dict:
    return {"raycache": {"name": name, "chunk_size": 32, "flush_interval_s": 0.05}}


def _env(address: str) -> dict:
    return dict(
        os.environ, RAY_ADDRESS=address, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)])
    )


FILLER = """
import os, sys, time
import ray
from providers import ArrayProvider
from raycache import CachedDataset

ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
ds = CachedDataset(ArrayProvider(N), {"raycache": {"name": NAME, "chunk_size": 32,
                                                   "flush_interval_s": 0.05}})
for start in range(0, N, 16):
    ds.__getitems__(list(range(start, start + 16)))
    if start % 64 == 48:
        assert ds.cache.flush(timeout=30)
        print("SENT", start + 16, flush=True)
    time.sleep(0.005)
print("FILLED ALL", flush=True)
time.sleep(600)
"""

READER = """
from fault_helpers import assert_epoch_matches
from providers import ArrayProvider
from raycache import CachedDataset

provider = ArrayProvider(N)
ds = CachedDataset(provider, {"raycache": {"name": NAME, "chunk_size": 32}})
before = ds.cache.stats()["items"]
assert_epoch_matches(ds, provider)
print("READ", before, "CLIENTS", ds.cache.stats()["clients"])
ds.cache.close()
"""


def test_a_trainer_sigkilled_while_filling(ray_address, cache_name):
    provider = ArrayProvider(N)
    other = CachedDataset(provider, cfg(cache_name))  # a trainer that goes on
    code = FILLER.replace("NAME", repr(cache_name)).replace("N)", f"{N})")
    code = code.replace(", N,", f", {N},")
    filler = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_env(ray_address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sent = 0
    try:
        deadline = time.monotonic() + 90
        while sent < N // 2:  # the readline ends: the filler prints or exits
            line = filler.stdout.readline()
            assert line, f"the filler exited: {filler.stderr.read()}"
            if line.startswith("SENT"):
                sent = int(line.split()[1])
            assert time.monotonic() < deadline, "the filler did not get half way"
        # Still filling: it reads, buffers and sends its next items.
        os.kill(filler.pid, signal.SIGKILL)
        assert filler.wait(timeout=30) == -signal.SIGKILL
    finally:
        if filler.poll() is None:
            filler.kill()
            filler.wait(timeout=30)
    assert other.cache.stats()["items"] >= sent  # what it had sent stays
    assert_epoch_matches(other, provider)
    assert other.cache.flush(timeout=30)
    assert other.cache.stats()["items"] == N
    # A new process attaches to the cache the killed trainer helped fill, and reads right.
    out = run_python(READER.replace("NAME", repr(cache_name)).replace("(N)", f"({N})"), ray_address)
    read = int(out.split("READ")[1].split()[0])
    assert read == N, out
    other.cache.close()
    raycache.drop_cache(cache_name)


WORKER_ATTACH = """
import os, sys
import numpy as np
import torch
from raycache import DataCache

class Stars:
    # A provider defined in the training script: __main__ here, __mp_main__ in spawn.
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"flux": np.full(4, i, dtype=np.float32)}

class Lazy(torch.utils.data.Dataset):
    # Builds its cache in the worker, as a provider made per worker does.
    def __init__(self, config):
        self.config = config
        self.cache = None

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if self.cache is None:
            self.cache = DataCache(self.config, Stars(8))
        item = self.cache.try_fetch(i)
        return item if item is not None else Stars(8)[i]

if __name__ == "__main__":
    context, config = sys.argv[1], eval(sys.argv[2])
    loader = torch.utils.data.DataLoader(
        Lazy(config), batch_size=None, num_workers=1, multiprocessing_context=context,
        timeout=120,
    )
    try:
        next(iter(loader))
        print("PARENT GOT NOTHING")
    except Exception as exc:
        print("PARENT GOT", type(exc).__module__, type(exc).__qualname__, "|",
              " ".join(str(exc).split())[-400:])
"""


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_dataloader_worker_whose_attach_fails_reports_why(
    ray_address, cache_name, tmp_path, context
):
    # The name is taken by a cache of another length: the worker's attach is refused.
    holder = CachedDataset(ArrayProvider(5), {"raycache": {"name": cache_name}})
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(WORKER_ATTACH))
    config = {"raycache": {"name": cache_name}}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), context, repr(config)],
        env=_env(ray_address),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert time.monotonic() - start < 200
    assert "PARENT GOT raycache.errors CacheMismatchError" in proc.stdout, proc.stdout + proc.stderr
    assert cache_name in proc.stdout and "8" in proc.stdout
    holder.cache.close()
    raycache.drop_cache(cache_name)


def test_a_spawned_worker_that_cannot_reach_ray_reports_why(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(WORKER_ATTACH))
    # A port nothing listens on: the worker's attach must fail within seconds, not hang.
    config = {"raycache": {"name": "nowhere", "address": "127.0.0.1:9"}}
    env = {k: v for k, v in _env("").items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), "spawn", repr(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert time.monotonic() - start < 120
    assert "PARENT GOT" in proc.stdout and "NOTHING" not in proc.stdout, proc.stdout + proc.stderr
    assert "127.0.0.1:9" in proc.stdout, proc.stdout
